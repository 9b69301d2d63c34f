"""The real Gemma-3-270M (base, Q4_K_M GGUF: Q4_K / Q6_K / Q5_0 / Q8_0 tensors): sga_jax's own GGUF
path (gemma3 architecture, norms stored as 1 + w, QK-norm, 5:1 local / global layers, two rope
bases) vs transformers' own GGUF loader, and the torch-less Gemma tokenizer vs transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import sga_jax
from sga_jax.models.gguf_tokenizer import load_gguf_tokenizer
from sga_jax.paths import gemma3_270m_gguf

TEXTS = [
    "The capital of France is",
    "  two  spaces, Ünïcödé 東京 😀 1234567",
    "<start_of_turn>user\nHi<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def path():
    return gemma3_270m_gguf()


@pytest.fixture(scope="module")
def ours(path):
    return load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def model(path):
    return sga_jax.load_model(path, dtype="float32", scan_layers=True)


def test_tokenizer_matches_transformers(path, ours):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(ours) == len(ref) == 262144 and ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens_map == ref.special_tokens_map
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_logits_match_transformers_gguf_and_greedy(path, model, ours):
    import transformers

    c = model.config
    assert (c.num_layers, c.hidden_size, c.head_dim, c.sliding_window) == (18, 640, 256, 512)
    assert sum(c.sliding_layers) == 15 and (c.rope.theta, c.rope_local.theta) == (1e6, 1e4)
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ids = ours("The quick brown fox jumps over the lazy dog near the river bank.", return_tensors="np")
    ids = ids["input_ids"].astype(np.int32)
    forward = nnx.jit(lambda m, x, a: m(x, a))
    with torch.no_grad():
        ref = tm.eval()(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    out = np.asarray(forward(model, ids, np.ones_like(ids)))
    assert ref.std() > 1.0
    assert np.abs(out - ref).max() <= 1e-3
    # Greedy completion (a base model: "The capital of France is" continues " the capital of"):
    # token for token the one transformers' model picks.
    prompt = ours("The Eiffel Tower is in the city of", return_tensors="np")["input_ids"][0]
    n, width = len(prompt), len(prompt) + 3
    seq = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    seq[0, :n], mask[0, :n] = prompt, 1
    for t in range(n, width):
        seq[0, t] = int(np.argmax(np.asarray(forward(model, seq, mask))[0, t - 1]))
        with torch.no_grad():
            want = tm(torch.tensor(seq[:, :t], dtype=torch.long)).logits[0, -1].argmax()
        assert seq[0, t] == int(want), ours.decode(seq[0, n : t + 1])
        mask[0, t] = 1
    print("completion:", repr(ours.decode(seq[0, n:])))
