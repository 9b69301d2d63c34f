"""Batched greedy decoding with the model's KV cache, jitted once per shape bucket.

Prompts are left-padded to a multiple of ``bucket`` tokens. The default path is continuous
batching (:mod:`sga_jax.eval.continuous`: ``batch_size`` cache rows refilled as rows end). Phi-3
longrope models keep whole batches padded to ``batch_size`` rows, the cache holding ``prompt
bucket + new-token bucket`` slots: one jitted function runs the prefill and a ``lax.while_loop``
over new tokens that stops when every row has emitted EOS or after ``max_new_tokens`` (a traced
value, so different limits do not recompile). Finished rows are filled with the pad id, as
``transformers``' ``generate`` does, so the tokens equal HF greedy output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.data.batching import bucket_length
from sga_jax.errors import ConfigError, DataError
from sga_jax.eval.continuous import continuous_generate
from sga_jax.logprobs import check_positions


@dataclasses.dataclass
class GenerationResult:
    """``tokens[i]``: new token ids of prompt i, up to and including EOS (nothing after it);
    ``texts[i]``: their decoding with special tokens skipped (when a tokenizer was given)."""

    tokens: list[list[int]]
    texts: list[str] | None = None


@nnx.jit(static_argnames=("cache_len", "eos_ids", "pad_id"))
def _greedy(model, input_ids, attention_mask, max_new_tokens, *, cache_len, eos_ids, pad_id):
    b, p = input_ids.shape
    n_out = cache_len - p
    cache = model.init_cache(b, cache_len)
    # Logical positions of a left-padded prompt (HF: cumsum(mask) - 1); padding slots are masked.
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
    kv_mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(attention_mask)
    logits, cache = model.decode(input_ids, positions, cache, 0, kv_mask)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    pos = positions[:, -1] + 1
    out = jnp.full((b, n_out), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    eos = jnp.asarray(eos_ids, jnp.int32)
    limit = jnp.minimum(max_new_tokens, n_out)
    # NNX modules may not cross into the loop's trace level (nnx.scan over stacked layers refuses
    # outer-level tracers): carry the parameters through the loop and rebuild the model inside.
    graphdef, state = nnx.split(model)

    def cond(carry):
        i, _, _, _, _, _, done, _ = carry
        return (i < limit) & ~jnp.all(done)

    def body(carry):
        i, tok, pos, cache, kv_mask, out, done, state = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos)
        kv_mask = kv_mask.at[:, p + i].set(1)
        step_model = nnx.merge(graphdef, state)
        logits, cache = step_model.decode(tok[:, None], pos[:, None], cache, p + i, kv_mask)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return i + 1, nxt, pos + 1, cache, kv_mask, out, done, state

    carry = (jnp.int32(0), tok, pos, cache, kv_mask, out, done, state)
    i, *_, out, done, _ = jax.lax.while_loop(cond, body, carry)
    return out, i


def _eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return (-1,)
    if isinstance(eos_token_id, int | np.integer):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id) or (-1,)


def _checked_lengths(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int, max_length: int | None
) -> list[int]:
    """The prompts' lengths, after one clear error for a bad setting or a prompt with no room."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise DataError(f"prompt {i} is empty")
        if max_length is not None and n >= max_length:
            raise DataError(f"prompt {i} has {n} tokens, no room to generate within max_length={max_length}")
    return lengths


def _check_reach(model: Any, lengths: Sequence[int], max_new_tokens: int, max_length: int | None) -> None:
    """Before any call: the last position fed (prompt + new tokens - 1; the last new token is not
    fed) must lie inside a learned position table (OPT)."""
    new = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - n) for n in lengths]
    reach = max((n + k - 1 for n, k in zip(lengths, new)), default=0)
    check_positions(model, reach, "prompts with their new tokens", "lower max_new_tokens / max_length")


def _longrope_switch(model: Any, longest: int, n_new: int) -> int | None:
    """The number of new tokens after which transformers' Phi-3 drops its cache and recomputes it
    with the long factors (``Phi3ForCausalLM.prepare_inputs_for_generation``: when the input reaches
    ``original_max_position_embeddings + 1`` tokens with a shorter cache), or None."""
    rope = getattr(model.config, "rope", None)
    if getattr(rope, "rope_type", None) != "longrope":
        return None
    switch = rope.original_max_position_embeddings + 1 - longest
    return switch if 1 <= switch <= n_new - 1 else None


def _run(model, rows, n_new, batch_size, p_len, cache_len, cap, eos, pad, calls) -> np.ndarray:
    """One :func:`_greedy` call on left-padded ``rows``: its new tokens ``[batch_size, >= n_new]``."""
    ids, mask = _left_padded(rows, batch_size, p_len, pad)
    cache_len = cache_len if cap is None else min(cache_len, cap)
    out, steps = _greedy(
        model, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(n_new), cache_len=cache_len,
        eos_ids=eos, pad_id=int(pad),
    )  # fmt: skip
    if calls is not None:
        calls.append(("generate", batch_size, p_len, cache_len, int(steps)))
    return np.asarray(out)


def _left_padded(prompts: Sequence[Sequence[int]], rows: int, length: int, pad: int):
    """``(ids, mask)`` ``[rows, length]``: the prompts left-padded (the rows past them all pad)."""
    ids = np.full((rows, length), pad, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = p
        mask[row, length - len(p) :] = 1
    return ids, mask


def _through_eos(seq: list[int], eos: tuple[int, ...]) -> list[int]:
    """``seq`` up to and including its first EOS token (HF keeps the EOS it stopped at)."""
    for j, t in enumerate(seq):
        if t in eos:
            return seq[: j + 1]
    return seq


def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None = None,
    batch_size: int = 16,
    bucket: int = 16,
    max_length: int | None = None,
    tokenizer: Any = None,
    sort_by_length: bool = True,
    progress: Callable[[int], Any] | None = None,
    calls: list[tuple] | None = None,
) -> GenerationResult:
    """Greedy continuations of token-id ``prompts`` (token-identical to ``transformers``'
    ``generate(do_sample=False)`` of each prompt; batches with left padding give the same tokens).

    Continuous batching (:mod:`sga_jax.eval.continuous`): ``batch_size`` cache rows, each refilled
    with the next prompt (shortest first unless ``sort_by_length=False``) once its row ends, so no
    step decodes a finished row. ``max_length``: optional cap on prompt + new tokens (HF's
    ``max_length``; TOFU generates with ``max_length=200``), counted per prompt: each gets
    ``min(max_new_tokens, max_length - its length)`` new tokens, as HF gives a prompt generated
    alone. A prompt that leaves no room raises DataError naming it. Phi-3 longrope models keep
    whole batches (:func:`_batched`: HF's batched ``max_length`` on the longest prompt), since
    HF's short/long factor switch depends on the batch's padded length.
    ``calls``: when a list, each compiled call is appended to it as ``("generate", batch rows,
    prompt length, cache length, decode steps run)`` (what :mod:`sga_jax.eval.flops` counts).
    """
    lengths = _checked_lengths(prompts, max_new_tokens, batch_size, max_length)
    _check_reach(model, lengths, max_new_tokens, max_length)
    eos = _eos_tuple(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos[0] >= 0 else 0)
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(prompts))
    if getattr(getattr(model.config, "rope", None), "rope_type", None) != "longrope":
        new = max_new_tokens
        caps = [new if max_length is None else min(new, max_length - n) for n in lengths]
        tokens = continuous_generate(
            model, [list(p) for p in prompts], caps, order, n_slots=batch_size, bucket=bucket, eos=eos,
            pad=int(pad), progress=progress, calls=calls,
        )  # fmt: skip
    else:  # HF's Phi-3 longrope cache switch depends on the batch's padded length: whole batches
        tokens = _batched(model, prompts, lengths, order, max_new_tokens, batch_size, bucket, max_length,
                          eos, pad, progress, calls)  # fmt: skip
    texts = None if tokenizer is None else tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return GenerationResult(tokens, texts)


def _batched(model, prompts, lengths, order, max_new_tokens, batch_size, bucket, max_length, eos, pad,
             progress, calls) -> list[list[int]]:  # fmt: skip
    """Whole batches of ``batch_size`` prompts, each run to ``min(max_new_tokens, max_length -
    its longest prompt)`` new tokens (HF's batched ``max_length``): the path of Phi-3 longrope
    models, whose cache switch (:func:`_longrope_switch`) is a property of the whole batch."""
    new_bucket = bucket_length(max_new_tokens, bucket)
    # With max_length a batch writes at most p_len + (max_length - longest) <= max_length + bucket - 1
    # cache slots: capped there, every prompt bucket shares one cache length (one compile fewer per
    # bucket) and no step attends to slots that can never be written.
    cap = None if max_length is None else bucket_length(max_length + bucket - 1, bucket)
    tokens: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start : start + batch_size]]
        longest = max(lengths[i] for i in idx)
        p_len = bucket_length(longest, bucket)
        n_new = max_new_tokens if max_length is None else min(max_new_tokens, max_length - longest)
        rows = [list(prompts[i]) for i in idx]
        switch = _longrope_switch(model, longest, n_new)
        if switch is None:
            out = _run(model, rows, n_new, batch_size, p_len, p_len + new_bucket, cap, eos, pad, calls)
        else:  # HF Phi-3 recomputes the cache once the sequence passes original_max_position_embeddings
            first = _run(model, rows, switch, batch_size, p_len, p_len + new_bucket, cap, eos, pad, calls)
            rows = [r + first[k, :switch].tolist() for k, r in enumerate(rows)]
            p2 = bucket_length(longest + switch, bucket)
            rest = _run(model, rows, n_new - switch, batch_size, p2, p2 + new_bucket, None, eos, pad, calls)
            out = np.concatenate([first[:, :switch], rest], axis=1)
        for row, i in enumerate(idx):
            tokens[i] = _through_eos(out[row, :n_new].tolist(), eos)
        if progress is not None:
            progress(len(idx))
    return tokens


def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    add_special_tokens: bool = True,
    **kwargs: Any,
) -> GenerationResult:
    """:func:`greedy_generate` on text prompts (tokenised with ``add_special_tokens``)."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    return greedy_generate(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
