"""Built-in turn formats for model families whose base checkpoints ship without a chat template.

The base models people unlearn in 2026 (google/gemma-3-*-pt, Qwen/Qwen3-*-Base) are often loaded
from a GGUF file or a folder that holds no ``chat_template``, while the instruction-tuned variants
of the same families were trained on one fixed turn markup. ``data.prompt_format`` (training) and
``template`` (evaluation) name one of these to format TOFU / MUSE questions in that markup whatever
the tokenizer carries:

* ``gemma3``: Gemma 3's turns (the ``chat_template`` of google/gemma-3-270m-it's
  ``tokenizer_config.json``): ``<bos><start_of_turn>user\\n{q}<end_of_turn>\\n<start_of_turn>model\\n``;
  the assistant role is written ``model``, a system prompt is folded into the first user turn
  followed by a blank line (Gemma has no system role), and contents are stripped of surrounding
  whitespace as the official template's ``| trim`` does. The answer turn ends ``<end_of_turn>\\n``.
* ``qwen3``: Qwen3's ChatML (Qwen/Qwen3-8B ``tokenizer_config.json``, chat_template): ``<|im_start|>
  {role}\\n{content}<|im_end|>\\n``. Its final assistant turn carries a reasoning block; an answer
  without reasoning is written after an empty one, ``<think>\\n\\n</think>\\n\\n``, and the official
  generation prompt with ``enable_thinking=False`` ends in that same empty block. sga_jax renders
  every chat template with ``enable_thinking=False``, so the empty block belongs to the prompt (it is
  masked) and the targets are the answer and ``<|im_end|>`` alone.

Only single-question conversations (an optional system turn, one user turn, one assistant turn) are
rendered, which is all TOFU / MUSE formatting needs; tools and multi-turn reasoning history are not.
Each template is Jinja rendered by the tokenizer's own ``apply_chat_template``; the strings carry no
whitespace of their own, so no whitespace control is needed (a ``{%-`` would eat the newlines).
"""

from __future__ import annotations

GEMMA3 = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.prefix = m['content'] | trim ~ '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ ns.prefix }}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN3 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

FAMILY_TEMPLATES: dict[str, str] = {"gemma3": GEMMA3, "qwen3": QWEN3}
