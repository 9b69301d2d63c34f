"""FLOP counts of decoder forwards and of a TOFU evaluation, for time lower bounds.

A decoder forward of ``tokens`` query tokens costs ``2 · tokens · L · P_layer`` for the layer
matmuls (``P_layer`` = q, k, v, o projections + the gated MLP's three matrices), ``2 · lm_head ·
d · V`` for the LM head over ``lm_head`` positions and ``4 · L · n_heads · head_dim · pairs`` for
attention (``q kᵀ`` and ``p v`` over ``pairs`` query-key pairs). Norms, RoPE, softmax and the
activation are a few FLOPs per element and left out (under 2% at SmolLM2-135M's size; the test
compares with XLA's own count of a compiled forward).

Three counts of one evaluation:

* **computed**: what the recorded calls (``calls=`` of :func:`sga_jax.eval.tofu.evaluate_task`)
  ran, padding and dense attention over whole cache lengths included;
* **per sequence** (:func:`sequence_flops`): a full causal forward of every unpadded sequence
  (what scoring each answer on its own costs with no padding);
* **minimal** (:func:`minimal_scoring_flops`, :func:`minimal_generation_flops`): a question's
  prompt run once for all its answers, the LM head only where a scored token is predicted, and
  greedy generation of exactly the tokens each row produced (to its own EOS) on a KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def layer_matmul_params(config: Any) -> int:
    """Weights of one Llama-style decoder layer's matmuls (attention projections + gated MLP)."""
    d, h = config.hidden_size, config.head_dim
    attn = d * config.num_attention_heads * h * 2 + d * config.num_key_value_heads * h * 2
    return attn + 3 * d * config.intermediate_size


def forward_flops(config: Any, tokens: int, pairs: int, lm_head: int | None = None) -> float:
    """FLOPs of ``tokens`` query tokens through the decoder, ``pairs`` attention query-key pairs
    and the LM head on ``lm_head`` positions (default: every token)."""
    lm = tokens if lm_head is None else lm_head
    layers = config.num_layers
    return float(
        2 * tokens * layers * layer_matmul_params(config)
        + 2 * lm * config.hidden_size * config.vocab_size
        + 4 * layers * config.num_attention_heads * config.head_dim * pairs
    )


def sequence_flops(config: Any, lengths: Iterable[int]) -> float:
    """A causal forward of each unpadded sequence (``T`` tokens, ``T(T+1)/2`` pairs, LM head on all)."""
    lengths = list(lengths)
    return forward_flops(config, sum(lengths), sum(t * (t + 1) // 2 for t in lengths))


def minimal_scoring_flops(config: Any, groups: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> float:
    """Scoring with each group's shared prefix run once: ``groups`` of ``(prefix length,
    [(suffix length, scored tokens), ...])``; the LM head only on scored positions."""
    tokens = pairs = lm = 0
    for p, suffixes in groups:
        tokens += p
        pairs += p * (p + 1) // 2
        for s, n in suffixes:
            tokens += s
            pairs += s * p + s * (s + 1) // 2
            lm += n
    return forward_flops(config, tokens, pairs, lm)


def minimal_generation_flops(config: Any, rows: Iterable[tuple[int, int]]) -> float:
    """Greedy generation of ``(prompt length, new tokens)`` per row on a KV cache: the prompt's
    prefill, then one token per further new token, each attending to its context; the LM head on
    the positions that produce a new token."""
    tokens = pairs = lm = 0
    for p, g in rows:
        tokens += p + max(g - 1, 0)
        pairs += p * (p + 1) // 2 + sum(p + j + 1 for j in range(max(g - 1, 0)))
        lm += g
    return forward_flops(config, tokens, pairs, lm)


def calls_flops(config: Any, calls: Iterable[tuple]) -> dict[str, float]:
    """FLOPs of recorded calls by kind: ``("forward", B, T)`` (a dense ``T×T`` forward),
    ``("prefill", B, P, C)`` and ``("suffix", B, T, C)`` (``T`` tokens attending to a ``C``-slot
    cache, dense), ``("generate", B, P, C, steps)`` (a prefill of ``P`` + ``steps`` one-token
    decodes, all over ``C`` slots, with logits at every prefill position as ``model.decode`` does)."""
    out: dict[str, float] = {}
    for call in calls:
        kind, b = call[0], call[1]
        if kind == "forward":
            t = call[2]
            f = forward_flops(config, b * t, b * t * t)
        elif kind in ("prefill", "suffix"):
            t, c = call[2], call[3]
            f = forward_flops(config, b * t, b * t * c)
        elif kind == "generate":
            p, c, steps = call[2], call[3], call[4]
            f = forward_flops(config, b * p, b * p * c) + forward_flops(config, b * steps, b * steps * c)
        else:
            raise ValueError(f"unknown call kind {kind!r}")
        out[kind] = out.get(kind, 0.0) + f
    return out
