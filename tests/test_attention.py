"""Attention implementations (issue 12): the causal + key-lengths form against the dense mask.

The cuDNN flash path passes ``is_causal=True`` and per-row key lengths instead of a dense
``[B, 1, T, T]`` mask. On the CPU the same form runs through XLA (``_use_lengths`` forced on), so
the lengths form itself is checked here against the dense form on real tokens; cuDNN against XLA
needs a CUDA GPU (the ``gpu``-marked test, run by ``make test-gpu``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config, write_tiny_hf

import sga_jax
from sga_jax.config import ATTENTION_CHOICES, ModelConfig
from sga_jax.errors import ConfigError
from sga_jax.models import attention as A
from sga_jax.models import from_config

B, T = 4, 16
LENGTHS = (16, 11, 5, 1)  # full, two right-padded rows, one real token


def _right_padded(seed: int = 0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 96, size=(B, T)).astype(np.int32)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "opt", "phi", "mistral"])  # mistral: window 5 < T
def tiny_path(request, tmp_path_factory):
    overrides = dict(num_key_value_heads=2) if request.param != "opt" else {}
    path, _ = write_tiny_hf(request.param, tmp_path_factory.mktemp(request.param), **overrides)
    return path


def _lengths_form(monkeypatch, on: bool):
    monkeypatch.setattr(A, "_use_lengths", lambda impl: on)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_lengths_form_equals_dense_mask_on_real_tokens(tiny_path, scan, monkeypatch):
    """Right padding, lengths 16 / 11 / 5 / 1: logits and the loss gradient of real tokens agree."""
    ids, mask = _right_padded()
    real = mask.astype(bool)
    model = sga_jax.load_model(tiny_path, scan_layers=scan, attention="xla")

    def run(m):
        logits = m(ids, mask)
        loss = jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., 7])
        return loss, logits

    grad_fn = nnx.jit(nnx.value_and_grad(run, has_aux=True))
    _lengths_form(monkeypatch, False)
    (_, dense), g_dense = grad_fn(model)
    _lengths_form(monkeypatch, True)
    (_, lengths), g_lengths = nnx.jit(nnx.value_and_grad(run, has_aux=True))(model)
    dense, lengths = np.asarray(dense), np.asarray(lengths)
    assert dense[real].std() > 0.1
    np.testing.assert_allclose(lengths[real], dense[real], atol=2e-5, rtol=1e-5)
    assert np.isfinite(lengths).all()  # padded positions stay finite too (the loss masks them)
    for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_lengths)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


def test_lengths_form_poisons_left_padded_rows(tiny_path, monkeypatch):
    """A left-padded row cannot be written as causal + length: NaN, not silently wrong logits."""
    ids, mask = _right_padded()
    mask[0, :3] = 0  # row 0: left padding
    model = sga_jax.load_model(tiny_path, attention="xla")
    _lengths_form(monkeypatch, False)
    dense = np.asarray(model(ids, mask))
    _lengths_form(monkeypatch, True)
    out = np.asarray(model(ids, mask))
    assert np.isnan(out[0]).all()
    real = mask[1:].astype(bool)
    np.testing.assert_allclose(out[1:][real], dense[1:][real], atol=2e-5, rtol=1e-5)


def test_cudnn_without_cuda_gpu_is_one_clear_error():
    if A._cuda_gpu():
        pytest.skip("a CUDA GPU is present: cudnn is allowed here")
    one_line = r"^model.attention=cudnn needs a CUDA GPU.*use model.attention=auto or xla$"
    with pytest.raises(ConfigError, match=one_line):
        from_config(tiny_config("llama"), dtype="bfloat16", attention="cudnn")


def test_auto_is_xla_without_cuda_and_unknown_names_are_refused():
    if A._cuda_gpu():
        pytest.skip("a CUDA GPU is present: auto picks cudnn there (test_cudnn_matches_xla_on_gpu covers it)")
    assert A.attention_implementation("auto", jnp.bfloat16, 64) == "xla"
    model = from_config(tiny_config("llama"), attention="auto")
    assert model.attention_impl() == "xla"
    with pytest.raises(ConfigError, match="unknown attention implementation 'flash'"):
        A.attention_implementation("flash", jnp.bfloat16, 64)
    with pytest.raises(ConfigError, match="model.attention: must be one of auto, xla, cudnn"):
        ModelConfig(attention="flash")
    assert ATTENTION_CHOICES == A.ATTENTION_IMPLEMENTATIONS


def test_cudnn_support_rules(monkeypatch):
    """On a (pretended) CUDA GPU: auto is cuDNN only for half precision and head_dim ≤ 128, % 8."""
    monkeypatch.setattr(A, "_cuda_gpu", lambda: True)
    assert A.attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    assert A.attention_implementation("auto", jnp.float16, 128) == "cudnn"
    assert A.attention_implementation("auto", jnp.float32, 64) == "xla"
    assert A.attention_implementation("auto", jnp.bfloat16, 96 + 4) == "xla"
    assert A.attention_implementation("auto", jnp.bfloat16, 256) == "xla"
    assert A.attention_implementation("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ConfigError, match="needs model.dtype bfloat16 or float16, got float32"):
        A.attention_implementation("cudnn", jnp.float32, 64)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu(tmp_path):
    """cuDNN flash attention (causal + key lengths) == the XLA dense-mask path, bfloat16, on real
    tokens: logits within the bfloat16 bound of test_models_parity ((2L + 4) u max|logit|)."""
    if not A._cuda_gpu():
        pytest.skip("needs a CUDA GPU (make test-gpu on a GPU machine); not counted as passing")
    path, _ = write_tiny_hf("llama", tmp_path, num_key_value_heads=2, hidden_size=256, num_attention_heads=4)
    ids, mask = _right_padded()
    real = mask.astype(bool)
    xla = sga_jax.load_model(path, "bfloat16", attention="xla")
    cudnn = sga_jax.load_model(path, "bfloat16", attention="cudnn")
    assert cudnn.attention_impl() == "cudnn"
    a = np.asarray(nnx.jit(lambda m: m(ids, mask))(xla))
    b = np.asarray(nnx.jit(lambda m: m(ids, mask))(cudnn))
    n_layers = xla.config.num_layers
    bound = (2 * n_layers + 4) * 2.0**-8 * np.abs(a[real]).max()
    assert np.abs(a - b)[real].max() <= bound


def test_softcapping_rules_out_cudnn(monkeypatch):
    """Gemma 2's attention soft-capping is not in cuDNN's kernel: auto picks XLA even where cuDNN
    would run, and a forced cudnn is one line naming the key."""
    monkeypatch.setattr(A, "_cuda_gpu", lambda: True)
    cfg = tiny_config("gemma2", head_dim=64)
    assert from_config(cfg, dtype="bfloat16", attention="auto").attention_impl() == "xla"
    one_line = (
        r"^model.attention=cudnn does not support attention logit soft-capping "
        r"\(the config's attn_logit_softcapping\); use model.attention=auto or xla$"
    )
    with pytest.raises(ConfigError, match=one_line):
        from_config(cfg, dtype="bfloat16", attention="cudnn")
    # per-layer windows (no soft-cap) likewise; a window on every layer (Mistral) keeps cuDNN
    nocap = tiny_config("gemma2", head_dim=64, attn_logit_softcapping=None)
    assert from_config(nocap, dtype="bfloat16").attention_impl() == "xla"
    with pytest.raises(ConfigError, match="sliding windows on some layers only"):
        from_config(nocap, dtype="bfloat16", attention="cudnn")
    mistral = tiny_config("mistral", hidden_size=256)
    assert from_config(mistral, dtype="bfloat16").attention_impl() == "cudnn"
