"""docs/scaling.md's TPU and GPU table: ``sga-jax plan --json`` per row, compiled by libtpu for the
slice or by jax's CUDA plugin for the GPUs.

Each row is one ``sga-jax plan`` process (the command is recorded with its result), run one after
the other; a 7B step takes ~5 minutes to compile on a 2-core machine. Needs libtpu
(``pip install "sga-jax[tpu]"``) and, for the GPU rows, the CUDA plugin (``"sga-jax[gpu-aot]"``); no
TPU or GPU.

    python benchmarks/scaling_tpu.py                 # every row -> benchmarks/results/scaling_tpu.json
    python benchmarks/scaling_tpu.py --only 0 3      # rows 0 and 3 (merged into the existing file)
    python benchmarks/scaling_tpu.py --table         # the markdown table of docs/scaling.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/scaling_tpu.json"
BASE = (
    "--config configs/experiment/tofu_sga.yaml model.dtype=bfloat16 model.param_dtype=float32 "
    "train.grad_accum=1 method.k=4 data.max_length=512 mesh.data=1"
)
LORA = "model.lora.rank=16 model.lora.alpha=32 model.lora.base_dtype=bfloat16"
NPO = "method=npo"  # NPO's reference NLLs are computed once before training, not in the step


def _row(model: str, target: str, fsdp: int, tensor: int, extra: str = "") -> str:
    # batch = fsdp forget rows: one forget row (+ K-1 = 3 normal rows) per data x fsdp shard, the
    # work per shard of benchmarks/scaling_memory.py's CPU table.
    return (
        f"{BASE} model.path={model} mesh.fsdp={fsdp} mesh.tensor={tensor} train.batch_size={fsdp} "
        f"{extra} --target {target} --candidates 0"
    ).strip()


ROWS = [
    _row("llama2-7b", "tpu:v5e-64", 16, 4),
    _row("llama2-7b", "tpu:v5p-128", 16, 4),
    _row("llama2-7b", "tpu:v5e-64", 16, 4, LORA),
    _row("llama2-7b", "tpu:v5p-128", 16, 4, LORA),
    _row("llama2-7b", "tpu:v5e-64", 64, 1),
    _row("llama2-7b", "tpu:v5e-16", 4, 4),
    _row("llama2-7b", "tpu:v5e-256", 64, 4),
    _row("llama2-7b", "tpu:v5e-64", 16, 4, NPO),
    _row("llama3.1-8b", "tpu:v5e-64", 16, 4),
    _row("llama2-13b", "tpu:v5e-64", 16, 4),
    # RMU: the frozen starting model is an argument of the step (its activations at layer 7); with
    # LoRA (row 20) the reference is the base with its adapters off, no copy.
    _row("llama2-7b", "tpu:v5e-64", 16, 4, "method=rmu").replace(" method.k=4", ""),
    _row("llama2-70b", "tpu:v5p-128", 16, 4),
    _row("llama2-7b", "tpu:v6e-64", 16, 4),
    # GPUs, compiled by jax's CUDA plugin (pip install "sga-jax[gpu-aot]"): one HGX host of 8, fsdp 8.
    _row("llama2-7b", "gpu:h100-8", 8, 1),
    _row("llama2-7b", "gpu:h200-8", 8, 1),
    _row("llama2-7b", "gpu:h100-8", 8, 1, LORA),
    _row("llama2-70b", "gpu:h100-64", 16, 4),
    _row("llama2-13b", "gpu:h100-8", 8, 1),
    _row("llama3.1-8b", "gpu:h100-8", 8, 1),
    _row("llama2-7b", "gpu:h100-8", 8, 1, "method=rmu").replace(" method.k=4", ""),
    _row("llama2-7b", "gpu:h100-8", 8, 1, f"method=rmu {LORA}").replace(" method.k=4", ""),
]


def run_row(args: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "sga_jax.cli", "plan", "--json", *shlex.split(args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"command": f"sga-jax plan {args}", "error": f"did not finish in {timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return {"command": f"sga-jax plan {args}", "error": last, "wall_s": wall}
    return {"command": f"sga-jax plan {args}", "wall_s": wall, **json.loads(proc.stdout)}


def _flops(x: float) -> str:
    return f"{x:.2e}" if x else "n/a"  # XLA's GPU compiler gives no cost analysis deviceless


def table(record: dict) -> str:
    """The markdown table of docs/scaling.md from the recorded rows."""
    g = 2**30
    lines = [
        "| # | model | target (chips) | fsdp × tensor | training | rows × 512 | arguments | temporaries "
        "| peak "
        "| fits | compiler / model FLOPs per chip | bound (s/step) | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in sorted(record["rows"].items(), key=lambda kv: int(kv[0])):
        if "error" in r:
            lines.append(f"| {i} | failed: {r['error']} |" + " |" * 11)
            continue
        p, c, t = r["plan"], r["config"], r["target"]
        if p["error"]:
            lines.append(
                f"| {i} | {r['model']} | {t['text']} | | | | | | | **no**: {p['error'][:160]} | | | |"
            )
            continue
        kind = ("LoRA r16" if c["lora"] else "full") + ("" if c["method"] == "sga" else f", {c['method']}")
        lines.append(
            f"| {i} | {r['model'].removeprefix('preset ')} | {t['text'].removeprefix('tpu:')} ({t['chips']}) "
            f"| {p['mesh']['fsdp']} × {p['mesh']['tensor']} | {kind} | {p['rows']} "
            f"| {p['argument_bytes'] / g:.2f} | {p['temp_bytes'] / g:.2f} | {p['peak_bytes'] / g:.2f} "
            f"| {'yes' if p['fits'] else '**no**'} | {_flops(p['flops'])} / {p['model_flops']:.2e} "
            f"| {p['bound_s']:.3f} | {p['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="*", default=None, help="row numbers to run")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--table", action="store_true", help="print the markdown table of the recorded rows")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    record = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
    for i in a.only if a.only is not None else range(len(ROWS)):
        load = os.getloadavg()
        r = run_row(ROWS[i], a.timeout)
        r["load_before"] = [round(x, 2) for x in load]
        record["rows"][str(i)] = r
        record.update(
            date=_dt.date.today().isoformat(),
            machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        )
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(record, indent=1) + "\n")
        print(i, r.get("error") or {k: r["plan"][k] for k in ("peak_bytes", "compile_s", "fits")}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
