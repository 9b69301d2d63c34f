"""FLOP counts of sga_jax.eval.flops against XLA's own count of the compiled computation."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.eval import flops

# Large enough that the matmuls dominate the elementwise work XLA also counts (norms, softmax, RoPE);
# LM head and attention are each over 10% of the total, so leaving either term out fails.
CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = write_tiny_hf("llama", tmp_path_factory.mktemp("flops") / "llama", **CONFIG)
    return sga_jax.load_model(path, scan_layers=False)


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_forward_flops_match_xla(model):
    graphdef, state = nnx.split(model)
    b, t = 2, 128
    ids = jnp.ones((b, t), jnp.int32)
    got = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, ids)
    want = flops.forward_flops(model.config, b * t, b * t * t)  # XLA computes the dense T x T scores
    assert want == pytest.approx(got, rel=0.03)
    parts = {
        "attention": want - flops.forward_flops(model.config, b * t, 0),
        "lm head": want - flops.forward_flops(model.config, b * t, b * t * t, lm_head=0),
    }
    for name, part in parts.items():
        assert part / want > 0.1, name


def test_decode_step_flops_match_xla(model):
    """One decode step of B tokens over a C-slot cache, as calls_flops counts a generation step."""
    graphdef, state = nnx.split(model)
    b, c = 4, 96
    cache = model.init_cache(b, c)
    tok, pos, kv = jnp.ones((b, 1), jnp.int32), jnp.full((b, 1), 40, jnp.int32), jnp.ones((b, c), jnp.int32)
    got = xla_flops(lambda s, k: nnx.merge(graphdef, s).decode(tok, pos, k, 40, kv)[0], state, cache)
    want = flops.calls_flops(model.config, [("generate", b, 0, c, 1)])["generate"]
    assert want == pytest.approx(got, rel=0.03)


def test_minimal_counts_are_below_per_sequence():
    cfg = SimpleNamespace(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    # 2 answers of 30 and 40 tokens after a 20-token shared prompt (scored: the answer tokens)
    per_seq = flops.sequence_flops(cfg, [50, 60])
    shared = flops.minimal_scoring_flops(cfg, [(20, [(30, 29), (40, 39)])])
    assert shared < per_seq
    # no shared prefix and the LM head everywhere: the same as scoring each sequence on its own
    assert flops.minimal_scoring_flops(cfg, [(0, [(50, 50), (60, 60)])]) == per_seq
    # a generated row: its prompt + g tokens equals a causal forward of p + g - 1 tokens
    assert flops.minimal_generation_flops(cfg, [(20, 5)]) == flops.forward_flops(
        cfg, 24, 24 * 25 // 2, lm_head=5
    )
