"""Training checkpoints with Orbax: parameters + optimizer state + step, every N steps and at the end.

A checkpoint is written only after the step it records passed the divergence guard, so the newest
checkpoint is always a good one. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact; :class:`Checkpointer`
restores the newest complete one. Together with a data order and RNG derived from the step number
(``sga_jax.train``), a resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sga_jax.errors import ConfigError


class Checkpointer:
    """Save / restore ``{"params", "opt_state"}`` pytrees plus a JSON ``meta`` dict per step.

    ``directory``: the run's ``checkpoints/`` folder. ``keep``: how many recent checkpoints to keep.
    Saves are synchronous (a 2-core CPU gains nothing from async saves, and a checkpoint must be
    complete before the guard can call it "last good").
    """

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).expanduser().resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries ---------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save / restore --------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> Path:
        """Write ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return self.path(step)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` (newest when None) onto the structure, shapes, dtypes and
        shardings of ``abstract_state`` (e.g. ``jax.eval_shape`` of the live state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint to restore in {self.directory}")
        target = jax.tree.map(_abstract, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "dtype"):
        return np.asarray(obj).tolist()
    return obj


def load_params(checkpoint_dir: str | Path, abstract_params: Any, step: int | None = None) -> Any:
    """Only the parameters of a checkpoint (e.g. to export the last good one after a divergence)."""
    ckpt = Checkpointer(checkpoint_dir)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {checkpoint_dir}")
        target = jax.tree.map(_abstract, abstract_params)
        restored = ckpt._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)
            ),
        )
        params = restored["state"]["params"]
        missing = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if isinstance(leaf, jax.ShapeDtypeStruct)
        ]
        if missing:
            raise ConfigError(
                f"checkpoint {ckpt.path(step)} does not hold parameter {missing[0]} of this model "
                f"({len(missing)} missing; was it saved with other model settings, e.g. model.scan_layers?)"
            )
        return params
    finally:
        ckpt.close()


__all__ = ["Checkpointer", "load_params"]
