"""Logits parity of the Flax ports with HF transformers (PyTorch) on tiny random checkpoints.

Every config variant of issue 2, with right and left padding (only real-token positions compared),
float32 within 1e-4 (rope_theta 1e4 and 5e5); bfloat16 within (2L + 4) u max|logit| (u = 2^-8);
scan_layers == unrolled; KV-cache decode == full forward; remat keeps the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_models import write_tiny_hf

import sga_jax

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
VARIANTS = {
    "llama": ("llama", {}),
    "llama_bias_tied_headdim": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=16),
    ),
    "llama_mha_eps": ("llama", dict(num_key_value_heads=4, rms_norm_eps=1e-3)),
    # Llama 3's base: every other variant uses the default 1e4, so an ignored theta would pass them.
    "llama_rope_theta": ("llama", dict(rope_theta=500000.0)),
    "llama_rope_linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_rope_llama3": ("llama", dict(rope_scaling=dict(LLAMA3))),
    # Llama-3.2-1B/3B's shape: llama3 rope (factor 32, theta 5e5), tied embeddings, GQA 4:1 is
    # scaled down to 4 query / 2 KV heads; original length 8 < T so every band is exercised.
    "llama32_tied_llama3": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={**LLAMA3, "factor": 32.0},
        ),
    ),
    "llama_rope_dynamic": (
        "llama",
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    ),
    "opt_pre_ln": ("opt", {}),
    "opt_post_ln": ("opt", dict(do_layer_norm_before=False)),
    "opt_proj_350m": ("opt", dict(word_embed_proj_dim=16, do_layer_norm_before=False)),
    "opt_untied_nobias": (
        "opt",
        dict(tie_word_embeddings=False, enable_bias=False, layer_norm_elementwise_affine=False),
    ),
    "phi": ("phi", {}),
    # Sliding window 5 < T = 12 on every layer (tiny_models._BASE); v0.2 / v0.3: no window.
    "mistral_window": ("mistral", {}),
    "mistral_nowindow_headdim": ("mistral", dict(sliding_window=None, head_dim=16)),
    # use_sliding_window with max_window_layers = 1: layer 0 full, layer 1 windowed (4 < T).
    "qwen2_sliding_mixed": ("qwen2", dict(use_sliding_window=True, sliding_window=4)),
    # Gemma 2 (tiny_models._BASE): (1 + w) norms, GeGLU, √d embedding, post-norms, both soft-caps
    # biting, layer 0 windowed (4 < T), head_dim 16 != 32 / 4, query_pre_attn_scalar 24, tied.
    "gemma2": ("gemma2", {}),
    "gemma2_untied_mha_explicit_types": (
        "gemma2",
        dict(
            tie_word_embeddings=False,
            num_key_value_heads=4,
            layer_types=["full_attention", "sliding_attention"],
            attn_logit_softcapping=None,
        ),
    ),
    # Gemma 3 (tiny_models._BASE): QK-norm with (1 + w), layer 0 local (window 4 < T, rope 1e4),
    # layer 1 global (rope 1e6, linear scaling 8), query_pre_attn_scalar 24, head_dim 16, tied.
    "gemma3_text": ("gemma3_text", {}),
    # the released pattern 6 on 2 layers: every layer local; untied, MHA, a final soft-cap.
    "gemma3_text_all_local_untied_cap": (
        "gemma3_text",
        dict(
            sliding_window_pattern=6,
            tie_word_embeddings=False,
            num_key_value_heads=4,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_text_all_global": ("gemma3_text", dict(layer_types=["full_attention"] * 2)),
    # Gemma 1 (gemma-2b's multi-query shape; hidden_act "gelu" = the tanh approximation, as HF).
    "gemma": ("gemma", {}),
    # Qwen2.5's small sizes: q/k/v bias only, tied embeddings, theta 1e6 (tiny_models._BASE).
    "qwen2": ("qwen2", {}),
    "qwen2_untied_mha": ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    # Qwen3 (tiny_models._BASE): QK-norm, head_dim 16 != 32 / 4, tied, theta 1e6, no biases.
    "qwen3": ("qwen3", {}),
    # untied, multi-head, attention_bias (HF: on q, k, v and o), layer 1 windowed (4 < T).
    "qwen3_untied_bias_window": (
        "qwen3",
        dict(
            tie_word_embeddings=False,
            num_key_value_heads=4,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=4,
        ),
    ),
    "phi_qk_ln_rot75_gqa": (
        "phi",
        dict(qk_layernorm=True, partial_rotary_factor=0.75, num_key_value_heads=2),
    ),
}


def _longrope(original: int) -> dict:
    """Phi-3.5's rope_scaling on the tiny shape (rotary dim 8: 4 factors per set), max positions 64."""
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.25, 1.4],
        "long_factor": [1.5, 2.0, 3.0, 4.5],
    }
    return dict(rope_scaling=rope, original_max_position_embeddings=original, max_position_embeddings=64)


VARIANTS.update(
    {
        "phi3": ("phi3", {}),
        "phi3_rot50_gqa_tied_window": (
            "phi3",
            dict(
                partial_rotary_factor=0.5, num_key_value_heads=2, tie_word_embeddings=True, sliding_window=6
            ),
        ),
        # T = 12 > 8: the long factors; attention factor sqrt(1 + ln 8 / ln 8).
        "phi3_longrope_long": ("phi3", _longrope(8)),
        # T = 12 <= 16: the short factors; attention factor sqrt(1 + ln 4 / ln 16).
        "phi3_longrope_short": ("phi3", _longrope(16)),
    }
)

B, T = 3, 12
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8-bit significand (7 stored + the implicit bit)


def _batch(seed: int = 0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 96, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    return ids, mask


def _torch_logits(tm, ids, mask=None, position_ids=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
    with torch.no_grad():
        return tm(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    model_type, overrides = VARIANTS[request.param]
    path, tm = write_tiny_hf(model_type, tmp_path_factory.mktemp(request.param), **overrides)
    return request.param, path, tm


def test_logits_match_transformers(variant):
    """Unrolled (eager) and scanned (jit) stacks both match HF, and each other within 1e-5."""
    name, path, tm = variant
    ids, mask = _batch()
    ref = _torch_logits(tm, ids, mask)
    real = mask.astype(bool)
    assert ref[real].std() > 0.1  # the logits carry signal: parity on near-constants proves little
    unrolled = sga_jax.load_model(path, scan_layers=False)
    out = np.asarray(unrolled(ids, mask))
    assert out.dtype == np.float32 and out.shape == (B, T, 96)
    assert np.abs(out - ref)[real].max() <= 1e-4, name
    assert np.abs(np.asarray(unrolled(ids)) - _torch_logits(tm, ids)).max() <= 1e-4, name
    scanned = sga_jax.load_model(path, scan_layers=True)
    out_scan = np.asarray(nnx.jit(lambda m, x, a: m(x, a))(scanned, ids, mask))
    assert np.abs(out_scan - ref)[real].max() <= 1e-4, name
    np.testing.assert_allclose(out_scan, out, atol=1e-5)


def test_rope_theta_variant_has_power(tmp_path):
    """The rope_theta variant's logits are far (>> 1e-4) from those of the same weights at 1e4."""
    _, theta_tm = write_tiny_hf("llama", tmp_path / "theta", **VARIANTS["llama_rope_theta"][1])
    _, default_tm = write_tiny_hf("llama", tmp_path / "default")  # same seed: the same weights
    ids, mask = _batch()
    real = mask.astype(bool)
    assert (
        np.abs(_torch_logits(theta_tm, ids, mask) - _torch_logits(default_tm, ids, mask))[real].max() > 1e-2
    )


# (Not llama_rope_dynamic: dynamic NTK changes every frequency as the sequence grows, so K/V cached
# under the old base differ from a full forward's by construction, in HF too.)
DECODE_CASES = [
    ("llama", True),
    ("llama", False),
    ("llama_rope_llama3", True),
    ("llama32_tied_llama3", False),
    ("llama_bias_tied_headdim", False),
    ("opt_pre_ln", True),
    ("opt_proj_350m", False),
    ("phi_qk_ln_rot75_gqa", True),
    ("qwen2", True),
    ("qwen2_untied_mha", False),
    ("qwen3", True),
    ("qwen3", False),
    ("qwen3_untied_bias_window", True),
    ("phi3_rot50_gqa_tied_window", True),
    # decode runs past the window (prefill 5, then to 12 with windows 4 / 5)
    ("mistral_window", True),
    ("mistral_window", False),
    ("qwen2_sliding_mixed", True),
    ("qwen2_sliding_mixed", False),
    ("gemma2", True),
    ("gemma2", False),
    ("gemma2_untied_mha_explicit_types", True),
    ("gemma", False),
    ("gemma3_text", True),
    ("gemma3_text", False),
    ("gemma3_text_all_local_untied_cap", True),
    ("gemma3_text_all_global", False),
    ("phi3_longrope_short", False),  # (not _long: like dynamic, HF switches factors as it grows)
]


@pytest.mark.parametrize(
    "case", DECODE_CASES, ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in DECODE_CASES]
)
def test_kv_cache_decode_matches_full_forward(case, tmp_path):
    """Prefill 5 tokens then decode one at a time with left padding == HF's full forward with
    generation positions (cumsum(mask) - 1)."""
    name, scan = case
    model_type, overrides = VARIANTS[name]
    path, tm = write_tiny_hf(model_type, tmp_path / name, **overrides)
    model = sga_jax.load_model(path, scan_layers=scan)
    ids, mask = _batch(2)
    mask[2] = 1  # decode works on left-padded batches
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    if model_type == "opt":  # HF OPT derives its positions from the mask itself
        ref = _torch_logits(tm, ids, mask)
        positions = (np.cumsum(mask, axis=1) - 1).astype(np.int32)
    else:
        ref = _torch_logits(tm, ids, mask, position_ids=positions)
    S = T + 4
    kv_mask = np.zeros((B, S), np.int32)
    kv_mask[:, :T] = mask
    cache = model.init_cache(B, S)
    decode = nnx.jit(lambda m, x, p, c, i, k: m.decode(x, p, c, i, k))
    logits, cache = decode(model, ids[:, :5], positions[:, :5], cache, 0, kv_mask)
    outs = [np.asarray(logits)]
    for t in range(5, T):
        logits, cache = decode(model, ids[:, t : t + 1], positions[:, t : t + 1], cache, t, kv_mask)
        outs.append(np.asarray(logits))
    out = np.concatenate(outs, axis=1)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4, name


@pytest.mark.parametrize(
    "name",
    [
        "llama_bias_tied_headdim",
        "opt_proj_350m",
        "phi_qk_ln_rot75_gqa",
        "qwen2",
        "qwen3",
        "phi3",
        "mistral_window",
        "gemma2",
        "gemma",
        "gemma3_text",
    ],
)
def test_bfloat16_smoke(name, tmp_path):
    model_type, overrides = VARIANTS[name]
    path, tm = write_tiny_hf(model_type, tmp_path / name, **overrides)
    ids, mask = _batch(3)
    model = sga_jax.load_model(path, dtype="bfloat16")
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    out = np.asarray(model(ids, mask))
    assert out.dtype == np.float32
    ref = _torch_logits(tm, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    # bf16 keeps 8 significant bits: each rounding errs by at most u = 2^-8 relative. Along the path
    # to a logit there are 2L + 4 of them at the residual stream's scale (embedding, attention and
    # MLP outputs of each layer, final norm, LM-head input and weight), which reaches the logits at
    # their own scale: tol = (2L + 4) u max|z|. Measured: 1.5-3.2 u max|z| (PyTorch bf16: 1.8-3.3).
    n_layers = tm.config.num_hidden_layers
    tol = (2 * n_layers + 4) * BF16_UNIT_ROUNDOFF * np.abs(ref[real]).max()
    assert np.abs(out - ref)[real].max() <= tol, name
    # float32 compute on bfloat16 storage is also allowed
    mixed = sga_jax.load_model(path, dtype="float32", param_dtype="bfloat16")
    assert mixed.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(mixed(ids, mask))).all()


def test_remat_keeps_gradient(tmp_path):
    """remat="dots" on the scanned stack gives the unrolled, un-remat'd gradient."""
    path, _ = write_tiny_hf("llama", tmp_path / "m")
    ids, mask = _batch(4)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids, mask), axis=-1))

    plain = sga_jax.load_model(path, scan_layers=False)
    rem = sga_jax.load_model(path, scan_layers=True, remat="dots")
    g0 = nnx.to_flat_state(nnx.grad(loss)(plain))
    g1 = dict(nnx.to_flat_state(nnx.grad(loss)(rem)))
    for key, v in g0:
        if key[0] == "layers":
            other = g1[(key[0], *key[2:])].get_value()[key[1]]
        else:
            other = g1[key].get_value()
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(other), atol=1e-6)


def test_bad_remat_policy_and_dtype():
    from tiny_models import tiny_config

    from sga_jax.errors import ConfigError
    from sga_jax.models import from_config

    with pytest.raises(ConfigError, match="remat"):
        from_config(tiny_config("llama"), remat="sometimes")
    with pytest.raises(ConfigError, match="dtype"):
        from_config(tiny_config("llama"), dtype="float8")


def test_from_config_random_init_runs():
    from tiny_models import tiny_config

    from sga_jax.models import from_config

    types = ("llama", "opt", "phi", "qwen2", "qwen3", "phi3", "mistral", "gemma2", "gemma", "gemma3_text")
    for model_type in types:
        model = from_config(tiny_config(model_type), rngs=nnx.Rngs(1))
        ids, mask = _batch()
        out = model(ids, mask)
        assert out.shape == (B, T, 96) and bool(jnp.isfinite(out).all())
        w, b = model.lm_head_weights()
        assert w.shape[1] == 96
        h = model.hidden_states(ids, mask)
        assert h.shape[:2] == (B, T) and h.shape[2] == w.shape[0]
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32) + (0 if b is None else b[None, None, :])
        cap = model.logit_softcap  # Gemma 2's final soft-cap; None elsewhere
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(out), atol=1e-5)


def test_kfac_taps_sow_inputs_and_perturb_outputs(tmp_path):
    """Linear's K-FAC hooks (docs/interfaces.md), read with ``nnx.capture``: the sown input is the
    layer input, the perturbation has the output's shape and its gradient is dL/d(output)."""
    path, _ = write_tiny_hf("llama", tmp_path / "m")
    model = sga_jax.load_model(path)
    ids, mask = _batch()
    ref = np.asarray(model(ids, mask))
    proj = model.layers[0].mlp.down_proj
    proj.kfac_tap = True
    fwd = lambda m, x, a: m(x, a)  # noqa: E731
    out, sown = nnx.capture(fwd, nnx.Intermediate)(model, ids, mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
    flat = {tuple(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(sown)}
    a = flat[("layers", "0", "mlp", "down_proj", "kfac_in")]
    a = a[0] if isinstance(a, tuple) else a
    assert a.shape == (B, T, 64)
    _, perturbations = nnx.capture(fwd, nnx.Perturbation)(model, ids, mask)

    def loss(m, p):
        logits, _ = nnx.capture(fwd, nnx.Perturbation, init=p)(m, ids, mask)
        return jnp.sum(logits[..., 0])

    g = nnx.grad(loss, argnums=1)(model, perturbations)
    (gp,) = jax.tree.leaves(g)
    assert gp.shape == (B, T, 32) and float(jnp.abs(gp).max()) > 0


@pytest.mark.parametrize(
    "model_type,overrides,key",
    [
        ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
        ("qwen2", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),  # no window
        ("qwen2", dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
        ("mistral", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
        ("mistral", dict(attention_bias=True), "attention_bias"),
        ("mistral", dict(sliding_window=2.5), "sliding_window"),
        ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma2", dict(hidden_activation="gelu_10"), "hidden_activation"),
        ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types"),
        ("gemma2", dict(sliding_window=None), "sliding_window"),
        ("gemma2", dict(attn_logit_softcapping=0.0), "attn_logit_softcapping"),
        ("gemma2", dict(final_logit_softcapping="30"), "final_logit_softcapping"),
        ("gemma2", dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar"),
        ("gemma2", dict(attention_dropout=0.1), "attention_dropout"),
        ("gemma", dict(hidden_act="gelu_10"), "hidden_act"),
        ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma3_text", dict(layer_types=["sliding_attention"]), "layer_types"),
        ("gemma3_text", dict(sliding_window_pattern=0), "sliding_window_pattern"),
        ("gemma3_text", dict(sliding_window=None), "sliding_window"),
        ("gemma3_text", dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        ("gemma3_text", dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
        ("gemma3_text", dict(rope_scaling={"rope_type": "yarn_v2", "factor": 2.0}), "rope_type"),
        ("gemma3_text", dict(model_type="gemma3", text_config=None), "text_config"),
        ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("qwen2", dict(attention_dropout=0.1), "attention_dropout"),
        ("qwen3", dict(attention_dropout=0.1), "attention_dropout"),
        ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),  # no window
        ("qwen3", dict(model_type="qwen3_moe", num_experts=4), "mixture-of-experts"),
        ("llama", dict(hidden_act="gelu_10"), "hidden_act"),
        ("phi3", dict(resid_pdrop=0.1), "resid_pdrop"),
        ("phi3", dict(rope_scaling={"rope_type": "yarn_v2", "factor": 2.0}), "rope_type"),
        (
            "phi3",
            dict(
                _longrope(8),
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 4},
            ),
            "short_factor",
        ),
    ],
)
def test_unsupported_config_key_is_one_line_error(model_type, overrides, key):
    """A config key whose value we do not implement is refused naming the key, never ignored."""
    from tiny_models import _BASE

    from sga_jax.errors import ModelLoadError
    from sga_jax.models import resolve

    hf = {**_BASE[model_type], "model_type": model_type, **overrides}
    with pytest.raises(ModelLoadError, match=key) as e:
        resolve(hf)
    assert "\n" not in str(e.value)


def test_longrope_switches_factors_past_original_length(tmp_path):
    """LongRoPE below and above original_max_position_embeddings (8): HF's logits of the same 6-token
    prefix differ between a 6-token and a 12-token forward (the factor set switches), and ours match
    HF's in both."""
    path, tm = write_tiny_hf("phi3", tmp_path / "m", **_longrope(8))
    model = sga_jax.load_model(path)
    ids, _ = _batch(5)
    short_ref = _torch_logits(tm, ids[:, :6])
    long_ref = _torch_logits(tm, ids)
    assert np.abs(long_ref[:, :6] - short_ref).max() > 1e-2  # the test has power
    assert np.abs(np.asarray(model(ids[:, :6])) - short_ref).max() <= 1e-4
    assert np.abs(np.asarray(model(ids)) - long_ref).max() <= 1e-4


def test_phi35_config_json_rope_scaling_aliases():
    """Phi-3.5's config.json form (rope_scaling with "type", top-level original_max_position_embeddings)
    and the old "su" name give the same rope as transformers 5's rope_parameters form."""
    from tiny_models import _BASE

    from sga_jax.models import resolve

    rope = _longrope(8)
    new = {**_BASE["phi3"], "model_type": "phi3", **rope}
    want = resolve(new)[0].rope
    assert want.rope_type == "longrope" and want.original_max_position_embeddings == 8
    assert want.attention_factor == pytest.approx(np.sqrt(2.0))
    for name in ("longrope", "su"):
        old_scaling = {"type": name, **{k: v for k, v in rope["rope_scaling"].items() if k != "rope_type"}}
        old = {**new, "rope_scaling": old_scaling}
        assert resolve(old)[0].rope == want, name


@pytest.mark.parametrize(
    "name,no_window",
    [
        ("mistral_window", dict(sliding_window=None)),
        ("qwen2_sliding_mixed", dict(use_sliding_window=False)),
        ("qwen3_untied_bias_window", dict(use_sliding_window=False)),
        ("phi3_rot50_gqa_tied_window", dict(sliding_window=None)),
        ("gemma2", dict(layer_types=["full_attention"] * 2)),
        ("gemma3_text", dict(sliding_window=64)),
    ],
)
def test_sliding_window_changes_the_model(name, no_window, tmp_path):
    """The window variants have power: HF's logits with the window differ (>> 1e-4) from those of
    the same weights without it, past the window only, and ours follow HF's in both."""
    model_type, overrides = VARIANTS[name]
    path, tm = write_tiny_hf(model_type, tmp_path / "w", **overrides)
    plain_path, plain_tm = write_tiny_hf(model_type, tmp_path / "p", **{**overrides, **no_window})
    ids, mask = _batch(6)
    real = mask.astype(bool)
    windowed, plain = _torch_logits(tm, ids, mask), _torch_logits(plain_tm, ids, mask)
    assert np.abs(windowed - plain)[real].max() > 1e-2
    early = real & (np.arange(T) < 4)[None]  # positions < 4: inside every window
    np.testing.assert_allclose(windowed[early], plain[early], atol=1e-5)
    assert np.abs(np.asarray(sga_jax.load_model(path)(ids, mask)) - windowed)[real].max() <= 1e-4
    assert np.abs(np.asarray(sga_jax.load_model(plain_path)(ids, mask)) - plain)[real].max() <= 1e-4


def test_gemma2_soft_caps_change_the_model(tmp_path):
    """The Gemma 2 variant's caps have power: without either cap HF's logits move by >> 1e-4, and
    ours follow HF's both ways (the same weights: the same seed)."""
    path, tm = write_tiny_hf("gemma2", tmp_path / "cap")
    ids, mask = _batch(7)
    real = mask.astype(bool)
    ref = _torch_logits(tm, ids, mask)
    assert np.abs(ref).max() < 3.0  # final cap 3: |logit| < 3
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        other_path, other_tm = write_tiny_hf("gemma2", tmp_path / key, **{key: None})
        other = _torch_logits(other_tm, ids, mask)
        assert np.abs(other - ref)[real].max() > 1e-2, key
        ours = np.asarray(sga_jax.load_model(other_path)(ids, mask))
        assert np.abs(ours - other)[real].max() <= 1e-4, key


@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_gemma2_sequence_nll_matches_transformers_loss(implementation, tmp_path):
    """The runner's NLL (sga_jax.logprobs.sequence_nll: hidden states + LM head in the chunked
    kernel) includes the final soft-cap: per row it equals transformers' own loss with labels."""
    from sga_jax.logprobs import sequence_nll

    path, tm = write_tiny_hf("gemma2", tmp_path / "m")
    ids, mask = _batch(8)
    mask[1] = 1  # right padding only (the runner's batches)
    loss_mask = mask.copy()
    loss_mask[:, :3] = 0  # a prompt the loss skips
    model = sga_jax.load_model(path)
    kw = dict(chunk_size=40) if implementation == "chunked" else {}  # 96 = 40 + 40 + 16 (padded)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
    ours = np.asarray(sequence_nll(model, batch, implementation, **kw))
    for r in range(B):
        labels = np.where(loss_mask[r] == 1, ids[r], -100)
        with torch.no_grad():
            out = tm(
                torch.tensor(ids[r : r + 1], dtype=torch.long),
                attention_mask=torch.tensor(mask[r : r + 1], dtype=torch.long),
                labels=torch.tensor(labels[None], dtype=torch.long),
            )
        assert abs(ours[r] - float(out.loss)) <= 1e-5, r
    # the cap matters here: the NLL of the uncapped head differs
    uncapped = sga_jax.load_model(path)
    object.__setattr__(uncapped.config, "final_logit_softcapping", None)
    assert np.abs(np.asarray(sequence_nll(uncapped, batch, implementation, **kw)) - ours).max() > 1e-2


@pytest.mark.parametrize(
    "change",
    [dict(rope_local_base_freq=1000000.0), dict(rope_scaling=None), dict(rope_theta=10000.0)],
    ids=["local_base", "global_scaling", "global_base"],
)
def test_gemma3_rope_bases_change_the_model(change, tmp_path):
    """Gemma 3's two RoPE tables have power: changing the local base, the global scaling or the
    global base moves HF's logits by >> 1e-4 (same weights), and ours follow HF's both ways."""
    path, tm = write_tiny_hf("gemma3_text", tmp_path / "a")
    other_path, other_tm = write_tiny_hf("gemma3_text", tmp_path / "b", **change)
    ids, mask = _batch(9)
    real = mask.astype(bool)
    ref, other = _torch_logits(tm, ids, mask), _torch_logits(other_tm, ids, mask)
    assert np.abs(other - ref)[real].max() > 1e-2
    assert np.abs(np.asarray(sga_jax.load_model(other_path)(ids, mask)) - other)[real].max() <= 1e-4
    assert np.abs(np.asarray(sga_jax.load_model(path)(ids, mask)) - ref)[real].max() <= 1e-4


def test_gemma3_released_config_form_reads_as_transformers_5_form():
    """google/gemma-3-*'s config.json form (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern) and the rope_parameters / layer_types form transformers 5 writes give
    the same model config."""
    from tiny_models import tiny_config

    from sga_jax.models import resolve

    new = tiny_config("gemma3_text").to_dict()
    assert set(new["rope_parameters"]) == {"full_attention", "sliding_attention"}
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=2,
    )
    a, b = resolve(new)[0], resolve(old)[0]
    assert (a.rope, a.rope_local, a.sliding_layers, a.sliding_window) == (
        b.rope,
        b.rope_local,
        b.sliding_layers,
        b.sliding_window,
    )
    assert a.rope.rope_type == "linear" and a.rope.factor == 8.0 and a.rope.theta == 1e6
    assert a.rope_local.rope_type == "default" and a.rope_local.theta == 1e4
    assert a.sliding_layers == (True, False)
