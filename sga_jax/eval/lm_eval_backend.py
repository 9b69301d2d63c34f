"""An lm-evaluation-harness model backend on sga_jax models: ``--model sga_jax`` (lm-eval 0.4.13).

``pip install "sga-jax[lm_eval]"``: an optional extra, never a runtime dependency. lm-eval 0.4.13
imports no torch on this path (its ``hf`` backend does; ``lm_eval/evaluator.py`` only for several ranks).

The class :class:`SgaJaxLM` answers lm-eval's three request types the way lm-eval's own Hugging
Face backend (``HFLM``, ``lm_eval/models/huggingface.py`` of lm-eval 0.4.13) does, so that the two
give the same numbers on the same folder:

* tokenisation: ``tok_encode`` follows ``HFLM.tok_encode`` (l. 1040-1063: the tokenizer's own
  special-token default unless ``add_bos_token`` is given, none added to a string that already
  starts with the prefix token); the context / continuation split is lm-eval's
  ``TemplateLM.loglikelihood`` / ``TemplateLM._encode_pair`` (``lm_eval/api/model.py``
  l. 393-472), inherited unchanged: context + continuation are encoded whole and the continuation
  is what follows the context's own encoding; an empty context becomes the prefix token
  (``HFLM.prefix_token_id``, l. 611-617: BOS, else EOS).
* ``loglikelihood``: ``HFLM._loglikelihood_tokens`` (l. 1329-1572): the model reads
  ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation), the continuation's
  log-probabilities are summed, and ``is_greedy`` says whether every continuation token is the
  argmax. Requests whose model input is the same token list share one forward pass (HFLM's
  one-token-continuation logits cache, l. 1350-1364: MMLU's " A"/" B"/" C"/" D").
* ``loglikelihood_rolling``: ``HFLM.loglikelihood_rolling`` (l. 1226-1310): disjoint windows of
  ``lm_eval.utils.get_rolling_token_windows`` (prefix token, ``max_length``, context 1), scored
  like loglikelihood (through the chunked log-prob kernel: no ``[T, V]`` logits) and summed.
* ``generate_until``: ``HFLM.generate_until`` (l. 1574-1716): stop strings plus the EOS text
  (``handle_stop_sequences``), contexts left-truncated to ``max_length - max_gen_toks``, greedy
  decoding through :func:`sga_jax.eval.generate.greedy_generate` (the KV-cache decoder,
  token-identical to ``transformers``' ``generate``), decoded without special tokens and cut at the
  first stop string (``postprocess_generated_text``). Only greedy decoding: a request asking for
  sampling is answered greedily, with a warning.

lm-eval 0.4.13 discovers no plugin models (``lm_eval/api/registry.py``: the fixed ``MODEL_MAPPING``
of ``lm_eval/models/__init__.py``, or ``register_model`` at import), so importing this module
registers ``sga_jax``; ``python -m sga_jax.eval.lm_eval_backend <lm_eval arguments>`` is lm-eval's
own CLI with it registered. :func:`run_lm_eval` is the Python entry point.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sga_jax import kernels
from sga_jax.data.batching import bucket_length
from sga_jax.data.jsonl import write_json_atomic
from sga_jax.errors import ConfigError
from sga_jax.eval.generate import greedy_generate

try:  # the optional extra: without it the module still imports, and run_lm_eval says what to install
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised by the missing-extra test through _require_lm_eval
    TemplateLM = object  # type: ignore[assignment,misc]
    register_model = None

log = logging.getLogger(__name__)

MODEL_NAME = "sga_jax"
INSTALL_HINT = 'lm-eval is not installed: pip install "sga-jax[lm_eval]" (lm-eval==0.4.13)'


def _require_lm_eval() -> Any:
    """The ``lm_eval`` package, or one ConfigError naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401 - the part this module builds on
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


# ----------------------------------------------------------------------------- jitted scoring


@nnx.jit(static_argnames=("greedy",))
def _window_scores(model, ids, mask, positions, targets, tmask, *, greedy: bool):
    """Summed log-probabilities ``[B, K]`` and whether each is all-argmax ``[B, K]``.

    ``ids``/``mask`` ``[B, T]``: right-padded model inputs. ``positions [B, C]``: the positions whose
    outputs predict the continuation (the last ``C`` of each row). ``targets``/``tmask``
    ``[B, K, C]``: up to ``K`` continuations that share a row, right-aligned in the window.
    ``greedy``: full float32 logits of the ``C`` window (argmax needs the whole vocabulary);
    otherwise the chunked kernel (``K = 1``: rolling windows, which discard ``is_greedy``).
    """
    hidden = model.hidden_states(ids, attention_mask=mask)
    h = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)  # [B, C, d]
    on = tmask.astype(bool)
    if greedy:
        logits = model._logits(h)  # the model's own head: bias and final soft-cap (Gemma 2) included
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, C, V]
        picked = jnp.take_along_axis(logp[:, None], targets[..., None], axis=-1)[..., 0]  # [B, K, C]
        hit = jnp.argmax(logits, axis=-1)[:, None] == targets
        total = jnp.sum(jnp.where(on, picked, 0.0), axis=-1)
        return total, jnp.all(hit | ~on, axis=-1)
    (weight, bias), (b, c, d) = model.lm_head_weights(), h.shape
    labels = jnp.where(on[:, 0], targets[:, 0], 0).reshape(-1)
    softcap = getattr(model, "logit_softcap", None)  # Gemma 2's final soft-cap, as logprobs.token_logprobs
    logp = kernels.token_logprobs(h.reshape(b * c, d), weight.astype(h.dtype), labels, bias, softcap=softcap)
    logp = logp.reshape(b, 1, c)
    return jnp.sum(jnp.where(on, logp, 0.0), axis=-1), jnp.zeros(on.shape[:2], bool)


def _model_inputs(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """What the model reads for one request (HFLM l. 1431-1435): the whole sequence left-truncated
    to ``max_length + 1`` tokens, less its last token (no position predicts past the end)."""
    return (list(context) + list(continuation))[-(max_length + 1) :][:-1]


def _group_rows(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, share: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """``(rows, members)``: the distinct model inputs and, per row, the requests scored on it.
    With ``share`` requests with the same input share a row (one forward pass for all of them)."""
    rows: list[list[int]] = []
    members: list[list[int]] = []
    seen: dict[tuple[int, ...], int] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ConfigError(
                f"request {i}: empty context or continuation tokens (lm-eval never sends these)"
            )
        if len(cont) > max_length:
            raise ConfigError(
                f"request {i}: a {len(cont)}-token continuation exceeds max_length={max_length}"
            )
        inp = _model_inputs(ctx, cont, max_length)
        key = tuple(inp)
        if share and key in seen:
            members[seen[key]].append(i)
            continue
        seen[key] = len(rows)
        rows.append(inp)
        members.append([i])
    return rows, members


def _pow2(n: int) -> int:
    """``n`` rounded up to a power of two (few distinct K shapes: few compiles)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _score_batch(model, rows, conts, batch_size, pad_id, bucket, greedy, sharding):
    """One :func:`_window_scores` call: ``rows`` (model inputs) and, per row, the continuations
    scored on it; returns per row a list of ``(logprob, is_greedy)``."""
    longest = max(len(r) for r in rows)
    # Padded to a multiple of `bucket`, or of an eighth of the next power of two for long rows (at
    # most 1/8 padding): MMLU's 5-shot prompts then take ~20 shapes up to 2048 tokens, not 64 compiles.
    t = bucket_length(longest, max(bucket, _pow2(longest) // 8))
    c = min(bucket_length(max(len(x) for cs in conts for x in cs), 8 if greedy else bucket), t)
    k = _pow2(max(len(cs) for cs in conts))
    ids = np.full((batch_size, t), pad_id, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    mask[:, 0] = 1  # padding rows read one token: no all-masked row (NaN), and they score nothing
    pos = np.zeros((batch_size, c), np.int32)
    tgt = np.zeros((batch_size, k, c), np.int32)
    tmask = np.zeros((batch_size, k, c), np.int32)
    for b, (row, cs) in enumerate(zip(rows, conts)):
        n = len(row)
        ids[b, :n] = row
        mask[b, :n] = 1
        # Output n-1 predicts the last continuation token; the window ends there.
        pos[b] = np.clip(np.arange(n - c, n), 0, None)
        for j, cont in enumerate(cs):
            tgt[b, j, c - len(cont) :] = cont
            tmask[b, j, c - len(cont) :] = 1
    arrays = [jnp.asarray(a) for a in (ids, mask, pos, tgt, tmask)]
    if sharding is not None:
        arrays = [jax.device_put(a, sharding) for a in arrays]
    total, hit = _window_scores(model, *arrays, greedy=greedy)
    total, hit = np.asarray(total, np.float64), np.asarray(hit)
    return [[(float(total[b, j]), bool(hit[b, j])) for j in range(len(cs))] for b, cs in enumerate(conts)]


def score_continuations(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    pad_id: int,
    batch_size: int = 8,
    bucket: int = 32,
    greedy: bool = True,
    sharding: Any = None,
    progress: Callable[[int], Any] | None = None,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` for token-id ``(context, continuation)``
    pairs, as lm-eval's ``HFLM._loglikelihood_tokens`` computes them (module docstring).

    Rows are sorted by length and run ``batch_size`` at a time, padded to a multiple of ``bucket``
    tokens, coarser past 256 (every batch has ``batch_size`` rows: one compile per length bucket).
    ``greedy=False`` skips the argmax (``is_greedy`` is then False) and never forms ``[T, V]`` logits.
    ``progress(n)`` is called as requests are scored (a tqdm bar's ``update``).
    """
    rows, members = _group_rows(pairs, max_length, share=greedy)
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = [int(i) for i in order[start : start + batch_size]]
        conts = [[list(pairs[m][1]) for m in members[i]] for i in idx]
        scores = _score_batch(
            model, [rows[i] for i in idx], conts, batch_size, pad_id, bucket, greedy, sharding
        )
        for i, row_scores in zip(idx, scores):
            for m, s in zip(members[i], row_scores):
                out[m] = s
            if progress is not None:
                progress(len(members[i]))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- model arguments


def _parse_mesh(spec: str | None) -> Any:
    """``fsdp:2`` / ``data:2+fsdp:4`` / ``tensor:2`` (``+`` or ``;`` between axes: lm-eval splits
    model_args on commas) -> a :func:`sga_jax.models.sharding.make_mesh` mesh, or None."""
    if spec in (None, "", "none", "None"):
        return None
    from sga_jax.models.sharding import AXES, make_mesh

    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in str(spec).replace(";", "+").split("+"):
        name, _, value = part.strip().partition(":")
        if name not in AXES or not value.lstrip("-").isdigit():
            raise ConfigError(f"mesh={spec!r}: expected axis:size items joined by '+', axes {AXES}")
        sizes[name] = int(value)
    # The first data x fsdp x tensor devices: `fsdp:2` on an 8-device host uses two of them.
    n = int(np.prod([max(v, 1) for v in sizes.values()]))
    devices = jax.devices()[:n] if -1 not in sizes.values() else None
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)


def _as_bool(value: Any, name: str) -> bool | None:
    """lm-eval hands model_args over as strings or already parsed; None stays None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "1", "yes", "false", "0", "no"):
        raise ConfigError(f"{name}={value!r} is not true or false")
    return text in ("true", "1", "yes")


def _as_batch_size(value: Any) -> int:
    """A whole positive batch size (``auto`` is HFLM's memory probe, which a jitted model does not need)."""
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return 8
    n = int(value) if str(value).strip().isdigit() else 0
    if n < 1:
        raise ConfigError(f"batch_size must be a positive whole number, got {value!r}")
    return n


def _default_max_length(hf: dict[str, Any], tokenizer: Any) -> int:
    """HFLM's ``max_length`` (``lm_eval.models.utils.resolve_max_length``): the text config's
    ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the tokenizer's
    ``model_max_length`` when set, else 2048."""
    from lm_eval.models.utils import DEFAULT_MAX_LENGTH, TOKENIZER_INFINITY

    cfg = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else hf
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n is not None and n != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def _generation_eos(path: str, hf: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    """The ids ``transformers``' ``generate`` stops at: ``generation_config.json``'s
    ``eos_token_id`` when the folder has one, else the config's, else the tokenizer's."""
    gen = Path(path) / "generation_config.json"
    first = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = next((e for e in (first, hf.get("eos_token_id"), tokenizer.eos_token_id) if e is not None), [])
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


# ----------------------------------------------------------------------------- the backend


class SgaJaxLM(TemplateLM):  # type: ignore[misc,valid-type]
    """lm-eval's LM API on an sga_jax model (module docstring). ``model_args``:

    ``pretrained`` (an HF folder or ``.gguf`` file, as :func:`sga_jax.models.hf.load_model`
    reads it), ``tokenizer`` (default: ``pretrained``), ``batch_size`` (default 8), ``max_length``
    (default as HFLM's), ``max_gen_toks`` (default 256, HFLM's), ``dtype`` (default float32),
    ``mesh`` (e.g. ``fsdp:2``, ``data:2+tensor:2``: parameters sharded as in training, batches
    over data x fsdp), ``add_bos_token`` (as HFLM's), ``bucket`` (padding multiple, default 32).
    lm-eval's own ``device`` / ``max_batch_size`` are accepted and ignored (JAX places the arrays).
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str,
        *,
        tokenizer: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        dtype: str = "float32",
        mesh: str | None = None,
        add_bos_token: bool | str | None = None,
        bucket: int | str = 32,
        **ignored: Any,
    ) -> None:
        _require_lm_eval()
        super().__init__()
        from sga_jax.models.hf import load_model, load_tokenizer
        from sga_jax.models.sharding import batch_sharding

        unknown = sorted(k for k in ignored if k not in ("device", "max_batch_size"))
        if unknown:
            raise ConfigError(f"unknown sga_jax model_args {unknown}")
        self._mesh = _parse_mesh(mesh)
        self._batch_size = _as_batch_size(batch_size)
        if self._mesh is not None:
            rows = self._mesh.shape["data"] * self._mesh.shape["fsdp"]
            if self._batch_size % rows:
                raise ConfigError(f"batch_size={self._batch_size} must be a multiple of data x fsdp = {rows}")
        self._sharding = None if self._mesh is None else batch_sharding(self._mesh)
        self.model = load_model(pretrained, dtype=dtype, mesh=self._mesh, scan_layers=False)
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        hf = self.model.config.hf  # the checkpoint's config.json (a GGUF's, translated)
        self.pretrained = str(pretrained)
        self._max_length = int(max_length) if max_length else _default_max_length(hf, self.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self._bucket = int(bucket)
        self._eos = _generation_eos(pretrained, hf, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    # --- lm-eval's properties (HFLM l. 593-665) ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under ``config`` in its results."""
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
        return {
            "model_num_parameters": n,
            "model_dtype": str(self.model.dtype),
            "pretrained": self.pretrained,
        }

    # --- tokenisation ------------------------------------------------------------------------
    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **_: Any,
    ) -> list[int]:
        """HFLM.tok_encode (l. 1040-1063): an explicit ``add_special_tokens`` wins, then
        ``add_bos_token``, then the tokenizer's default; none added to a string that already
        starts with the prefix token's text. Left-truncated to ``left_truncate_len`` tokens."""
        kwargs: dict[str, Any] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **kwargs))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The tokenizer's chat template as text (``--apply_chat_template``), as HFLM's (l. 1718-1743)."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- requests ----------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """TemplateLM's hook: ``[((context, continuation), context ids, continuation ids)]``."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = self._score(pairs, greedy=True, quiet=disable_tqdm)
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def _score(self, pairs, *, greedy: bool, quiet: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(pairs), disable=quiet, desc="sga_jax loglikelihood requests") as bar:
            return score_continuations(
                self.model, pairs, max_length=self.max_length, pad_id=self._pad, batch_size=self.batch_size,
                bucket=self._bucket, greedy=greedy, sharding=self._sharding, progress=bar.update,
            )  # fmt: skip

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over every token of each string (HFLM l. 1226-1310): disjoint rolling
        windows of ``max_length`` tokens, the first conditioned on the prefix token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for w in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows, greedy=False, quiet=disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the request's stop strings (HFLM l. 1574-1716); requests are
        run in groups of equal generation arguments, as HFLM's ``Collator(group_by="gen_kwargs")``."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            contexts = [requests[i].args[0] for i in idx]
            for i, text in zip(idx, self._generate(contexts, requests[idx[0]].args[1])):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        from lm_eval.models import utils as lm_utils  # normalize_gen_kwargs and the stop-string helpers

        kwargs = lm_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        eos_text = self.tok_decode(self.eot_token_id, False)
        until = lm_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        if kwargs.get("do_sample"):
            log.warning("sga_jax generates greedily; ignoring do_sample / temperature in %s", gen_kwargs)
        max_ctx = self.max_length - max_gen
        if max_ctx <= 0:
            raise ConfigError(
                f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}"
            )
        prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
        tokens = _greedy_until(self, prompts, max_gen, until)
        return [lm_utils.postprocess_generated_text(self.tok_decode(t), until, None) for t in tokens]


def _greedy_until(lm: SgaJaxLM, prompts: list[list[int]], max_gen: int, until: list[str]) -> list[list[int]]:
    """New tokens of each prompt, generated greedily up to ``max_gen`` tokens or EOS.

    HF's generate stops a batch once every row shows a stop string; the KV-cache decoder only knows
    EOS. So decoding runs in rounds of doubling length (32, 64, ... max_gen tokens): a prompt whose
    text already shows a stop string, or that ended, is done; only the rest run again, longer.
    Greedy decoding makes each round's tokens a prefix of the next's, so the text up to the first
    stop string is the same as one run of ``max_gen`` tokens, at most about twice the needed work.
    """
    out: list[list[int]] = [[] for _ in prompts]
    pending = list(range(len(prompts)))
    n = min(max_gen, 32)
    while pending:
        res = greedy_generate(
            lm.model, [prompts[i] for i in pending], max_new_tokens=n, eos_token_id=lm._eos or None,
            pad_token_id=lm._pad, batch_size=lm.batch_size, bucket=lm._bucket,
        )  # fmt: skip
        again = []
        for i, toks in zip(pending, res.tokens):
            out[i] = toks
            ended = len(toks) < n or (toks and toks[-1] in lm._eos)
            if not ended and n < max_gen and not any(s and s in lm.tok_decode(toks) for s in until):
                again.append(i)
        pending, n = again, min(2 * n, max_gen)
    return out


# ----------------------------------------------------------------------------- entry points


def _flat_results(results: dict[str, Any]) -> dict[str, Any]:
    """``{"task/metric": value}`` from lm-eval's ``results["results"]`` (its "acc,none" keys: the
    metric, then the filter; "none" dropped), numbers only; group rows included."""
    flat: dict[str, Any] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric if filt in ('', 'none') else f'{metric},{filt}'}"] = value
    return flat


def run_lm_eval(
    model_path: str | Path,
    tasks: list[str],
    *,
    out_dir: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    **model_args: Any,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` with the sga_jax backend.

    Returns ``{f"{task}/{metric}": value}`` (e.g. ``"mmlu/acc"``, ``"wmdp_bio/acc_stderr"``). With
    ``out_dir`` lm-eval's full results dict is written atomically to ``out_dir/lm_eval_results.json``
    (with per-sample records when ``log_samples``). ``include_path``: a folder of extra task YAMLs
    (lm-eval's ``TaskManager(include_path=...)``). ``model_args``: see :class:`SgaJaxLM`.
    Raises ConfigError when lm-eval is not installed, or a task name is unknown.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str) or not tasks:
        raise ConfigError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval tasks {unknown} (list them: lm-eval ls tasks)")
    lm = SgaJaxLM(str(model_path), batch_size=batch_size, **model_args)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=log_samples, batch_size=batch_size,
    )  # fmt: skip
    if results is None:  # lm-eval returns None on ranks other than 0
        return {}
    if out_dir is not None:
        from lm_eval.utils import handle_non_serializable

        write_json_atomic(
            results, Path(out_dir) / "lm_eval_results.json", indent=2, default=handle_non_serializable
        )
    return _flat_results(results)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sga_jax.eval.lm_eval_backend <lm_eval arguments>``: lm-eval's own command line
    (``lm_eval.__main__.cli_evaluate``) with ``--model sga_jax`` registered."""
    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if register_model is not None and __name__ != "__main__":
    # The lm-eval registry auto-loads its own models only while it is empty (get_model): load them
    # first, or registering ours would hide "hf", "vllm", ... from this process.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(SgaJaxLM)


if __name__ == "__main__":
    # Run as a script this file is __main__: import it under its own name, which registers the backend.
    from sga_jax.eval.lm_eval_backend import main as _main

    _main()
