"""Greedy generation is token-identical to transformers' greedy ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.data import tofu
from sga_jax.data.formatting import PromptFormatter
from sga_jax.errors import DataError
from sga_jax.eval.generate import greedy_generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("gen") / "llama")
    return sga_jax.load_model(path), torch_model


def hf_greedy(torch_model, prompts, max_new_tokens, eos, pad):
    """HF batched greedy generation with left padding; new tokens cut after the first EOS."""
    p = max(map(len, prompts))
    ids = torch.tensor([[pad] * (p - len(x)) + list(x) for x in prompts])
    mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    with torch.no_grad():
        out = torch_model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
    result = []
    for row in out[:, p:].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    return result


def test_tiny_llama_token_identical(tiny):
    model, torch_model = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 96, size=n).tolist() for n in (5, 9, 3, 17, 1, 8)]
    ref = hf_greedy(torch_model, prompts, 24, eos=2, pad=0)
    got = greedy_generate(model, prompts, max_new_tokens=24, eos_token_id=2, pad_token_id=0, batch_size=4)
    assert got.tokens == ref
    # A token the model does emit as EOS: rows stop there, as in HF (ragged lengths, padded rows).
    eos = ref[0][3]
    ref_eos = hf_greedy(torch_model, prompts, 24, eos=eos, pad=0)
    got_eos = greedy_generate(
        model, prompts, max_new_tokens=24, eos_token_id=eos, pad_token_id=0, batch_size=3
    )
    assert got_eos.tokens == ref_eos and len(got_eos.tokens[0]) == 4


def test_bad_prompts(tiny):
    model, _ = tiny
    with pytest.raises(DataError, match="prompt 1 has 40 tokens"):
        greedy_generate(model, [[5, 6], [7] * 40], max_new_tokens=4, eos_token_id=2, max_length=32)
    with pytest.raises(DataError, match="prompt 0 is empty"):
        greedy_generate(model, [[]], max_new_tokens=4, eos_token_id=2)


def test_smollm2_first_16_tokens(smollm2_jax, smollm2_torch, smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = PromptFormatter(tok, "chat")
    rows = tofu.load_tofu("forget10", limit=3)
    prompts = [fmt.encode_prompt(fmt.generation_prompt(r["question"])) for r in rows]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ref = hf_greedy(smollm2_torch, prompts, 16, eos=eos, pad=pad)
    got = greedy_generate(
        smollm2_jax, prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad, batch_size=3
    )
    assert got.tokens == ref


def _ragged_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, size=n).tolist() for n in lengths]


def test_tiny_opt_ragged_left_padded_token_identical(tmp_path):
    """OPT's learned absolute positions: a wrong offset for left-padded rows changes every token
    (RoPE's relative positions hide it on Llama)."""
    path, torch_model = write_tiny_hf("opt", tmp_path / "opt")
    model = sga_jax.load_model(path)
    prompts = _ragged_prompts((5, 19, 3, 11, 1, 8))
    ref = hf_greedy(torch_model, prompts, 12, eos=-1, pad=1)
    got = greedy_generate(model, prompts, max_new_tokens=12, eos_token_id=None, pad_token_id=1, batch_size=4)
    assert got.tokens == ref


def test_tiny_phi3_longrope_across_original_max_position_embeddings(tmp_path):
    """Phi-3 longrope: prompts and continuations on both sides of original_max_position_embeddings
    (32), where transformers switches from the short to the long factors."""
    scaling = {"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.1, 2.0, 3.5, 5.0]}
    path, torch_model = write_tiny_hf(
        "phi3", tmp_path / "phi3", original_max_position_embeddings=32, rope_scaling=scaling
    )
    model = sga_jax.load_model(path)
    for lengths in ((20, 9, 14), (30, 26, 31), (36, 12, 40)):  # short -> long mid-generation, long
        prompts = _ragged_prompts(lengths)
        ref = hf_greedy(torch_model, prompts, 8, eos=-1, pad=0)
        got = greedy_generate(
            model, prompts, max_new_tokens=8, eos_token_id=None, pad_token_id=0, batch_size=3
        )
        assert got.tokens == ref, lengths


def test_continuous_batching_more_prompts_than_rows(tiny):
    """10 prompts of 1-30 tokens through 3 cache rows, each with its own cap (``max_length`` minus
    its own length) and an EOS some rows emit: every row equals HF's greedy generate of that prompt
    alone and the whole-batch path run one prompt at a time; refilled rows reuse the 3 slots."""
    from sga_jax.eval.generate import _batched

    model, torch_model = tiny
    lengths = (1, 30, 4, 17, 9, 25, 2, 12, 6, 21)
    prompts = _ragged_prompts(lengths, seed=3)
    caps = [min(20, 36 - n) for n in lengths]
    eos = hf_greedy(torch_model, [prompts[0]], 20, eos=-1, pad=0)[0][5]
    ref = [hf_greedy(torch_model, [p], c, eos=eos, pad=0)[0] for p, c in zip(prompts, caps)]
    assert len({len(r) for r in ref}) > 3  # EOS and the caps end rows at very different steps
    calls: list[tuple] = []
    got = greedy_generate(
        model, prompts, max_new_tokens=20, max_length=36, eos_token_id=eos, pad_token_id=0, batch_size=3,
        calls=calls,
    )  # fmt: skip
    assert got.tokens == ref
    one = [
        _batched(model, [p], [len(p)], [0], 20, 1, 16, 36, (eos,), 0, None, None)[0] for p in prompts
    ]  # fmt: skip
    assert one == ref
    decodes = [c for c in calls if c[2] == 0]
    assert {c[1] for c in decodes} == {3} and len(decodes) > 2  # 3 slots, refilled between runs
    # each step decodes 3 rows: steps x rows stays near the tokens asked for (no finished row carried)
    assert sum(c[4] for c in decodes) * 3 <= sum(len(r) for r in ref) + 3 * 3 * len(decodes)
