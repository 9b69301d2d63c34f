"""Prompt formatting, masking, truncation reporting and batching against TOFU's own conversion."""

from __future__ import annotations

import numpy as np
import pytest

from sga_jax.data import tofu
from sga_jax.data.batching import bucket_length, collate, iterate_batches
from sga_jax.data.formatting import PromptFormatter
from sga_jax.errors import ConfigError, DataError


def official_tofu(tokenizer, max_length, question, answer):
    """locuslab/tofu data_module.convert_raw_data_to_model_format (Phi/"Question: " format)."""
    new_question = "Question: " + question + "\n"
    full_text = new_question + "Answer: " + answer
    num_question_tokens = len(tokenizer.tokenize(new_question, add_special_tokens=True))
    encoded = tokenizer(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    pad_length = max_length - len(encoded.input_ids)
    if len(encoded.input_ids) == max_length:
        label = list(encoded.input_ids)
    else:
        label = encoded["input_ids"] + [tokenizer.eos_token_id] + [-100] * (pad_length - 1)
    for i in range(num_question_tokens):
        label[i] = -100
    return encoded["input_ids"], label


def test_plain_matches_official_tofu(smollm2_tokenizer, data_dir):
    fmt = PromptFormatter(smollm2_tokenizer, "plain", max_length=200)
    assert fmt.mode == "plain"
    for row in tofu.load_tofu("forget10", limit=5):
        enc = fmt.encode_qa(row["question"], row["answer"])
        ids, label = official_tofu(smollm2_tokenizer, 200, row["question"], row["answer"])
        # Our sequence is the official input + the EOS its label predicts; targets = labels != -100.
        assert enc.input_ids == ids + [smollm2_tokenizer.eos_token_id]
        targets = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
        assert targets == [t for t in label if t != -100]


def test_chat_template_masks_prompt(smollm2_tokenizer):
    fmt = PromptFormatter(smollm2_tokenizer, "auto", max_length=128)
    assert fmt.mode == "chat"
    enc = fmt.encode_qa("Who wrote Hamlet?", "William Shakespeare.")
    prompt = smollm2_tokenizer(fmt.prompt_text("Who wrote Hamlet?"), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt)] == prompt and not any(enc.loss_mask[: len(prompt)])
    target_text = smollm2_tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert target_text.startswith("William Shakespeare.<|im_end|>")


def test_truncation_reported_and_long_prompt_skipped(smollm2_tokenizer):
    fmt = PromptFormatter(smollm2_tokenizer, "plain", max_length=12)
    rows = [
        {"question": "Hi?", "answer": "word " * 40},  # truncated
        {"question": "why " * 30, "answer": "x"},  # prompt alone exceeds the context: skipped
        {"question": "Ok?", "answer": "Yes."},
    ]
    with pytest.warns(UserWarning) as record:
        encoded, stats = fmt.encode_rows(rows, source="toy")
    msgs = " ".join(str(w.message) for w in record)
    assert "1 of 3 rows truncated" in msgs and "skipped 1 of 3 rows: row 1" in msgs
    assert stats.n_truncated == 1 and stats.skipped[0][0] == 1 and encoded[1] is None
    assert len(encoded[0]) == 12
    with pytest.raises(DataError, match="row 1"):
        fmt.encode_rows(rows, source="toy", strict=True)
    with pytest.raises(ConfigError):
        PromptFormatter(smollm2_tokenizer, "jinja")


def test_collate_and_buckets(smollm2_tokenizer):
    fmt = PromptFormatter(smollm2_tokenizer, "plain", max_length=64)
    encs = [fmt.encode_qa("Q?", "a " * n) for n in (1, 5, 20)]
    for side in ("left", "right"):
        b = collate(encs, pad_id=fmt.pad_token_id, padding_side=side, bucket=16, batch_size=4)
        assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
        assert all(v.dtype == np.int32 and v.shape == (4, 32) for v in b.values())
        assert b["attention_mask"].sum(1).tolist() == [len(e) for e in encs] + [0]
        assert (b["loss_mask"] <= b["attention_mask"]).all()
        row = b["input_ids"][2][b["attention_mask"][2] == 1].tolist()
        assert row == encs[2].input_ids
        if side == "left":
            assert b["attention_mask"][0, -1] == 1 and b["attention_mask"][0, 0] == 0
    assert bucket_length(17, 16) == 32 and bucket_length(16, 16) == 16 and bucket_length(5, 16, cap=8) == 8
    seen = [i for idx, _ in iterate_batches(encs, 2, pad_id=0, sort_by_length=True) for i in idx]
    assert sorted(seen) == [0, 1, 2]


# Qwen3's chat turns as its model card shows them (Qwen/Qwen3-8B, "Switching Between Thinking and
# Non-Thinking Mode"): with enable_thinking=False the generation prompt ends in an empty reasoning
# block, and an answered turn carries that same block before the answer.
QWEN3_PROMPT = "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen3_turns_mask_the_empty_reasoning_block(smollm2_tokenizer):
    # SmolLM2's vocabulary holds ChatML's <|im_start|> / <|im_end|>, the tokens Qwen3's turns use.
    fmt = PromptFormatter(smollm2_tokenizer, "qwen3", max_length=128)
    assert fmt.mode == "chat"
    assert fmt.generation_prompt("Who wrote Hamlet?") == QWEN3_PROMPT
    assert fmt.full_text("Who wrote Hamlet?", "Shakespeare.") == QWEN3_PROMPT + "Shakespeare.<|im_end|>\n"
    enc = fmt.encode_qa("Who wrote Hamlet?", "Shakespeare.")
    targets = smollm2_tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    # The <think> block is prompt, not a target (SmolLM2's BPE merges the block's last "\n" with the
    # answer's first token, as TOFU's prompt-length masking allows).
    assert targets.lstrip("\n") == "Shakespeare.<|im_end|>\n"
    with_system = PromptFormatter(smollm2_tokenizer, "qwen3", system_prompt="Be brief.")
    assert with_system.generation_prompt("Q?").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_chat_template_that_is_not_a_prefix_is_refused(smollm2_tokenizer):
    import copy

    tok = copy.copy(smollm2_tokenizer)
    # A template whose generation prompt is not the start of the answered turn (here it announces a
    # role the answered turn does not use): masking by prompt length would train on prompt tokens.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>bot says\n{% endif %}"
    )
    fmt = PromptFormatter(tok, "chat", max_length=128)
    with pytest.raises(ConfigError, match="not a prefix"):
        fmt.encode_qa("Who wrote Hamlet?", "William Shakespeare.")


def test_family_templates_are_accepted_where_formats_are_named():
    """The config and eval option checks spell the formats out (so reading a config imports no
    tokenizer code); they must name exactly the formats the formatter knows."""
    from sga_jax import config as C
    from sga_jax.data.formatting import TEMPLATES
    from sga_jax.eval.options import PROMPT_FORMATS, check_options

    assert tuple(TEMPLATES) == tuple(PROMPT_FORMATS)
    for name in TEMPLATES:
        assert C.DataConfig(prompt_format=name).prompt_format == name
        check_options("tofu", {"template": name})
    with pytest.raises(ConfigError, match="data.prompt_format"):
        C.DataConfig(prompt_format="llama3")
