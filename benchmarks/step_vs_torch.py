"""One SGA unlearning step, sga_jax vs PyTorch (HF transformers), on the same model and batch.

Each framework runs in its own child process (so its peak memory is its own, and JAX and PyTorch do
not fight over threads), one after the other in one invocation, so the ratios compare runs taken
side by side on the same machine. Every child does: build the model, warm up, then time `--steps`
steps and report the median.

The step (both frameworks): B forget rows, each with K-1 normal rows (B*K rows of T tokens), the
per-row token-mean NLL, the SGA loss of DESIGN.md (r = -0.8, K = 4), its gradient and an AdamW update.

    python benchmarks/step_vs_torch.py --quick               # SmolLM2-135M, small batch, < 1 min on CPU
    python benchmarks/step_vs_torch.py --model llama1b --dtype bfloat16 --seq 512   # on a GPU

MFU = model FLOPs per second / the peak measured on the same machine (a large matmul in the same
dtype through JAX). Results go to benchmarks/results/step_vs_torch_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# A ~1B Llama (TinyLlama-1.1B's shape) for GPU runs, random weights.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


# --------------------------------------------------------------------------------------------- model


def _hf_config(args):
    import transformers

    if args.model == "smollm2":
        return None  # read from the GGUF file
    return transformers.LlamaConfig(**LLAMA_1B)


def _batch(args, vocab_size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    rows = args.batch * args.k
    ids = rng.integers(3, vocab_size, size=(rows, args.seq), dtype=np.int32)
    attention = np.ones((rows, args.seq), np.int32)
    loss_mask = np.ones((rows, args.seq), np.int32)
    loss_mask[:, : args.seq // 4] = 0  # a prompt that is not scored
    return dict(input_ids=ids, attention_mask=attention, loss_mask=loss_mask)


def model_flops_per_step(cfg: dict, rows: int, seq: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, matmuls only (PaLM appendix B)."""
    d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    ff = cfg["intermediate_size"]
    per_token_params = L * (d * hd * (heads + 2 * kv) + hd * heads * d + 3 * d * ff) + d * V
    tokens = rows * seq
    dense = 6.0 * per_token_params * tokens
    attention = 6.0 * 2 * L * heads * hd * seq * seq * rows / 2  # causal: half the score matrix
    return dense + attention


def _config_dict(args) -> dict:
    if args.model == "smollm2":
        return dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
        )
    return dict(LLAMA_1B)


# ----------------------------------------------------------------------------------------- children


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import sga_jax
    from sga_jax import logprobs, objectives

    if args.model == "smollm2":
        model = sga_jax.load_model(
            sga_jax.paths.smollm2_gguf(), dtype=args.dtype, param_dtype="float32", scan_layers=args.scan
        )
    else:
        model = sga_jax.models.from_config(
            _hf_config(args), rngs=nnx.Rngs(0), dtype=args.dtype, param_dtype="float32", scan_layers=args.scan
        )
    batch = {k: jnp.asarray(v) for k, v in _batch(args, model.config.vocab_size).items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = tx.init(params)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        nll = logprobs.sequence_nll(m, batch, implementation=args.logprob_impl).reshape(args.batch, args.k)
        return objectives.sga_loss(nll[:, 0], nll[:, 1:], args.r)

    def train_step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        params, opt_state, loss = step(params, opt_state)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    peak = None
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"]
    return dict(
        framework="sga_jax",
        variant=f"jit{'+scan' if args.scan else ''}, {args.logprob_impl} log-probs",
        step_s=statistics.median(times),
        compile_s=compile_s,
        loss=float(np.asarray(loss)),
        device_peak_bytes=peak,
        device=str(device.device_kind),
        versions={"jax": jax.__version__, "flax": __import__("flax").__version__, "optax": optax.__version__},
    )


def run_torch(args, compiled: bool) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model == "smollm2":
        import sga_jax.paths

        gguf = sga_jax.paths.smollm2_gguf()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(args), torch_dtype=torch.float32)
    # float32 master weights; bfloat16 compute through autocast, as sga_jax does.
    model = model.to(dev).train()
    batch = {k: torch.as_tensor(v, device=dev).long() for k, v in _batch(args, model.config.vocab_size).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    B, K, r = args.batch, args.k, args.r

    def loss_fn():
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:].float()
        nll = -(tok * mask).sum(-1) / mask.sum(-1)
        nll = nll.view(B, K)
        return -(1 - r * (K - 1) / K) * nll[:, 0].mean() - (r / K) * nll[:, 1:].sum(-1).mean()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    if compiled:
        step = torch.compile(step)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        loss = step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(
        framework="pytorch",
        variant="torch.compile" if compiled else "eager",
        step_s=statistics.median(times),
        compile_s=compile_s,
        loss=float(loss.detach()),
        device_peak_bytes=peak,
        device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )


def run_peak(args) -> dict:
    """The machine's measured matmul peak in the step's dtype (FLOP/s), through JAX."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    dtype = jnp.dtype(args.dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(5 if jax.default_backend() == "cpu" else 50):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(framework="peak", flops_per_s=2.0 * n**3 / statistics.median(times), n=n)


# ------------------------------------------------------------------------------------------- parent


def _child(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which] + _forward_args(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(framework=which, error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["host_peak_rss_bytes"] = out.get("host_peak_rss_bytes")
    return out


def _forward_args(args) -> list[str]:
    out = [
        "--model", args.model, "--batch", str(args.batch), "--k", str(args.k), "--seq", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype, "--r", str(args.r),
        "--logprob-impl", args.logprob_impl,
    ]  # fmt: skip
    if args.scan:
        out.append("--scan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "llama1b"], default="smollm2")
    p.add_argument("--batch", type=int, default=4, help="forget rows B (each with K-1 normal rows)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--r", type=float, default=-0.8)
    p.add_argument("--scan", action="store_true", help="scan over layers in sga_jax")
    p.add_argument("--logprob-impl", default="chunked", choices=["chunked", "reference"])
    p.add_argument("--quick", action="store_true", help="small batch and few steps (< 1 min on CPU)")
    p.add_argument("--skip", nargs="*", default=[], help="children to skip: jax torch-eager torch-compile")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 3, 1

    if args.child:
        import resource

        result = {
            "jax": run_jax,
            "torch-eager": lambda a: run_torch(a, compiled=False),
            "torch-compile": lambda a: run_torch(a, compiled=True),
            "peak": run_peak,
        }[args.child](args)
        result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return 0

    cfg = _config_dict(args)
    rows = args.batch * args.k
    tokens = rows * args.seq
    flops = model_flops_per_step(cfg, rows, args.seq)
    results = [_child(args, w) for w in ["peak", "jax", "torch-eager", "torch-compile"] if w not in args.skip]
    peak = next((r["flops_per_s"] for r in results if r["framework"] == "peak" and "flops_per_s" in r), None)
    runs = [r for r in results if r["framework"] != "peak"]
    eager = next((r for r in runs if r.get("variant") == "eager" and "step_s" in r), None)
    for r in runs:
        if "step_s" not in r:
            continue
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = flops / r["step_s"] / peak if peak else None
        r["vs_torch_eager"] = eager["step_s"] / r["step_s"] if eager else None

    import jax

    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else f"cpu ({os.cpu_count()} cores)"
    record = dict(
        date=_dt.date.today().isoformat(),
        device=device,
        python=platform.python_version(),
        setup=dict(model=args.model, B=args.batch, K=args.k, T=args.seq, rows=rows, tokens=tokens,
                   dtype=args.dtype, r=args.r, scan=args.scan, steps=args.steps),  # fmt: skip
        model_flops_per_step=flops,
        measured_peak_flops_per_s=peak,
        runs=results,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}_{args.dtype}_{'gpu' if jax.default_backend() != 'cpu' else 'cpu'}{'_quick' if args.quick else ''}"
    (RESULTS / f"step_vs_torch_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# SGA step: sga_jax vs PyTorch — {args.model}, {args.dtype}, {device}, {record['date']}",
        "",
        f"B={args.batch} forget rows x K={args.k} (rows={rows}) x T={args.seq} tokens = {tokens} tokens/step; "
        f"model FLOPs/step {flops:.3e}; measured matmul peak "
        f"{(peak or 0) / 1e9:.1f} GFLOP/s ({args.dtype}).",
        "",
        "| framework | variant | step (s, median) | tokens/s | x torch eager | MFU | compile (s) | peak mem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if "step_s" not in r:
            lines.append(f"| {r['framework']} | {r.get('variant', '')} | failed: {r.get('error')} | | | | | |")
            continue
        mem = r.get("device_peak_bytes") or r.get("host_peak_rss_bytes")
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
        ratio = f"{r['vs_torch_eager']:.2f}" if r.get("vs_torch_eager") else "n/a"
        lines.append(
            f"| {r['framework']} | {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | {mfu} "
            f"| {r['compile_s']:.1f} | {mem / 2**30:.2f} GiB |"
        )
    lines.append("")
    lines.append("Versions: " + "; ".join(f"{k} {v}" for r in runs for k, v in r.get("versions", {}).items()))
    text = "\n".join(lines) + "\n"
    (RESULTS / f"step_vs_torch_{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
