"""One SGA unlearning step, sga_jax vs PyTorch (HF transformers), on the same model and batch.

Each framework runs in its own child process (so its peak memory is its own, and JAX and PyTorch do
not fight over threads), one after the other in one invocation, so the ratios compare runs taken
side by side on the same machine. Every child does: build the model, warm up, then time `--steps`
steps and report the median.

The step (both frameworks): B forget rows, each with K-1 normal rows (B*K rows of T tokens), the
per-row token-mean NLL, the SGA loss of docs/design.md (r = -0.8, K = 4), its gradient and an AdamW update.

    python benchmarks/step_vs_torch.py --quick     # SmolLM2 shape, 4 layers, no torch.compile: < 1 min on CPU
    python benchmarks/step_vs_torch.py             # SmolLM2-135M (real weights), B=2 x K=4 x T=128, all four
    python benchmarks/step_vs_torch.py --model llama1b --dtype bfloat16 --seq 512 --batch 8 --steps 20  # GPU

MFU = model FLOPs per second / the peak measured on the same machine (a large matmul in the same
dtype through JAX). Besides the wall-clock step time each child reports its CPU time per step (all
threads), which is robust to other load on a shared machine. Results go to
benchmarks/results/step_vs_torch_<tag>.{json,md} (tag: ``cpu`` for the default CPU run, ``cpu_quick``,
``gpu_<model>_<dtype>`` on a GPU, or ``--tag``).

A loaded machine flatters sga_jax (PyTorch's threads degrade more), so the run measures the load
that is not its own: the 1-minute load average before it starts, and the CPU time the whole machine
spent during the run (``/proc/stat``) minus the CPU time of its own children, in cores. Above
``--max-load`` (default 0.5) or ``--max-other-cores`` (default 0.25) it writes no result and exits
with status 3; ``--allow-load`` writes it anyway, marked loaded.
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
GPU_NOT_RUN = "GPU numbers still to be measured — no GPU was lent to the session that ran this"
GPU_COMMAND = (
    "python benchmarks/step_vs_torch.py --model llama1b --dtype bfloat16 --seq 512 --batch 8 --steps 20 "
    "--warmup 3 --scan"
)

# SmolLM2-135M (the GGUF's shape).
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
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


def _config_dict(args) -> dict:
    cfg = dict(SMOLLM2 if args.model == "smollm2" else LLAMA_1B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def _real_weights(args) -> bool:
    """SmolLM2 at its full depth loads the real GGUF weights; other shapes use random weights."""
    return args.model == "smollm2" and not args.layers


def _hf_config(args):
    import transformers

    return transformers.LlamaConfig(**_config_dict(args))


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


def _timed(step, sync, args) -> tuple[float, list[float], list[float]]:
    """(first-call seconds, wall seconds per timed step, CPU seconds per timed step)."""
    t0 = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        sync(step())
    wall, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        sync(step())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return first, wall, cpu


# ----------------------------------------------------------------------------------------- children


def run_jax(args) -> dict:
    import jax

    if args.jax_devices > 1:  # before the backend starts: N CPU devices, one per core
        jax.config.update("jax_num_cpu_devices", args.jax_devices)
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    import optax
    from flax import nnx

    import sga_jax
    from sga_jax import logprobs, objectives

    if _real_weights(args):
        model = sga_jax.load_model(
            sga_jax.paths.smollm2_gguf(),
            dtype=args.dtype,
            param_dtype="float32",
            scan_layers=args.scan,
            remat=args.remat,
            attention=args.attention,
        )
    else:
        model = sga_jax.models.from_config(
            {"model_type": "llama", **_config_dict(args)},
            rngs=nnx.Rngs(0),
            dtype=args.dtype,
            param_dtype="float32",
            scan_layers=args.scan,
            remat=args.remat,
            attention=args.attention,
        )
    attention = model.attention_impl()
    batch = {k: jnp.asarray(v) for k, v in _batch(args, model.config.vocab_size).items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = tx.init(params)
    if args.jax_devices > 1:
        # Pure data parallelism over the CPU devices: each runs its share of the rows on its own
        # thread (XLA:CPU runs the elementwise fusions of one device single-threaded).
        from sga_jax.models import sharding as S

        mesh = S.make_mesh(data=args.jax_devices, fsdp=1, tensor=1, devices=jax.devices()[: args.jax_devices])
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params, opt_state = jax.device_put((params, opt_state), replicated)
        batch = jax.device_put(batch, S.batch_sharding(mesh))
    kernel_kwargs = {"chunk_size": args.chunk_size} if args.chunk_size else {}

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, p, rest)
        nll = logprobs.sequence_nll(m, batch, implementation=args.logprob_impl, **kernel_kwargs)
        nll = nll.reshape(args.batch, args.k)
        return objectives.sga_loss(nll[:, 0], nll[:, 1:], args.r)

    def train_step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    state = {"p": params, "s": opt_state}

    def step():
        state["p"], state["s"], loss = jitted(state["p"], state["s"], batch)
        return loss

    first, wall, cpu = _timed(step, jax.block_until_ready, args)
    loss = step()
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)()
    peak = stats.get("peak_bytes_in_use") if stats else None
    variant = (
        f"jit, donated, {'scan' if args.scan else 'unrolled'} layers, remat {args.remat or 'auto'}, "
        f"{attention} attention, {args.logprob_impl} log-probs"
    )
    if args.jax_devices > 1:
        variant += f", data parallel over {args.jax_devices} CPU devices"
    return dict(
        framework="sga_jax",
        variant=variant,
        step_s=statistics.median(wall),
        step_times_s=wall,
        cpu_s_per_step=statistics.median(cpu),
        compile_s=first,
        loss=float(np.asarray(loss)),
        device_peak_bytes=peak,
        device=str(device.device_kind),
        backend=jax.default_backend(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        versions={
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": __import__("flax").__version__,
            "optax": optax.__version__,
        },  # fmt: skip
    )


def run_torch(args, compiled: bool) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if _real_weights(args):
        import sga_jax.paths

        gguf = sga_jax.paths.smollm2_gguf()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(args), torch_dtype=torch.float32)
    # float32 master weights; bfloat16 compute through autocast, as sga_jax does.
    model = model.to(dev).train()
    batch = {
        k: torch.as_tensor(v, device=dev).long() for k, v in _batch(args, model.config.vocab_size).items()
    }
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

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    first, wall, cpu = _timed(step, sync, args)
    loss = step()
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(
        framework="pytorch",
        variant="torch.compile" if compiled else "eager",
        step_s=statistics.median(wall),
        step_times_s=wall,
        cpu_s_per_step=statistics.median(cpu),
        compile_s=first,
        loss=float(loss.detach()),
        device_peak_bytes=peak,
        device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        backend="gpu" if dev == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )


def run_peak(args) -> dict:
    """The machine's measured matmul peak in the step's dtype (FLOP/s), through JAX."""
    import jax
    import jax.numpy as jnp

    cpu = jax.default_backend() == "cpu"
    n = 2048 if cpu else 8192
    dtype = jnp.dtype(args.dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times, cpu_times = [], []
    for _ in range(7 if cpu else 50):
        c0, t0 = time.process_time(), time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    flops = 2.0 * n**3
    # The best of the repeats: the least disturbed by other load (the peak is an upper bound).
    return dict(
        framework="peak",
        flops_per_s=flops / min(times),
        flops_per_s_median=flops / statistics.median(times),
        # FLOPs per CPU-second (all threads): with the steps' CPU seconds this gives an efficiency
        # that other load on a shared machine barely moves.
        flops_per_cpu_s=flops / min(cpu_times),
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        n=n,
    )


# ------------------------------------------------------------------------------------------- parent


def _child(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which] + _forward_args(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(framework=which, error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward_args(args) -> list[str]:
    out = [
        "--model", args.model, "--batch", str(args.batch), "--k", str(args.k), "--seq", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype, "--r", str(args.r),
        "--logprob-impl", args.logprob_impl, "--layers", str(args.layers),
        "--chunk-size", str(args.chunk_size), "--jax-devices", str(args.jax_devices),
    ]  # fmt: skip
    if args.scan:
        out.append("--scan")
    if args.remat:
        out += ["--remat", args.remat]
    return out + ["--attention", args.attention]


def _versions(runs) -> dict:
    out = {"python": platform.python_version()}
    for r in runs:
        out.update(r.get("versions", {}))
    return out


def _fmt_row(r: dict) -> str:
    if "step_s" not in r:
        return f"| {r['framework']} | {r.get('variant', '')} | failed: {r.get('error')} | | | | | | | | |"
    mem = r.get("device_peak_bytes") or r.get("host_peak_rss_bytes")
    pct = lambda x: f"{100 * x:.1f} %" if x else "n/a"
    ratio = lambda x: f"{x:.2f}" if x else "n/a"
    return (
        f"| {r['framework']} | {r['variant']} | {r['step_s']:.3f} | {r['cpu_s_per_step']:.2f} "
        f"| {r['tokens_per_s']:.0f} | {ratio(r.get('vs_torch_eager'))} | {ratio(r.get('vs_torch_compile'))} "
        f"| {pct(r.get('mfu'))} | {pct(r.get('cpu_time_mfu'))} | {r['compile_s']:.1f} "
        f"| {mem / 2**30:.2f} GiB |"
    )


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: all but idle and
    iowait), None where there is no ``/proc/stat``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def load_verdict(
    load_before: float, other_cores: float | None, max_load: float, max_other: float
) -> str | None:
    """Why the machine counts as loaded (one line), or None when it was idle enough to publish."""
    if load_before > max_load:
        return f"load average {load_before:.2f} before the run (max {max_load:g})"
    if other_cores is not None and other_cores > max_other:
        return f"other processes used {other_cores:.2f} cores during the run (max {max_other:g})"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "llama1b"], default="smollm2")
    p.add_argument("--layers", type=int, default=0, help="override the depth (random weights)")
    p.add_argument("--batch", type=int, default=2, help="forget rows B (each with K-1 normal rows)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--r", type=float, default=-0.8)
    p.add_argument("--scan", action="store_true", help="scan over layers in sga_jax")
    p.add_argument(
        "--remat", default=None, help="model.remat (default auto: full under --scan, none unrolled)"
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "cudnn"],
        help="model.attention (auto: cuDNN flash attention on a CUDA GPU in bfloat16, else XLA)",
    )
    p.add_argument("--logprob-impl", default="chunked", choices=["chunked", "reference"])
    p.add_argument(
        "--chunk-size", type=int, default=0, help="vocabulary chunk of the chunked kernel (0: default)"
    )
    p.add_argument(
        "--jax-devices",
        type=int,
        default=1,
        help="sga_jax on CPU: split the rows over this many CPU devices (data parallel)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="SmolLM2's shape with 4 layers (random weights), B=2, T=64, no torch.compile: < 1 min on CPU",
    )
    p.add_argument("--skip", nargs="*", default=[], help="children to skip: jax torch-eager torch-compile")
    p.add_argument(
        "--tag", default=None, help="results file suffix (default: cpu / cpu_quick / gpu_<model>_<dtype>)"
    )
    p.add_argument("--max-load", type=float, default=0.5, help="1-min load average allowed before the run")
    p.add_argument(
        "--max-other-cores", type=float, default=0.25, help="other processes' cores allowed during the run"
    )
    p.add_argument("--allow-load", action="store_true", help="write the result of a loaded run (marked)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # fmt: skip
    if args.quick:
        args.layers = args.layers or 4
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 3, 0  # the first (timed apart) call warms up
        if "torch-compile" not in args.skip:
            args.skip.append("torch-compile")  # inductor's C++ compile alone takes minutes on 2 cores

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
    load_before = os.getloadavg()
    if (
        why := load_verdict(load_before[0], None, args.max_load, args.max_other_cores)
    ) and not args.allow_load:
        print(
            f"step_vs_torch: the machine is loaded: {why}; no result written (--allow-load)", file=sys.stderr
        )
        return 3
    busy0, own0, wall0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    results = []
    for which in ["peak", "jax", "torch-eager", "torch-compile"]:
        if which in args.skip:
            continue
        results.append(_child(args, which))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "step_times_s"}), flush=True)
    load_after = os.getloadavg()
    busy1, own1, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter() - wall0
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    loaded = load_verdict(load_before[0], other, args.max_load, args.max_other_cores)
    peak = next((r["flops_per_s"] for r in results if r["framework"] == "peak" and "flops_per_s" in r), None)
    peak_cpu = next((r["flops_per_cpu_s"] for r in results if "flops_per_cpu_s" in r), None)
    runs = [r for r in results if r["framework"] != "peak"]
    eager = next((r for r in runs if r.get("variant") == "eager" and "step_s" in r), None)
    compiled = next((r for r in runs if r.get("variant") == "torch.compile" and "step_s" in r), None)
    for r in runs:
        if "step_s" not in r:
            continue
        r["tokens_per_s"] = tokens / r["step_s"]
        r["model_flops_per_s"] = flops / r["step_s"]
        r["mfu"] = flops / r["step_s"] / peak if peak else None
        r["cpu_time_mfu"] = (
            flops / r["cpu_s_per_step"] / peak_cpu if peak_cpu and r.get("cpu_s_per_step") else None
        )
        r["vs_torch_eager"] = eager["step_s"] / r["step_s"] if eager else None
        r["vs_torch_compile"] = compiled["step_s"] / r["step_s"] if compiled else None

    # The parent never imports JAX (on a GPU it would hold device memory while the children run).
    # The device comes from every child that ran (any of them may be skipped or fail), never from
    # one: a GPU run must not be labelled CPU because the peak child was skipped.
    on_gpu, device = run_device(results)
    record = dict(
        date=_dt.date.today().isoformat(),
        started=started,
        device=device,
        load_average_before=list(load_before),
        load_average_after=list(load_after),
        other_load_cores=other,
        loaded=loaded,
        versions=_versions(runs),
        weights="SmolLM2-135M-Instruct GGUF (dequantised to float32)" if _real_weights(args) else "random",
        setup=dict(
            model=args.model,
            layers=cfg["num_hidden_layers"],
            B=args.batch,
            K=args.k,
            T=args.seq,
            rows=rows,
            tokens=tokens,
            dtype=args.dtype,
            r=args.r,
            scan=args.scan,
            remat=args.remat or "auto",
            attention=args.attention,
            logprob_impl=args.logprob_impl,
            steps=args.steps,
            warmup=args.warmup,
            skipped=args.skip,
        ),  # fmt: skip
        model_flops_per_step=flops,
        measured_peak_flops_per_s=peak,
        measured_peak_flops_per_cpu_s=peak_cpu,
        runs=results,
    )
    if not on_gpu:
        record["gpu"] = GPU_NOT_RUN
        record["gpu_command"] = GPU_COMMAND
    if loaded and not args.allow_load:
        print(json.dumps(record["runs"]), flush=True)
        print(
            f"step_vs_torch: the machine was loaded: {loaded}; no result written (--allow-load)",
            file=sys.stderr,
        )
        return 3
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.tag or (f"gpu_{args.model}_{args.dtype}" if on_gpu else ("cpu_quick" if args.quick else "cpu"))
    (RESULTS / f"step_vs_torch_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    title_model = f"{args.model} ({cfg['num_hidden_layers']} layers, {record['weights']} weights)"
    lines = [
        f"# SGA step: sga_jax vs PyTorch — {title_model}, {args.dtype}, {device}, {record['date']}",
        "",
        f"B={args.batch} forget rows x K={args.k} (rows={rows}) x T={args.seq} tokens = {tokens} "
        "tokens/step; "
        f"model FLOPs/step {flops:.3e}; measured {args.dtype} matmul peak {(peak or 0) / 1e9:.1f} GFLOP/s. "
        f"Median of {args.steps} steps after {args.warmup} warm-up step(s). Load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); other processes "
        f"{'unknown' if other is None else f'{other:.2f}'} cores during the run"
        f"{f' (LOADED: {loaded})' if loaded else ''}. MFU = model FLOP/s / measured peak; "
        "MFU (CPU time) = model FLOPs per CPU-second of the step / the matmul's FLOPs per CPU-second "
        f"({(peak_cpu or 0) / 1e9:.1f} GFLOP per CPU-s), a second view of efficiency "
        "(threads that spin-wait while other jobs hold the cores inflate it).",
        "",
        "| framework | variant | step (s, median) | CPU s/step | tokens/s | x torch eager | x torch.compile "
        "| MFU | MFU (CPU time) | first step (s) | peak mem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [_fmt_row(r) for r in runs]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "."]
    if not on_gpu:
        lines += ["", f"GPU: {record['gpu']}. GPU command: `{GPU_COMMAND}`."]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"step_vs_torch_{tag}.md").write_text(text)
    print(text)
    return 0


def run_device(results: list[dict]) -> tuple[bool, str]:
    """``(on_gpu, device label)`` from all children's reports: GPU when any child ran on one."""
    gpu = [r for r in results if r.get("backend") not in (None, "cpu")]
    if gpu:
        return True, str(gpu[0]["device"])
    return False, f"cpu: {_cpu_name()} ({os.cpu_count()} cores)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
