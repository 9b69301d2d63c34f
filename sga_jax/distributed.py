"""Multi-process (multi-host) runs: ``jax.distributed`` start-up and host <-> global array helpers.

One Python process per host (per GPU node, per TPU-VM worker) runs the same program; after
:func:`maybe_initialize` every process sees all devices of the job in ``jax.devices()`` (its own in
``jax.local_devices()``), the mesh of :mod:`sga_jax.models.sharding` spans all of them, and a
jitted step with shardings runs as one SPMD program whose collectives cross hosts. Nothing else
in the training code changes: this is the same path for 2 local CPU processes (the test suite's
proof, with gloo collectives), a multi-node GPU job and a TPU pod.

Launch on a TPU pod (every worker runs the same command; JAX finds the coordinator, the number of
processes and each process id from the TPU metadata)::

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
      --command="cd sga_jax && SGA_JAX_DISTRIBUTED=1 sga-jax unlearn --config CONFIG.yaml"

with a mesh in the config whose sizes multiply to the pod's chip count, e.g.
``mesh: {data: 1, fsdp: 32, tensor: 1}`` on a v4-64 (32 chips). On SLURM (``srun``) and Open MPI
the same auto-detection applies. Anywhere else set, on every process::

    JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i  SGA_JAX_DISTRIBUTED=1

(``JAX_COORDINATOR_ADDRESS`` is read by JAX itself; the other two by :func:`maybe_initialize`.)
Multi-process CPU runs need cross-process CPU collectives: :func:`maybe_initialize` selects gloo
unless ``jax_cpu_collectives_implementation`` is already set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sga_jax.errors import ConfigError

ENV_FLAG = "SGA_JAX_DISTRIBUTED"
_TRUE = {"1", "true", "yes", "on"}


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"${name}={value!r} is not a whole number") from None
    return None


def env_enabled() -> bool:
    """Whether ``$SGA_JAX_DISTRIBUTED`` asks for a multi-process run (``1`` / ``true`` / ``yes`` / ``on``)."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in _TRUE


def is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` has run in this process."""
    return bool(jax.distributed.is_initialized())


def maybe_initialize(
    enabled: bool | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> bool:
    """Start ``jax.distributed`` when asked to; return whether this process is part of a multi-process job.

    Args:
      enabled: ``True`` initialises, ``False`` does nothing, ``None`` (default) follows
        ``$SGA_JAX_DISTRIBUTED``.
      coordinator_address: ``"host:port"`` of process 0's coordinator; default
        ``$JAX_COORDINATOR_ADDRESS``, else auto-detected (TPU pod, SLURM, Open MPI, ...).
      num_processes: default ``$JAX_NUM_PROCESSES``, else auto-detected.
      process_id: this process's index in ``[0, num_processes)``; default ``$JAX_PROCESS_ID``,
        else auto-detected.
      cpu_collectives: cross-process collectives for CPU devices (``"gloo"``, ``"mpi"``, or ``None``
        to leave JAX's setting alone). Applied only if the option is still unset; harmless on GPU/TPU.
      initialization_timeout: seconds to wait for every process to connect.

    Idempotent: a second call (or a call after the user's own ``jax.distributed.initialize``) returns
    True without touching anything. It must run before the first JAX computation of the process.
    """
    if is_initialized():
        return True
    if enabled is None:
        enabled = env_enabled()
    if not enabled:
        return False
    if cpu_collectives and not getattr(jax.config, "jax_cpu_collectives_implementation", "unknown"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES", "SGA_JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID", "SGA_JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except ValueError as e:  # no coordinator given and none auto-detected (not a cluster job)
        raise ConfigError(
            f"distributed=true but no coordinator was found ({' '.join(str(e).split())}): set "
            "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i on every "
            "process, or launch under SLURM, Open MPI or on a TPU pod"
        ) from None
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that should write logs, results and checkpoints metadata)."""
    return jax.process_index() == 0


# ------------------------------------------------------------------------------ host <-> global


def global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` from a host value that every process holds in full.

    Each process materialises only the shards of its own devices, so this works with a sharding
    that spans devices of other processes (where ``jax.device_put`` of a local array may not).
    """
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_global(tree: Any, shardings: Any) -> Any:
    """:func:`global_array` over a pytree; ``shardings`` is a matching tree (or one sharding for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: global_array(x, shardings), tree)
    return jax.tree.map(global_array, tree, shardings)


def _to_host(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a full numpy array on every process (an all-gather across processes when the
    array is sharded over devices of several processes). A collective: call it on all processes."""
    return jax.tree.map(_to_host, tree)


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` on process 0 only (writing files, printing); returns its result there, else None."""
    return fn() if is_main_process() else None
