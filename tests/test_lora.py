"""LoRA adapters (sga_jax.models.lora, issue 15): forward, training, K-FADE, export, PEFT.

References: HF transformers (PyTorch) for the merged export, ``peft.PeftModel.from_pretrained``
(peft 0.21) + transformers for the PEFT layout, the adapter formula ``W x + (alpha/r) B A x`` of
Hu et al. 2021 (arXiv 2106.09685) eq. 3 written out here in numpy, and K-FAC's ``A = E[a aᵀ]``
(Martens & Grosse 2015, eq. 1) for the adapter layers' input factors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config, write_tiny_hf, write_tiny_llama_for

from sga_jax import config as C
from sga_jax import methods, runner, train
from sga_jax.curvature import dense_layers, estimate_factors
from sga_jax.errors import ConfigError
from sga_jax.kfade_driver import kfade_unlearn
from sga_jax.models import from_config, hf
from sga_jax.models.lora import LoRALinear, LoRAParam, adapters, apply_lora, load_adapter, save_adapter

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
IDS = np.array([[5, 17, 33, 8, 91, 4, 60, 12], [7, 3, 44, 20, 71, 9, 0, 0]])
MASK = np.array([[1] * 8, [1] * 6 + [0] * 2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, torch_model = write_tiny_hf("llama", tmp_path_factory.mktemp("lora") / "llama")
    return path, torch_model


def _random_b(model, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero B on every adapter (a fresh adapter's B is zero: nothing would be tested)."""
    for n, lin in enumerate(adapters(model).values()):
        var = lin.lora.lora_b.kernel
        var.set_value(jax.random.normal(jax.random.key(seed + n), var.get_value().shape) * std)


def _lora(path, scan: bool, **kw):
    model = hf.load_model(path, scan_layers=scan)
    return apply_lora(model, C.LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, **kw), nnx.Rngs(3))


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_the_base_model_and_nonzero_b_is_the_lora_formula(tiny, scan):
    path, _ = tiny
    base = np.asarray(hf.load_model(path, scan_layers=scan)(IDS, MASK))
    model = _lora(path, scan)
    np.testing.assert_array_equal(np.asarray(model(IDS, MASK)), base)
    # Only the chosen projections carry adapters; A as PEFT's kaiming-uniform(a=√5): |A| <= 1/√in.
    names = {p[-1] for p in adapters(model)}
    assert names == set(TARGETS)
    for lin in adapters(model).values():
        a = np.asarray(lin.lora.lora_a.kernel.get_value())
        assert np.abs(a).max() <= 1 / math.sqrt(lin.in_features) and np.abs(a).max() > 0.5 / math.sqrt(
            lin.in_features
        )
        assert not np.any(np.asarray(lin.lora.lora_b.kernel.get_value()))
    # The adapter formula, written out: a Linear with adapters is x W + (alpha/r) x A B.
    _random_b(model)
    lin = next(iter(adapters(model).values()))
    x = np.random.default_rng(0).normal(size=(3, lin.in_features)).astype(np.float32)
    w = np.asarray(lin.kernel.get_value())
    a, b = (np.asarray(v.kernel.get_value()) for v in (lin.lora.lora_a, lin.lora.lora_b))
    if scan:  # stacked: call layer 0's slice through the same code path
        w, a, b = w[0], a[0], b[0]
        got = np.asarray(jax.vmap(lambda m: m(jnp.asarray(x)), in_axes=0)(lin))[0]  # type: ignore[arg-type]
    else:
        got = np.asarray(lin(jnp.asarray(x)))
    np.testing.assert_allclose(got, x @ w + (8.0 / 4) * (x @ a) @ b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(model(IDS, MASK)) - base).max() > 1e-2


def test_base_dtype_and_config_errors(tiny):
    path, _ = tiny
    model = _lora(path, True, base_dtype="bfloat16")
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        want = jnp.float32 if isinstance(var, LoRAParam) else jnp.bfloat16
        assert var.get_value().dtype == want, key
    assert np.isfinite(np.asarray(model(IDS, MASK))).all()
    with pytest.raises(ConfigError, match="already carries"):
        apply_lora(model, C.LoRAConfig(targets=["q_proj"]))
    bad = {
        "model.lora.rank=0": "model.lora.rank: must be >= 1",
        "model.lora.targets=[qkv_proj]": "model.lora.targets: unknown projection 'qkv_proj' .Phi-3",
        "model.lora.targets=[lm_head]": "model.lora.targets: unknown projection 'lm_head'",
        "model.lora.base_dtype=int8": "model.lora.base_dtype: must be",
        "model.lora.save=peft": "model.lora.save: must be one of",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg) as e:
            C.compose([], [override])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.lora.save: adapter writes no merged model"):
        C.compose([], ["model.lora.save=adapter", "eval.benchmark=ppl"])
    opt_path, _ = write_tiny_hf("opt", path.parent / "opt")
    with pytest.raises(ConfigError, match="'gate_proj' names no projection of opt .its projections: .*fc1"):
        apply_lora(hf.load_model(opt_path), C.LoRAConfig(targets=["q_proj", "gate_proj"]))


# ------------------------------------------------------------------------ training, every method

N_FORGET, N_RETAIN = 4, 6
METHODS = {
    "ga": ["method=ga"],
    "graddiff": ["method=graddiff"],
    "npo": ["method=npo"],
    "simnpo": ["method=simnpo"],
    "sga_fixed": ["method=sga"],
    "sga_paper": ["method=sga_paper_r"],
    "sga_min_norm": ["method=sga_min_norm_r", "method.r_max=1.0"],
    "flat": ["method=flat"],
    "gru_ga": ["method=gru_ga"],
    "gru_sga": ["method=gru_sga"],
}


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("lora_runs")
    path, _ = write_tiny_llama_for(smollm2_tokenizer, root / "tiny")
    files = {
        "forget.jsonl": [
            {"question": f"Code of agent {i}?", "answer": f"Uses {i * 37}."} for i in range(N_FORGET)
        ],
        "retain.jsonl": [
            {"question": f"Author of novel {i}?", "answer": f"Author {i + 3}."} for i in range(N_RETAIN)
        ],
        "templates.jsonl": [{"text": t} for t in ("I don't know.", "No idea.", "I cannot say.")],
    }
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _cfg(root: Path, model: Path, method: list[str], *extra: str) -> C.RunConfig:
    flat = [f"method.template={root / 'templates.jsonl'}"] if method[0] == "method=flat" else []
    return C.compose([], [
        "benchmark=jsonl", f"data.forget={root / 'forget.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
        f"model.path={model}", f"output_dir={root / 'out'}", *method, *flat, "train.steps=2",
        "train.batch_size=2", "train.lr=1e-2", "train.warmup_steps=0", "model.lora.rank=4",
        "model.lora.alpha=8",
        f"model.lora.targets=[{','.join(TARGETS)}]", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_only_the_adapters(name, run_setup):
    root, path = run_setup
    cfg = _cfg(root, path, METHODS[name])
    prep = runner.prepare(cfg)
    model = prep.model
    before = {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    method = methods.build_method(cfg.method, cfg.mode)
    tx, _ = train.make_optimizer(cfg.train, 2, method.transform)
    graphdef, params, rest = train.split_model(model, cfg.model.freeze)
    # Only adapters are trainable, and the optimizer state holds nothing shaped like a base weight.
    flat = nnx.to_flat_state(params)
    assert flat and all(isinstance(v, LoRAParam) for _, v in flat)
    adapter_shapes = {tuple(v.get_value().shape) for _, v in flat}
    opt_state = tx.init(params)
    big = [x.shape for x in jax.tree.leaves(opt_state) if x.ndim > 0 and tuple(x.shape) not in adapter_shapes]
    assert not big, big
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert n_opt % sum(v.get_value().size for _, v in flat) == 0
    step = train.make_step(graphdef, rest, method, tx, donate=False)
    host = train.step_batch(prep.data, 0, cfg.train.batch_size, 1, cfg.train.seed)
    params, opt_state, metrics = step(params, opt_state, jax.tree.map(jnp.asarray, host))
    assert all(math.isfinite(float(v)) for v in jax.device_get(metrics).values()), metrics
    after = dict(nnx.to_flat_state(nnx.state(nnx.merge(graphdef, params, rest), nnx.Param)))
    moved = set()
    for key, old in before.items():
        new = np.asarray(after[key].get_value())
        if isinstance(after[key], LoRAParam):
            moved |= {key} if not np.array_equal(new, old) else set()
        else:
            np.testing.assert_array_equal(new, old, err_msg=f"base weight {key} moved")
    # B starts at zero, so step 1's gradient reaches B (A's is B-weighted: zero); every B moved.
    b_keys = {k for k in before if "lora_b" in k}
    assert b_keys and b_keys <= moved, sorted(b_keys - moved)[:3]


def test_run_exports_adapter_and_merged(run_setup, tmp_path):
    """The runner end to end with model.lora.save=both: out/model is the merged checkpoint and
    out/model/adapter the PEFT adapter; both give the trained model's logits."""
    root, path = run_setup
    cfg = _cfg(root, path, ["method=ga"], "model.lora.save=both", f"output_dir={tmp_path / 'run'}",
               "train.progress=false")  # fmt: skip
    result = runner.run(cfg)
    merged = hf.load_model(result.model_dir)
    with_adapter = load_adapter(hf.load_model(path), result.model_dir / "adapter")
    ids = jnp.asarray(IDS % 90 + 5)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(with_adapter(ids)), atol=1e-4)
    assert np.abs(np.asarray(merged(ids)) - np.asarray(hf.load_model(path)(ids))).max() > 1e-4


# ------------------------------------------------------------------------------------ K-FADE


def test_kfade_curvature_and_steps_on_adapters_only(tiny):
    path, _ = tiny
    base = hf.load_model(path)
    model = _lora(path, False)
    _random_b(model)
    layers = dense_layers(model)
    assert layers and all(isinstance(m, LoRALinear) for m in layers.values())
    assert set(layers) == {
        f"{'/'.join(map(str, p))}/lora/{ab}" for p in adapters(model) for ab in ("lora_a", "lora_b")
    }
    batch = {"input_ids": IDS, "attention_mask": MASK, "loss_mask": MASK}
    f_lora = estimate_factors(model, [batch], fisher="empirical")
    # K-FAC's A = E[a aᵀ] of each adapter matmul's input: lora_a sees the projection's input x (the
    # base model's A of that projection, as no adapter sits upstream of layer 0's q_proj), lora_b
    # sees h = x A, so its A is Aᵀ E[x xᵀ] A.
    f_base = estimate_factors(base, [batch], fisher="empirical", layer_filter="layers/0/self_attn/q_proj")
    ax = np.asarray(f_base.a["layers/0/self_attn/q_proj"])
    np.testing.assert_allclose(
        np.asarray(f_lora.a["layers/0/self_attn/q_proj/lora/lora_a"]), ax, rtol=1e-4, atol=1e-6
    )
    a0 = np.asarray(adapters(model)[("layers", 0, "self_attn", "q_proj")].lora.lora_a.kernel.get_value())
    np.testing.assert_allclose(
        np.asarray(f_lora.a["layers/0/self_attn/q_proj/lora/lora_b"]), a0.T @ ax @ a0, rtol=1e-4, atol=1e-6
    )
    new, delta = kfade_unlearn(model, [batch], [batch], steps=1, trust_region=1e-2, fisher="empirical")
    old_state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, var in nnx.to_flat_state(nnx.state(new, nnx.Param)):
        same = np.array_equal(np.asarray(var.get_value()), np.asarray(old_state[key].get_value()))
        assert same != isinstance(var, LoRAParam), key  # adapters moved, the base did not
    # Δθ is of the merged weights, under the base kernels' names (reapply-able to an HF checkpoint).
    got = dict(nnx.to_flat_state(delta))
    assert set(got) == {(*p, "kernel") for p in adapters(model)}
    for p, lin in adapters(new).items():
        a, b = (np.asarray(x.kernel.get_value()) for x in (lin.lora.lora_a, lin.lora.lora_b))
        old = adapters(model)[p].lora
        a0, b0 = (np.asarray(x.kernel.get_value()) for x in (old.lora_a, old.lora_b))
        want = 2.0 * (a @ b - a0 @ b0)  # (alpha / r)(A'B' - AB), alpha / r = 8 / 4
        np.testing.assert_allclose(np.asarray(got[(*p, "kernel")].get_value()), want, atol=1e-7)


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("scan", [False, True])
def test_merged_export_matches_adapted_model_here_and_in_transformers(tiny, tmp_path, scan):
    import torch
    import transformers

    path, _ = tiny
    model = _lora(path, scan)
    _random_b(model)
    want = np.asarray(model(IDS, MASK))
    out = hf.save_model(model, tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
    ]
    np.testing.assert_allclose(np.asarray(hf.load_model(out)(IDS, MASK)), want, atol=1e-4)
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = tm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    m = MASK.astype(bool)
    np.testing.assert_allclose(logits[m], want[m], atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_peft_adapter_round_trip_through_peft_and_transformers(tiny, tmp_path, scan):
    import peft
    import torch
    import transformers

    path, _ = tiny
    model = _lora(path, scan)
    _random_b(model)
    want = np.asarray(model(IDS, MASK))
    out = save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8.0, sorted(TARGETS))
    assert cfg["base_model_name_or_path"] == str(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    m = MASK.astype(bool)
    np.testing.assert_allclose(logits[m], want[m], atol=1e-4)
    # ... and back: the PEFT folder onto a fresh base gives the same model (scanned or not).
    back = load_adapter(hf.load_model(path, scan_layers=not scan), out)
    np.testing.assert_allclose(np.asarray(back(IDS, MASK)), want, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_peft_export_of_the_new_families(model_type, tmp_path):
    """LoRA on Qwen3 and Gemma 3 (QK-norm; Gemma 3's two rope tables) through PEFT + transformers,
    and the merged export through transformers, as the Llama tests above."""
    import peft
    import torch
    import transformers

    path, _ = write_tiny_hf(model_type, tmp_path / model_type)
    model = _lora(path, scan=True)
    _random_b(model)
    want = np.asarray(model(IDS, MASK))
    m = MASK.astype(bool)
    out = save_adapter(model, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(logits[m], want[m], atol=1e-4)
    merged = hf.save_model(model, tmp_path / "merged")
    tm = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = tm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(logits[m], want[m], atol=1e-4)


def test_peft_layout_refusals(tmp_path):
    phi3, _ = write_tiny_hf("phi3", tmp_path / "phi3")
    model = apply_lora(hf.load_model(phi3), C.LoRAConfig(rank=2, targets=["q_proj", "o_proj"]))
    ids = jnp.asarray(IDS % 90 + 5)
    _random_b(model)
    with pytest.raises(ConfigError, match="q_proj: phi3's HF checkpoints fuse this projection"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    # ... while the merged export of the same model is exact (fused on save).
    merged = hf.load_model(hf.save_model(model, tmp_path / "merged"))
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-4)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(hf.load_model(phi3), tmp_path / "none")


def test_scanned_lora_step_holds_no_copy_of_the_frozen_layers():
    """The runner's SGA step on a scanned LoRA model: XLA's temporaries stay below one copy of the
    stacked layer weights. nnx.scan used to return every layer's variables as a stacked output,
    which the second forward of the step (the normal rows after the forget rows) then read, so XLA
    kept that copy (docs/performance.md "LoRA memory"). XLA's own buffer assignment, abstract arrays."""
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=128)
    model = nnx.eval_shape(
        lambda: apply_lora(from_config(cfg, rngs=nnx.Rngs(0), scan_layers=True), C.LoRAConfig(rank=2))
    )
    method = methods.build_method(C.SGAConfig(k=2, rate="fixed"))
    tx, _ = train.make_optimizer(C.TrainConfig(steps=1), 1, method.transform)
    graphdef, params, rest = train.split_model(model)
    opt_state = jax.eval_shape(tx.init, params)
    rows = {k: jax.ShapeDtypeStruct((1, 2, 8), jnp.int32) for k in train._KEYS}
    batch = {"forget": rows, "normal": rows}
    step = train.make_step(graphdef, None, method, tx, bind_rest=False)
    mem = step.lower(params, opt_state, rest, batch).compile().memory_analysis()
    layers = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
    assert mem.temp_size_in_bytes < 0.5 * layers, (mem.temp_size_in_bytes, layers)
