"""Per-device memory of one SGA step on Llama-3.1-8B's shape: LoRA vs full fine-tuning (issue 15).

The step is the runner's own (``sga_jax.train.build_method`` + ``make_optimizer`` + ``split_model``
+ ``make_step``): SGA with a fixed r = -0.8 and K = 4 (B forget rows, each with its K - 1 = 3 normal
rows, so 4B rows of T tokens), the chunked log-prob NLL, clipping and a donated AdamW update, with
``model.scan_layers=true`` and the default remat (a full remat of each layer under scan), bfloat16
compute. Every array is abstract (``nnx.eval_shape`` / ``jax.ShapeDtypeStruct``): no weights are
needed, and ``compiled.memory_analysis()`` gives XLA's buffer assignment of the step on one device:
arguments (parameters, frozen weights, Adam state, batch), outputs, donated aliases, temporaries.
Peak = arguments + outputs - aliased + temporaries.

Variants: LoRA rank 16 (alpha 32) on q, k, v, o and on every linear projection, over a bfloat16 base
(``model.lora.base_dtype=bfloat16``) with float32 adapters and float32 Adam moments; full fine-tuning
with float32 master weights (``param_dtype=float32``) and with bfloat16 weights and moments.

    python benchmarks/lora_memory.py                 # every variant, B = 1 and 2 (4 and 8 rows)
    python benchmarks/lora_memory.py --one '{"variant": "lora_qkvo", "forget_rows": 1}'

Measured on the CPU backend (one CPU device stands for one GPU), which has no bfloat16 matmul:
XLA:CPU converts each bfloat16 weight stack to float32 for its dots and hoists the conversion out
of the layer scan, so the bfloat16 rows' temporaries hold float32 copies of the stacked weights
(seen in the compiled HLO: f32[32, 4096, 14336] buffers) that a GPU's native bfloat16 dots never
make. ``--compute float32`` (float32 weights and compute, no conversion) bounds the temporaries of
the bfloat16 step from above: its activations are twice as wide. docs/performance.md combines the
two: bfloat16 weights + float32-compute temporaries is an upper bound of the GPU step's peak.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json).
LLAMA31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)  # fmt: skip
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora_qkvo": dict(lora=dict(rank=16, alpha=32.0, targets=ALL_LINEAR[:4], base_dtype="bfloat16")),
    "lora_all": dict(lora=dict(rank=16, alpha=32.0, targets=ALL_LINEAR, base_dtype="bfloat16")),
    "full_fp32_master": dict(param_dtype="float32"),
    "full_bf16": dict(param_dtype="bfloat16"),
}
LABELS = {
    "lora_qkvo": "LoRA r=16 on q,k,v,o (bf16 base)",
    "lora_all": "LoRA r=16 on all 7 projections (bf16 base)",
    "full_fp32_master": "full fine-tuning, fp32 master weights + fp32 Adam",
    "full_bf16": "full fine-tuning, bf16 weights + bf16 Adam",
}


def measure(spec: dict) -> dict:
    """Compile the runner's SGA step for one variant on abstract arrays; XLA's memory analysis."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sga_jax import config as C
    from sga_jax import methods, train
    from sga_jax.models import from_config
    from sga_jax.models.lora import LoRAParam, apply_lora
    from sga_jax.reference import reference_params

    v = VARIANTS[spec["variant"]]
    b, k, seq = spec["forget_rows"], 4, spec["seq"]
    compute = spec.get("compute", "bfloat16")
    lora = dict(v["lora"], base_dtype=compute) if "lora" in v else None
    lcfg = C.LoRAConfig(**lora) if lora else None
    pdtype = v.get("param_dtype", "float32") if compute == "bfloat16" else "float32"

    def build():
        m = from_config(
            dict(LLAMA31_8B), rngs=nnx.Rngs(0), dtype=compute, param_dtype=pdtype, scan_layers=True,
            remat=None, attention="xla",
        )  # fmt: skip
        return apply_lora(m, lcfg, nnx.Rngs(0)) if lcfg else m

    model = nnx.eval_shape(build)
    name = spec.get("method", "sga")
    method_cfg = C.SGAConfig(r=-0.8, k=k, rate="fixed") if name == "sga" else C.IdkDPOConfig()
    method = methods.build_method(method_cfg)
    tcfg = C.TrainConfig(steps=10, batch_size=b)
    tx, _ = train.make_optimizer(tcfg, 10, method.transform)
    graphdef, params, rest = train.split_model(model)
    opt_state = jax.eval_shape(tx.init, params)
    rows = lambda n: {
        key: jax.ShapeDtypeStruct((1, n, seq), jnp.int32)
        for key in ("input_ids", "attention_mask", "loss_mask")
    }  # noqa: E731
    if name == "sga":
        batch = {"forget": rows(b), "normal": rows(b * (k - 1))}
    else:  # IdkDPO: forget (rejected), IdK (chosen) and retain rows, the frozen reference's copy
        batch = {"forget": rows(b), "idk": rows(b), "retain": rows(b)}
        k = 3  # rows per forget row, for the table
    ref = None
    if method.reference:  # LoRA: None (the adapters off); full: a copy of the trainable parameters
        ref = jax.eval_shape(lambda p: reference_params(p, lora=lcfg is not None), params)
    step = train.make_step(graphdef, None, method, tx, bind_rest=False)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, rest, batch, ref).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    n_total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_train = sum(x.size for x in jax.tree.leaves(params))
    return dict(
        spec=spec,
        label=LABELS[spec["variant"]],
        rows=b * k,
        params_total=int(n_total),
        params_trainable=int(n_train),
        adapters=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))),
        trainable_bytes=int(size(params)),
        frozen_bytes=int(size(nnx.state(model, nnx.Param)) - size(params)),
        optimizer_bytes=int(size(opt_state)),
        reference_bytes=int(size(ref)) if ref is not None else 0,
        compile_s=seconds,
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        **out,
    )


def _child(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec=spec, label=LABELS[spec["variant"]], error=f"compile did not finish in {timeout} s")
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return dict(spec=spec, label=LABELS[spec["variant"]], error=last)
    return json.loads(proc.stdout.strip().splitlines()[-1])


GiB = 2**30
GPU_80GB = 80e9  # an "80 GB" H100 / A100: 80 * 10^9 bytes (about 74.5 GiB usable before the runtime's share)


def table(results: list[dict]) -> list[str]:
    lines = [
        "| variant | compute | rows × T | trainable params | frozen weights (GiB) | trainable + Adam (GiB) "
        "| reference copy (GiB) | temporaries (GiB) | peak (GiB) | fits 80 GB | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["spec"].get("compute") == "float32":  # float32 weights throughout
            r = dict(r, label=r["label"].replace("(bf16 base)", "(fp32 base)"))
        if "error" in r:
            lines.append(
                f"| {r['label']} | {r['spec'].get('compute')} | | failed: {r['error']} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['label']} | {r['spec'].get('compute', 'bfloat16')} | {r['rows']} × {r['spec']['seq']} "
            f"| {r['params_trainable'] / 1e6:,.1f} M "
            f"| {r['frozen_bytes'] / GiB:.2f} | {(r['trainable_bytes'] + r['optimizer_bytes']) / GiB:.2f} "
            f"| {r.get('reference_bytes', 0) / GiB:.2f} | {r['temp_bytes'] / GiB:.2f} "
            f"| {r['peak_bytes'] / GiB:.2f} "
            f"| {'yes' if r['peak_bytes'] < GPU_80GB else 'no'} | {r['compile_s']:.0f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", default=None, help="one configuration as JSON (prints one JSON line)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--forget-rows", nargs="*", type=int, default=[1])
    p.add_argument("--compute", nargs="*", default=["bfloat16", "float32"])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument(
        "--method", default="sga", choices=["sga", "idk_dpo"],
        help="sga (K = 4) or idk_dpo (a frozen reference: results in lora_memory_idk_dpo.{json,md})",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure({"seq": 512, **json.loads(args.one)})))
        return 0
    started = _dt.datetime.now().isoformat(timespec="seconds")
    results = []
    for compute in args.compute:
        for b in args.forget_rows:
            for name in args.variants:
                if compute == "float32" and name == "full_bf16":
                    continue  # the same program as full_fp32_master in float32
                spec = dict(variant=name, forget_rows=b, seq=args.seq, compute=compute, method=args.method)
                r = _child(spec, args.timeout)
                results.append(r)
                print(json.dumps(r), flush=True)
    import jax
    import transformers  # noqa: F401  (versions only)

    record = dict(
        date=_dt.date.today().isoformat(),
        started=started,
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        devices=sorted({f"{r.get('backend')}: {r.get('device')}" for r in results if "backend" in r}),
        python=platform.python_version(),
        versions={"jax": jax.__version__, "flax": __import__("flax").__version__},
        model="Llama-3.1-8B shape (abstract weights)",
        gpu=f"CPU buffer assignment; no GPU was lent to this session ({_dt.date.today().isoformat()})",
        method=args.method,
        results=results,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "lora_memory" if args.method == "sga" else f"lora_memory_{args.method}"
    tmp = RESULTS / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(RESULTS / f"{stem}.json")
    text = "\n".join(table(results)) + "\n"
    tmp = RESULTS / f".{stem}.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / f"{stem}.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
