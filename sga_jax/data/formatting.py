"""Prompt formatting and tokenisation into the batch format of docs/interfaces.md.

Templates, chosen per model by ``template``:

* ``"chat"``: the tokenizer's own chat template (e.g. SmolLM2-Instruct's ChatML): the question is a
  user turn, the answer the assistant turn; the prompt is the template with the generation prompt.
  Templates are rendered with ``enable_thinking=False`` (Qwen3: the empty reasoning block is prompt).
* ``"gemma3"`` / ``"qwen3"``: that family's turn markup (:mod:`sga_jax.data.chat_templates`), for
  base checkpoints that ship without a chat template; otherwise as ``"chat"``.
* ``"plain"``: TOFU's format for base models (``data_module.convert_raw_data_to_model_format`` in
  locuslab/tofu): ``"Question: {q}\\nAnswer: {a}"`` + EOS.
* ``"auto"``: ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.

As TOFU does, the number of prompt tokens is that of the prompt tokenised on its own and the first
that many tokens of the full text are masked out of ``loss_mask``. In the plain template TOFU's
prompt is ``"Question: {q}\n"``: the ``"Answer: "`` tag, the answer and the EOS after it are the
targets (``mask_answer_tag=True`` masks the tag too). Truncation to ``max_length`` is counted in
:class:`EncodeStats` and warned about; a row whose prompt alone fills the context is skipped and
reported (never silently dropped, never a crash inside JAX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from sga_jax.data.chat_templates import FAMILY_TEMPLATES
from sga_jax.errors import ConfigError, DataError

# A chat template is a Jinja program from the tokenizer's files; nested loops in it can run for
# hours inside transformers (which sets no limit). One prompt renders in well under a millisecond.
CHAT_TEMPLATE_SECONDS = 10.0


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise a DataError if the body runs longer than ``seconds`` (SIGALRM; main thread on POSIX
    only, elsewhere no limit). An alarm already set by the caller is kept: ours is cut to what is
    left of it, and it is re-armed afterwards with its remaining time."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    mine = seconds if outer_left <= 0 else min(seconds, outer_left)
    ours_first = outer_left <= 0 or seconds < outer_left
    start = time.monotonic()
    outer_fired = False

    def expired(signum, frame):
        nonlocal outer_fired
        if not ours_first:  # the caller's alarm: hand it to the caller's handler
            outer_fired = True
            if callable(old):
                return old(signum, frame)
            signal.signal(signal.SIGALRM, old)
            signal.raise_signal(signum)
            return None
        raise DataError(
            f"the tokenizer's chat template took more than {seconds:g} s to render one prompt (a "
            "runaway loop?); fix chat_template in tokenizer_config.json or use template=plain"
        )

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, mine)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left > 0 and not outer_fired:  # the caller's alarm, with what is left of it
            left = outer_left - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


log = logging.getLogger(__name__)

TEMPLATES = ("auto", "chat", "plain", *FAMILY_TEMPLATES)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised row: ``input_ids`` and ``loss_mask`` (1 on target tokens) of equal length."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class EncodeStats:
    """What :meth:`PromptFormatter.encode_rows` did: rows kept, truncated, skipped (index, reason)."""

    n_rows: int = 0
    n_truncated: int = 0
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def report(self, source: str = "data") -> None:
        if self.n_truncated:
            warnings.warn(
                f"{source}: {self.n_truncated} of {self.n_rows} rows truncated to max_length",
                stacklevel=3,
            )
        if self.skipped:
            first = ", ".join(f"row {i} ({why})" for i, why in self.skipped[:3])
            warnings.warn(
                f"{source}: skipped {self.n_skipped} of {self.n_rows} rows: {first}"
                + (" ..." if self.n_skipped > 3 else ""),
                stacklevel=3,
            )


class PromptFormatter:
    """Formats question/answer rows (or plain text) for one tokenizer.

    Args:
      tokenizer: a transformers tokenizer.
      template: ``"auto" | "chat" | "plain" | "gemma3" | "qwen3"`` (see module docstring).
      max_length: context length; longer rows are truncated (counted), rows with no answer token left
        are skipped (reported).
      question_start, question_end, answer_tag: the plain template's pieces (TOFU's Phi / Llama
        model configs use ``"Question: "``, ``"\\n"``, ``"Answer: "``).
      system_prompt: chat template only; ``None`` keeps the template's default system turn.
      add_eos: plain template only: append EOS after the answer (TOFU's label does).
      mask_answer_tag: plain template only: also mask the answer tag (TOFU does not).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str = "auto",
        max_length: int = 512,
        *,
        question_start: str = "Question: ",
        question_end: str = "\n",
        answer_tag: str = "Answer: ",
        system_prompt: str | None = None,
        add_eos: bool = True,
        mask_answer_tag: bool = False,
    ):
        if template not in TEMPLATES:
            raise ConfigError(f"unknown prompt template {template!r}; use one of {TEMPLATES}")
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {max_length}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("template='chat' but the tokenizer has no chat template; use 'plain'")
        self.tokenizer = tokenizer
        self.chat_template = FAMILY_TEMPLATES.get(template)  # None: the tokenizer's own
        chat = template == "chat" or self.chat_template is not None or (template == "auto" and has_chat)
        self.mode = "chat" if chat else "plain"
        self.max_length = int(max_length)
        self.question_start = question_start
        self.question_end = question_end
        self.answer_tag = answer_tag
        self.system_prompt = system_prompt
        self.add_eos = add_eos
        self.mask_answer_tag = mask_answer_tag

    # --- ids -----------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return 0 if pad is None else int(pad)

    def tokenize(self, text: str, *, special: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens (BOS) added in plain mode, not in chat mode (the
        template writes its own)."""
        if special is None:
            special = self.mode == "plain"
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # --- text ----------------------------------------------------------------------------------
    def _messages(self, question: str) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": question}]
        if self.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        with _time_limit(CHAT_TEMPLATE_SECONDS):
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                chat_template=self.chat_template,
                enable_thinking=False,
            )

    def prompt_text(self, question: str) -> str:
        """The text before the answer in a training / loss sequence."""
        if self.mode == "chat":
            return self._chat(self._messages(question), True)
        return self.question_start + question + self.question_end + self.answer_tag

    def generation_prompt(self, question: str, *, official_tofu: bool = True) -> str:
        """The prompt greedy answers are generated from.

        Plain template: TOFU's ``run_generation`` splits the decoded input at ``"Answer: "`` and
        generates from ``"Question: {q}\\n"`` (so models answer "Answer: ..."); ``official_tofu=False``
        keeps the answer tag in the prompt.
        """
        if self.mode == "chat":
            return self._chat(self._messages(question), True)
        if official_tofu:
            return self.question_start + question + self.question_end
        return self.prompt_text(question)

    def full_text(self, question: str, answer: str) -> str:
        if self.mode == "chat":
            msgs = self._messages(question) + [{"role": "assistant", "content": answer}]
            return self._chat(msgs, False)
        return self.prompt_text(question) + answer

    # --- encoding ------------------------------------------------------------------------------
    def encode_qa(self, question: str, answer: str) -> Encoded | str:
        """``Encoded`` for one QA pair, or a string saying why the row cannot be used."""
        ids = self.tokenize(self.full_text(question, answer))
        if self.mode == "plain" and not self.mask_answer_tag:
            masked = self.question_start + question + self.question_end
        else:
            masked = self.prompt_text(question)
        prompt_ids = self.tokenize(masked)
        n_prompt = len(prompt_ids)
        if self.mode == "chat" and ids[: n_prompt - 1] != prompt_ids[:-1]:
            # The mask counts prompt tokens (as TOFU does); a template whose generation prompt is not
            # a prefix of the rendered answer turn would put prompt tokens among the targets. The
            # last prompt token may merge with the answer's first (TOFU accepts that too).
            raise ConfigError(
                "the chat template's generation prompt is not a prefix of the rendered answer turn, so "
                "the answer cannot be masked; use another data.prompt_format / template"
            )
        if self.mode == "plain" and self.add_eos and self.eos_token_id is not None:
            ids.append(int(self.eos_token_id))
        truncated = len(ids) > self.max_length
        if truncated:
            ids = ids[: self.max_length]
        if n_prompt >= len(ids):
            return f"prompt of {n_prompt} tokens leaves no answer token within max_length={self.max_length}"
        mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        return Encoded(ids, mask, truncated)

    def encode_text(self, text: str) -> Encoded | str:
        """``Encoded`` for a plain text (every token after BOS is a target)."""
        return self.encode_ids(list(self.tokenizer(text, add_special_tokens=True)["input_ids"]))

    def encode_ids(self, ids: list[int]) -> Encoded | str:
        """``Encoded`` for text already tokenised with its special tokens (e.g. MUSE's training
        chunks, :func:`sga_jax.data.muse.chunk_text`): every token after a leading BOS is a target."""
        ids = [int(t) for t in ids]
        if not ids:
            return "empty text"
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        bos = self.tokenizer.bos_token_id
        mask = [0 if (i == 0 and t == bos) else 1 for i, t in enumerate(ids)]
        if len(ids) < 2:
            return "text shorter than two tokens"
        return Encoded(ids, mask, truncated)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a generation prompt (no answer); truncation is the caller's decision."""
        return self.tokenize(text)

    def encode_rows(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        answer_key: str = "answer",
        source: str = "data",
        strict: bool = False,
    ) -> tuple[list[Encoded | None], EncodeStats]:
        """Encode QA rows (``question`` + ``answer_key``; a list value gives one Encoded per item) or
        ``{"text"}`` rows (their ``input_ids`` when given). Unusable rows become ``None`` and are
        listed in the stats (or raise DataError when ``strict``); truncations are counted. Warnings
        are issued for both."""
        stats = EncodeStats(n_rows=len(rows))
        out: list[Any] = []
        for i, row in enumerate(rows):
            if "question" in row:
                value = row.get(answer_key)
                if value is None:
                    raise DataError(f"{source}: row {i} has no key {answer_key!r}")
                answers = value if isinstance(value, list) else [value]
                encs = [self.encode_qa(row["question"], a) for a in answers]
                result: Any = encs if isinstance(value, list) else encs[0]
                bad = next((e for e in encs if isinstance(e, str)), None)
            elif "text" in row:
                result = (
                    self.encode_ids(row["input_ids"]) if "input_ids" in row else self.encode_text(row["text"])
                )
                bad = result if isinstance(result, str) else None
                encs = [result]
            else:
                raise DataError(f"{source}: row {i} has neither 'question' nor 'text'")
            if bad is not None:
                if strict:
                    raise DataError(f"{source}: row {i}: {bad}")
                stats.skipped.append((i, bad))
                out.append(None)
                continue
            stats.n_truncated += sum(e.truncated for e in encs)
            out.append(result)
        stats.report(source)
        if stats.n_skipped == len(rows):
            raise DataError(f"{source}: every row was skipped (first: {stats.skipped[0][1]})")
        return out, stats
