"""Continuous batching for greedy decoding: a fixed-shape KV cache of ``B`` rows (slots), each
row at its own cache position, refilled with the next prompts as rows finish.

A slot finishes at EOS or at its own cap (``max_new_tokens``, or ``max_length`` minus its own
prompt length), so the batch stops decoding finished rows instead of carrying them to the longest
row's end. Refills are batched: the decode loop (:func:`_decode`) runs until at least a quarter of
the slots are free (or all rows are done), then the free slots' new prompts are prefilled
together (:func:`_refill`). Refilling one row at a time with one-row prefills ate the gain of an
earlier attempt (about 10% faster only): a prefill's cost is nearly the same for 1 row as for 16
on a CPU, and each refill round trip stops the decode loop.

Each row's tokens equal ``transformers``' greedy ``generate`` of that prompt alone (HF's
``_sample`` with ``do_sample=False``: argmax of the last position's logits, fed back one token at
a time; ``max_length`` counts the prompt's own tokens, as for a batch of one): a row is left-padded
into slots ``[0, P)`` of its cache row, its padding masked out of every query, its positions the
logical ``cumsum(mask) - 1`` (HF's ``position_ids`` for left padding), and new tokens written at
its own slot ``P, P + 1, ...`` (:func:`sga_jax.models.attention.write_cache` per row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.data.batching import bucket_length


def prefill_last_logits(model: Any, ids: jax.Array, mask: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """``(logits [F, V] of the last position, cache)`` of left-padded prompts ``[F, P]`` in slots
    ``[0, P)``, as one decode of all ``P`` tokens. Running the first ``P - 1`` without logits and
    the last alone saves the LM head on ``P - 1`` positions (about 1 s per TOFU split on 2 CPUs)
    but puts a second copy of the model into the refill program; it was tried and dropped, though
    its compile cost was not measured apart from the rest (the refill and the decode loop compile
    about 4 s each on 2 loaded CPUs either way)."""
    p = ids.shape[1]
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    kv_mask = jnp.zeros((ids.shape[0], jax.tree.leaves(cache)[0].shape[-3]), jnp.int32).at[:, :p].set(mask)
    logits, cache = model.decode(ids, positions, cache, 0, kv_mask)
    return logits[:, -1], cache


def _scatter_rows(full: jax.Array, part: jax.Array, slots: jax.Array) -> jax.Array:
    """``part [(L,) F, P, ...]`` into rows ``slots`` (out of range: dropped), slots ``[0, P)``."""
    if full.ndim == 5:  # scanned layers: [L, B, S, kv heads, head dim]
        return full.at[:, slots, : part.shape[2]].set(part, mode="drop")
    return full.at[slots, : part.shape[1]].set(part, mode="drop")


@nnx.jit
def _refill(model, cache, kv_mask, slot_state, slots, ids, mask, caps):
    """Prefill prompts ``ids [F, P]`` into cache rows ``slots [F]`` (padding rows name slot ``B``
    and are dropped) and reset those slots' state: first token, position, write slot, count, cap."""
    f, p = ids.shape
    logits, part = prefill_last_logits(model, ids, mask, model.init_cache(f, p))
    cache = jax.tree.map(lambda c, n: _scatter_rows(c, n, slots), cache, part)
    row_mask = jnp.zeros((f, kv_mask.shape[1]), kv_mask.dtype).at[:, :p].set(mask)
    kv_mask = kv_mask.at[slots].set(row_mask, mode="drop")
    tok, pos, wpos, n, cap = slot_state
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    last_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)  # the logical position of the next token
    new = (first, last_pos, jnp.full((f,), p, jnp.int32), jnp.zeros((f,), jnp.int32), caps)
    slot_state = tuple(a.at[slots].set(b, mode="drop") for a, b in zip((tok, pos, wpos, n, cap), new))
    return cache, kv_mask, slot_state


@nnx.jit(static_argnames=("eos_ids",))
def _decode(model, cache, kv_mask, slot_state, out, min_free, *, eos_ids):
    """Decode every live slot one token per step until ``min_free`` slots are free or none is live.

    A slot is live while ``n < cap``; each step records its current token at ``out[b, n]``, ends the
    row at EOS or at its cap (HF keeps the EOS it stopped at), and feeds the token at the row's own
    write slot. Returns the updated cache, mask, state, ``out`` and the steps run."""
    b, c = kv_mask.shape
    rows = jnp.arange(b)
    eos = jnp.asarray(eos_ids, jnp.int32)
    graphdef, state = nnx.split(model)  # carried through the loop (see generate._greedy)

    def cond(carry):
        _, _, (_, _, _, n, cap), _, _, _ = carry
        live = n < cap
        return (jnp.sum(~live) < min_free) & jnp.any(live)

    def body(carry):
        cache, kv_mask, (tok, pos, wpos, n, cap), out, steps, state = carry
        live = n < cap
        col = jnp.minimum(n, out.shape[1] - 1)
        out = out.at[rows, col].set(jnp.where(live, tok, out[rows, col]))
        n = n + live
        cap = jnp.where(live & jnp.isin(tok, eos), n, cap)
        feed = n < cap  # rows whose next token is wanted
        w = jnp.minimum(wpos, c - 1)
        kv_mask = kv_mask.at[rows, w].set(jnp.where(feed, 1, kv_mask[rows, w]))
        logits, cache = nnx.merge(graphdef, state).decode(tok[:, None], pos[:, None], cache, w, kv_mask)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        tok, pos, wpos = jnp.where(feed, nxt, tok), pos + feed, wpos + feed
        return cache, kv_mask, (tok, pos, wpos, n, cap), out, steps + 1, state

    carry = (cache, kv_mask, slot_state, out, jnp.int32(0), state)
    cache, kv_mask, slot_state, out, steps, _ = jax.lax.while_loop(cond, body, carry)
    return cache, kv_mask, slot_state, out, steps


def _refill_batch(free: list[int], queue: list[int], prompts, caps, n_slots: int, bucket: int, pad: int):
    """``(slots, ids, mask, caps, prompt ids)`` for the next prompts into ``free`` slots, the rows
    padded to a power of two (at most ``n_slots``: few compiled shapes), padding rows naming slot
    ``n_slots`` (dropped by the scatter)."""
    take = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
    f = min(n_slots, 1 << (len(take) - 1).bit_length())
    p = bucket_length(max(len(prompts[i]) for i in take), bucket)
    ids = np.full((f, p), pad, np.int32)
    mask = np.zeros((f, p), np.int32)
    slots = np.full((f,), n_slots, np.int32)
    cap = np.zeros((f,), np.int32)
    for r, i in enumerate(take):
        ids[r, p - len(prompts[i]) :] = prompts[i]
        mask[r, p - len(prompts[i]) :] = 1
        slots[r], cap[r] = free[r], caps[i]
    return slots, ids, mask, cap, take


def continuous_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    caps: Sequence[int],
    order: Sequence[int],
    *,
    n_slots: int,
    bucket: int,
    eos: tuple[int, ...],
    pad: int,
    progress: Callable[[int], Any] | None = None,
    calls: list[tuple] | None = None,
) -> list[list[int]]:
    """New tokens of each prompt (through its EOS, at most ``caps[i]``), prompts taken in ``order``.
    ``calls`` gets ``("generate", F, P, P, 0)`` per refill prefill and ``("generate", B, 0, C,
    steps)`` per decode run (:func:`sga_jax.eval.flops.calls_flops`)."""
    n_slots = max(1, min(n_slots, len(prompts)))
    p_max = bucket_length(max(len(p) for p in prompts), bucket)
    # Not rounded further (tried: a multiple of 64 slots, to share one compiled decode loop across
    # TOFU's splits, made the study's generation slower: 192 slots instead of 144 on every step).
    c = p_max + bucket_length(max(caps), bucket)
    cache = model.init_cache(n_slots, c)
    kv_mask = jnp.zeros((n_slots, c), jnp.int32)
    z = jnp.zeros((n_slots,), jnp.int32)
    slot_state = (z, z, z, z, z)
    out = jnp.zeros((n_slots, max(caps)), jnp.int32)
    owner = [-1] * n_slots
    queue = [int(i) for i in order]
    tokens: list[list[int]] = [[] for _ in prompts]
    while True:
        n, cap = (np.asarray(a) for a in slot_state[3:])
        free = [b for b in range(n_slots) if n[b] >= cap[b]]
        done = [b for b in free if owner[b] >= 0]
        if done:
            got = np.asarray(out)
            for b in done:
                tokens[owner[b]], owner[b] = got[b, : n[b]].tolist(), -1
            if progress is not None:
                progress(len(done))
        if queue:
            slots, ids, mask, cap_rows, take = _refill_batch(free, queue, prompts, caps, n_slots, bucket, pad)
            cache, kv_mask, slot_state = _refill(
                model, cache, kv_mask, slot_state, jnp.asarray(slots), jnp.asarray(ids),
                jnp.asarray(mask), jnp.asarray(cap_rows),
            )  # fmt: skip
            for r, i in enumerate(take):
                owner[int(slots[r])] = i
            if calls is not None:
                calls.append(("generate", ids.shape[0], ids.shape[1], ids.shape[1], 0))
        elif len(free) == n_slots:
            return tokens
        min_free = max(1, n_slots // 4) if queue else n_slots
        cache, kv_mask, slot_state, out, steps = _decode(
            model, cache, kv_mask, slot_state, out, jnp.int32(min_free), eos_ids=eos
        )
        if calls is not None:
            calls.append(("generate", n_slots, 0, c, int(steps)))
