"""Forward pass of SmolLM2-135M-Instruct: sga_jax (jit) vs HF transformers (PyTorch), same machine.

Both load the same GGUF file (sga_jax's own reader; transformers' GGUF loader), run the same batch
of random token ids in float32, warm up, then time ``--iters`` forwards and report the median.
The ratio is torch_time / jax_time (> 1: sga_jax is faster).

    python benchmarks/forward_vs_torch.py                  # CPU: batch 4 x 256 tokens
    python benchmarks/forward_vs_torch.py --batch 16 --seq 1024 --dtype bfloat16   # on a GPU

Results: benchmarks/results/forward_vs_torch_<device>.{json,md}.
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


def _time(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_jax(path: Path, ids, dtype: str, scan: bool, iters: int, warmup: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import sga_jax

    model = sga_jax.load_model(path, dtype=dtype, scan_layers=scan)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.device_put(np.asarray(ids, dtype=np.int32))
    t0 = time.perf_counter()
    forward(state, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = _time(lambda: forward(state, x).block_until_ready(), iters, warmup)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "compile_s": compile_s,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
    }


def bench_torch(path: Path, ids, dtype: str, iters: int, warmup: int) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=tdtype)
    model = model.to(device).eval()
    x = torch.tensor(ids, dtype=torch.long, device=device)

    def run():
        with torch.no_grad():
            model(x).logits.float()
        if device == "cuda":
            torch.cuda.synchronize()

    times = _time(run, iters, warmup)
    return {"median_s": statistics.median(times), "min_s": min(times), "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--unrolled", action="store_true", help="no scan over layers")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    import sga_jax
    from sga_jax.paths import smollm2_gguf

    path = smollm2_gguf()
    ids = np.random.RandomState(0).randint(0, 49152, size=(args.batch, args.seq))
    jax_res = bench_jax(path, ids, args.dtype, not args.unrolled, args.iters, args.warmup)
    torch_res = bench_torch(path, ids, args.dtype, args.iters, args.warmup)
    ratio = torch_res["median_s"] / jax_res["median_s"]
    tokens = args.batch * args.seq
    result = {
        "benchmark": "forward_vs_torch",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "scan_layers": not args.unrolled,
        "sga_jax": jax_res,
        "torch": torch_res,
        "speedup_torch_over_jax": ratio,
        "jax_tokens_per_s": tokens / jax_res["median_s"],
        "torch_tokens_per_s": tokens / torch_res["median_s"],
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sga_jax": sga_jax.__version__,
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
    }
    tag = jax_res["platform"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".forward_vs_torch_{tag}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(RESULTS / f"forward_vs_torch_{tag}.json")
    md = (
        f"# Forward pass, SmolLM2-135M, {args.batch}x{args.seq} tokens, {args.dtype}\n\n"
        f"{result['date']} on {jax_res['device']} ({result['machine']['platform']})\n\n"
        "| framework | median (ms) | min (ms) | tokens/s |\n| --- | --- | --- | --- |\n"
        f"| sga_jax (jit, scan={not args.unrolled}) | {jax_res['median_s'] * 1e3:.1f} | "
        f"{jax_res['min_s'] * 1e3:.1f} | {result['jax_tokens_per_s']:.0f} |\n"
        f"| transformers (PyTorch eager) | {torch_res['median_s'] * 1e3:.1f} | "
        f"{torch_res['min_s'] * 1e3:.1f} | {result['torch_tokens_per_s']:.0f} |\n\n"
        f"torch time / sga_jax time = **{ratio:.2f}x**. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + "\n"
    )
    tmp = RESULTS / f".forward_vs_torch_{tag}.md.tmp"
    tmp.write_text(md)
    tmp.replace(RESULTS / f"forward_vs_torch_{tag}.md")
    print(md)


if __name__ == "__main__":
    main()
