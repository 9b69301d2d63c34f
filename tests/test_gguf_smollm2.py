"""The real SmolLM2-135M-Instruct: sga_jax's own GGUF path vs transformers' GGUF loader."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sga_jax
from sga_jax.models import gguf as G

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, x, a: m(x, a))


def test_config_from_gguf(smollm2_jax):
    c = smollm2_jax.config
    assert (c.num_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and c.rope.theta == 100000.0


def test_logits_match_transformers_gguf(smollm2_jax, smollm2_torch, smollm2_tokenizer, forward):
    ids = smollm2_tokenizer(SENTENCE, return_tensors="np")["input_ids"].astype(np.int32)
    with torch.no_grad():
        ref = smollm2_torch(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    out = np.asarray(forward(smollm2_jax, ids, np.ones_like(ids)))
    assert ref.std() > 1.0
    assert np.abs(out - ref).max() <= 1e-3


def test_greedy_paris(smollm2_jax, smollm2_tokenizer, forward):
    """A simple greedy loop (fixed width with right padding: one compile)."""
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="np")["input_ids"][0]
    n, width = len(prompt), len(prompt) + 3
    ids = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, :n], mask[0, :n] = prompt, 1
    for t in range(n, width):
        logits = forward(smollm2_jax, ids, mask)
        ids[0, t] = int(jnp.argmax(logits[0, t - 1]))
        mask[0, t] = 1
    completion = smollm2_tokenizer.decode(ids[0, n:])
    assert completion.startswith(" Paris"), completion


def test_kv_cache_greedy_matches(smollm2_jax, smollm2_tokenizer, forward):
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    prompt = prompt.astype(np.int32)
    n, S = prompt.shape[1], prompt.shape[1] + 4
    decode = nnx.jit(lambda m, x, p, c, i, k: m.decode(x, p, c, i, k))
    cache = smollm2_jax.init_cache(1, S)
    kv = np.ones((1, S), np.int32)
    logits, cache = decode(smollm2_jax, prompt, np.arange(n, dtype=np.int32)[None], cache, 0, kv)
    ref = np.asarray(forward(smollm2_jax, prompt, np.ones_like(prompt)))
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-3
    tok = int(jnp.argmax(logits[0, -1]))
    assert smollm2_tokenizer.decode([tok]) == " Paris"
    logits, cache = decode(smollm2_jax, np.array([[tok]], np.int32), np.array([[n]], np.int32), cache, n, kv)
    full = np.asarray(
        forward(smollm2_jax, np.concatenate([prompt, [[tok]]], 1), np.ones((1, n + 1), np.int32))
    )
    assert np.abs(np.asarray(logits[0, 0]) - full[0, -1]).max() <= 1e-3


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's convert script: w.reshape(n_head, 2, d_out // n_head // 2, d_in).swapaxes(1, 2)
    rs = np.random.RandomState(0)
    w = rs.randn(12, 5).astype(np.float32)
    permuted = w.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(12, 5)
    np.testing.assert_array_equal(G.unpermute(permuted, 3), w)


def test_gguf_round_trip_through_transformers(tmp_path, smollm2_jax, smollm2_torch, smollm2_tokenizer):
    """save_model of the GGUF-loaded model: transformers loads the HF dir with the same logits,
    quantization_config stripped, tokenizer saved alongside."""
    import json

    import transformers

    out = sga_jax.save_model(smollm2_jax, tmp_path / "smol")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = smollm2_tokenizer("Hello world, how are you?", return_tensors="np")["input_ids"]
    with torch.no_grad():
        a = reloaded(torch.tensor(ids)).logits.numpy()
        b = smollm2_torch(torch.tensor(ids)).logits.numpy()
    assert np.abs(a - b).max() <= 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("The capital")["input_ids"] == smollm2_tokenizer("The capital")["input_ids"]
