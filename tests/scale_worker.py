"""One sharded SGA unlearning step on a tiny Llama: shared by tests/test_scale.py and, as a script,
by each process of its multi-process test.

The step: B forget rows, each followed by its K-1 normal rows (B*K rows of T tokens), per-row
token-mean NLL through the chunked log-prob kernel (several vocabulary chunks), the SGA loss
(r = -0.8, K = 4), its gradient, global-norm clipping and AdamW. State (parameters, optimizer state)
is donated.

    python tests/scale_worker.py --process-id I --num-processes N --port P --devices D \
        --mesh DATA,FSDP,TENSOR --out FILE.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

B, K, T = 4, 4, 12
R = -0.8
CHUNK = 64
CONFIG = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def make_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = B * K
    ids = rng.integers(3, CONFIG["vocab_size"], size=(rows, T), dtype=np.int32)
    attention = np.ones((rows, T), np.int32)
    attention[1, :3] = 0  # one left-padded row
    loss = np.ones((rows, T), np.int32)
    loss[:, :4] = 0  # prompt tokens are not scored
    loss *= attention
    return dict(input_ids=ids, attention_mask=attention, loss_mask=loss)


def initial_params() -> dict[str, np.ndarray]:
    """The tiny model's random initial parameters as a flat ``{path: array}`` dict (host numpy)."""
    from flax import nnx

    from sga_jax.models import from_config

    model = from_config(CONFIG, rngs=nnx.Rngs(0))
    return {
        "/".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def sga_step(mesh=None) -> dict[str, np.ndarray]:
    """Run one SGA step (on ``mesh``, or on the default device when None); return the new parameters
    gathered to host numpy on every process, plus ``"loss"``."""
    import jax
    import optax
    from flax import nnx

    from sga_jax import distributed, logprobs, objectives
    from sga_jax.models import from_config
    from sga_jax.models import sharding as S

    model = from_config(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    # The parameters as a flat {path tuple: array} dict: a plain pytree for shardings and optax.
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(state)}
    kinds = {path: type(v) for path, v in nnx.to_flat_state(state)}
    batch = make_batch()
    if mesh is None:
        param_sh = {p: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for p in flat}
        batch_sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        param_sh = {p: S.sharding_for(p, v.shape, mesh, model.config.model_type) for p, v in flat.items()}
        batch_sh = S.batch_sharding(mesh)
    # Host values -> global arrays: each process builds only its own shards.
    params = distributed.put_global({p: np.asarray(v) for p, v in flat.items()}, param_sh)
    batch = distributed.put_global(batch, batch_sh)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3, weight_decay=0.01))
    # Optimizer moments sharded like their parameters, counters replicated.
    replicated = (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else batch_sh
    )
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_sh,
        transform_non_params=lambda _: replicated,
    )  # fmt: skip
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, nnx.from_flat_state([(k, kinds[k](v)) for k, v in p.items()]), rest)
        nll = logprobs.sequence_nll(m, batch, "chunked", chunk_size=CHUNK).reshape(B, K)
        return objectives.sga_loss(nll[:, 0], nll[:, 1:], R)

    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, batch_sh),
        out_shardings=(param_sh, opt_sh, None),
        donate_argnums=(0, 1),
    )
    params, opt_state, loss = step(params, opt_state, batch)
    out = {"/".join(map(str, p)): v for p, v in params.items()}
    out = distributed.gather_to_host(out)
    out["loss"] = distributed.gather_to_host(loss)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    p.add_argument("--mesh", default="1,4,2")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sga_jax import distributed
    from sga_jax.models import sharding as S

    assert distributed.maybe_initialize(
        True,
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    assert distributed.maybe_initialize(True)  # idempotent
    assert jax.process_count() == args.num_processes
    assert len(jax.devices()) == args.num_processes * args.devices
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = S.make_mesh(data, fsdp, tensor)
    result = sga_step(mesh)
    result["process_index"] = np.asarray(jax.process_index())
    result["local_devices"] = np.asarray(len(jax.local_devices()))
    np.savez(args.out, **result)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
