"""Where the SGA step's time goes: its components timed apart, sga_jax and PyTorch side by side.

Components (same model shape, batch and loss as benchmarks/step_vs_torch.py, random weights):
``forward`` (loss only), ``fwd+bwd`` (loss and gradient), ``adamw`` (the optimizer update alone)
and ``step`` (all of it, as benchmarked). JAX variants: unrolled / scanned layers, chunked /
reference log-probs. Wall and CPU seconds, median of ``--steps`` after one warm-up call.

    python benchmarks/profile_step.py --layers 30 --batch 2 --seq 128
    python benchmarks/profile_step.py --framework torch
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_vs_torch as SVT  # noqa: E402


def _time(fn, sync, steps: int) -> dict:
    sync(fn())
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        sync(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def profile_jax(args) -> dict:
    out = {}
    for scan in args.scan_variants:
        out.update(_profile_jax_model(args, scan))
    return out


def _profile_jax_model(args, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sga_jax import logprobs, models, objectives

    out = {}
    layout = "scan" if scan else "unrolled"
    model = models.from_config(
        {"model_type": "llama", **SVT._config_dict(args)}, rngs=nnx.Rngs(0), scan_layers=scan
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in SVT._batch(args, model.config.vocab_size).items()}
    for impl in args.impls:

        def loss_fn(p, batch, impl=impl):
            m = nnx.merge(graphdef, p, rest)
            nll = logprobs.sequence_nll(m, batch, implementation=impl).reshape(args.batch, args.k)
            return objectives.sga_loss(nll[:, 0], nll[:, 1:], args.r)

        fwd = jax.jit(loss_fn)
        grad = jax.jit(jax.value_and_grad(loss_fn))
        out[f"{layout}/{impl}/forward"] = _time(
            lambda f=fwd: f(params, batch), jax.block_until_ready, args.steps
        )
        out[f"{layout}/{impl}/fwd+bwd"] = _time(
            lambda g=grad: g(params, batch), jax.block_until_ready, args.steps
        )
        print(layout, impl, out[f"{layout}/{impl}/forward"], out[f"{layout}/{impl}/fwd+bwd"], flush=True)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    state = {"p": params, "s": tx.init(params)}
    grads = jax.tree.map(jnp.ones_like, params)

    def upd(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    upd = jax.jit(upd, donate_argnums=(0, 1))

    def run_upd():
        state["p"], state["s"] = upd(state["p"], state["s"], grads)
        return state["p"]

    out[f"{layout}/adamw"] = _time(run_upd, jax.block_until_ready, args.steps)
    print(out[f"{layout}/adamw"], flush=True)
    return out


def profile_torch(args) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        SVT._hf_config(args), torch_dtype=torch.float32
    ).train()
    batch = {k: torch.as_tensor(v).long() for k, v in SVT._batch(args, model.config.vocab_size).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    B, K, r = args.batch, args.k, args.r

    def loss_fn():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["loss_mask"][:, 1:].float()
        nll = (-(tok * mask).sum(-1) / mask.sum(-1)).view(B, K)
        return -(1 - r * (K - 1) / K) * nll[:, 0].mean() - (r / K) * nll[:, 1:].sum(-1).mean()

    def fwd():
        with torch.no_grad():
            return loss_fn()

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    fwd_bwd()
    noop = lambda _: None
    out = {"torch/forward": _time(fwd, noop, args.steps), "torch/fwd+bwd": _time(fwd_bwd, noop, args.steps)}
    out["torch/adamw"] = _time(lambda: opt.step(), noop, args.steps)
    print(out, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["jax", "torch"], default="jax")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=float, default=-0.8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--scan-variants", type=lambda s: [x == "scan" for x in s.split(",")], default=[False])
    p.add_argument("--impls", type=lambda s: s.split(","), default=["chunked"])
    args = p.parse_args(argv)
    result = profile_jax(args) if args.framework == "jax" else profile_torch(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
