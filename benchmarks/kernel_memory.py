"""Peak memory of the per-token log-prob loss + gradient: chunked kernel vs full-logits reference.

For N tokens, hidden size d and vocabulary V, compiles ``value_and_grad`` of ``sum(logp)`` w.r.t.
the hidden states and the LM-head weight for both implementations of
``sga_jax.kernels.token_logprobs`` and reads XLA's own buffer assignment
(``compiled.memory_analysis()``): temporaries, arguments and outputs. Compilation only, so it runs
anywhere (the reference at V = 128,256 would need ~13 GB to execute). ``--rss`` also executes each
case in a fresh subprocess and records its peak resident set size (CPU) or the device's
``peak_bytes_in_use`` (GPU).

    python benchmarks/kernel_memory.py                      # N = 8192, d = 576, V = 49152 and 128256
    python benchmarks/kernel_memory.py --vocab 49152 --rss  # also measure by running

Writes ``benchmarks/results/kernel_memory.{json,md}`` (device, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fn(impl: str, labels, chunk_size: int):
    import jax
    import jax.numpy as jnp

    from sga_jax import kernels

    def loss(h, w):
        kw = {"chunk_size": chunk_size} if impl == "chunked" else {}
        return jnp.sum(kernels.token_logprobs(h, w, labels, implementation=impl, **kw))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _inputs(n: int, d: int, v: int, dtype: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    h = jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype))
    w = jax.ShapeDtypeStruct((d, v), jnp.dtype(dtype))
    labels = np.random.default_rng(0).integers(0, v, size=n).astype(np.int32)
    labels[: n // 8] = -100  # some prompt / padding rows, as in real batches
    return h, w, jnp.asarray(labels)


def analyse(n: int, d: int, v: int, impl: str, chunk_size: int, dtype: str) -> dict:
    h, w, labels = _inputs(n, d, v, dtype)
    compiled = _fn(impl, labels, chunk_size).lower(h, w).compile()
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes)
    args = int(mem.argument_size_in_bytes)
    out = int(mem.output_size_in_bytes)
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    return {
        "temp_bytes": temp,
        "argument_bytes": args,
        "output_bytes": out,
        "peak_bytes": temp + args + out - alias,
    }


_RUN = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {bench_dir!r})
from kernel_memory import _fn
n, d, v, impl, chunk, dtype = {args!r}
rng = np.random.default_rng(0)
h = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32), dtype)
w = jnp.asarray(0.05 * rng.normal(size=(d, v)).astype(np.float32), dtype)
labels = rng.integers(0, v, size=n).astype(np.int32); labels[: n // 8] = -100
f = _fn(impl, jnp.asarray(labels), chunk)
jax.block_until_ready(f(h, w))
dev = jax.devices()[0]
stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
peak = (stats or {{}}).get("peak_bytes_in_use")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", json.dumps({{"device_peak_bytes": peak, "max_rss_bytes": rss}}))
"""


def measure(n: int, d: int, v: int, impl: str, chunk_size: int, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(
            _RUN.format(
                bench_dir=str(Path(__file__).resolve().parent), args=(n, d, v, impl, chunk_size, dtype)
            )
        )
        script = fh.name
    try:
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(script)
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rss", action="store_true", help="also execute each case in a subprocess")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import flax
    import jax
    import optax

    rows = []
    for v in args.vocab:
        row = {"tokens": args.tokens, "hidden": args.hidden, "vocab": v, "chunk_size": args.chunk_size}
        for impl in ("reference", "chunked"):
            row[impl] = analyse(args.tokens, args.hidden, v, impl, args.chunk_size, args.dtype)
            if args.rss:
                row[impl].update(measure(args.tokens, args.hidden, v, impl, args.chunk_size, args.dtype))
        row["peak_ratio"] = row["chunked"]["peak_bytes"] / row["reference"]["peak_bytes"]
        row["temp_ratio"] = row["chunked"]["temp_bytes"] / row["reference"]["temp_bytes"]
        rows.append(row)
        ref_gib, chunk_gib = _gib(row["reference"]["peak_bytes"]), _gib(row["chunked"]["peak_bytes"])
        verdict = "met" if row["peak_ratio"] <= 0.25 else "MISSED"
        print(
            f"N={args.tokens} d={args.hidden} V={v}: reference peak {ref_gib} GiB, chunked {chunk_gib} GiB "
            f"-> ratio {row['peak_ratio']:.3f} (temp {row['temp_ratio']:.3f}); target <= 0.25: {verdict}"
        )

    dev = jax.devices()[0]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {dev.device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "dtype": args.dtype,
        "method": "XLA compiled memory_analysis() of jit(value_and_grad(sum(logp))) w.r.t. hidden and weight"
        + ("; plus subprocess peak RSS / device peak_bytes_in_use" if args.rss else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": rows}
    (args.out / "kernel_memory.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# Log-prob kernel memory: loss + gradient",
        "",
        f"{meta['date']} · {meta['device']} · jax {meta['jax']} · {args.dtype} · chunk {args.chunk_size}",
        "",
        "| N | d | V | reference peak (GiB) | chunked peak (GiB) | ratio | temporaries ratio |"
        + (" reference RSS (GiB) | chunked RSS (GiB) |" if args.rss else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if args.rss else ""),
    ]
    for r in rows:
        line = (
            f"| {r['tokens']} | {r['hidden']} | {r['vocab']} | {_gib(r['reference']['peak_bytes'])} | "
            f"{_gib(r['chunked']['peak_bytes'])} | {r['peak_ratio']:.3f} | {r['temp_ratio']:.3f} |"
        )
        if args.rss:
            line += (
                f" {_gib(r['reference'].get('max_rss_bytes'))} | {_gib(r['chunked'].get('max_rss_bytes'))} |"
            )
        lines.append(line)
    lines += ["", f"Method: {meta['method']}. Target: chunked <= 1/4 of the reference's peak."]
    (args.out / "kernel_memory.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
