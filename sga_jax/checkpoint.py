"""Training checkpoints with Orbax: parameters + optimizer state + step, every N steps and at the end.

A checkpoint is written only after the step it records passed the divergence guard, so the newest
checkpoint is always a good one. Orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact; :class:`Checkpointer`
records a SHA-256 per checkpoint and restores the newest one whose bytes still match (falling back,
with a notice, past a damaged one). Retention keeps the newest ``keep`` plus the newest one the
divergence guard has measured good, so the guard can never leave a run without one. Together with a
data order and RNG derived from the step number (``sga_jax.train``), a resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sga_jax.errors import ConfigError
from sga_jax.fsutil import faults_at, tree_digest

CHECKSUMS = "checksums.json"  # {step: {"sha256": ..., "good": bool}}, beside the step folders


class Checkpointer:
    """Save / restore ``{"params", "opt_state"}`` pytrees plus a JSON ``meta`` dict per step.

    ``directory``: the run's ``checkpoints/`` folder. ``keep``: how many recent checkpoints to keep.
    Saves are synchronous (a 2-core CPU gains nothing from async saves, and a checkpoint must be
    complete before the guard can call it "last good").
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 2, cleanup: bool = False):
        self.directory = Path(directory).expanduser().resolve()
        self.keep = keep
        # Pruning is ours (see ``prune``): Orbax's max_to_keep would delete the last good checkpoint.
        # ``cleanup`` (the run that holds the folder's lock): Orbax removes the temporary folders of
        # saves that were killed or failed, which would otherwise keep their space.
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=cleanup
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
        """Write ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as checkpoint ``step``.

        A full disk is one ``OSError`` naming the checkpoint and the space it needs; the partial step
        is removed, and the earlier checkpoints stay as they were."""
        _drop_closed_loop_reports()
        held = _HeldLog()
        try:
            with held:  # Orbax logs a fault with its traceback from each of its threads
                self._save(step, state, meta)
        except Exception as e:
            code = _disk_full(e)
            if code is None:
                held.replay()
                raise
            self._remove_partial(step)  # the fault is ours to report, in one line: its logs go
            need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
            raise OSError(
                code,
                f"{os.strerror(code)} writing checkpoint {step} (it needs about {need / 2**20:.1f} MiB)",
                str(self.path(step)),
            ) from None
        held.replay()
        sums = self._sums()
        sums[str(step)] = {"sha256": tree_digest(self.path(step)), "good": False}
        self._write_sums(sums)
        self.prune()
        return self.path(step)

    def _save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def _remove_partial(self, step: int) -> None:
        """The folders a failed save of ``step`` left (Orbax writes ``<step>.orbax-checkpoint-tmp-*``).
        tensorstore's writes still in flight when Orbax gave up may create them again: removed until
        none comes back for a while (at most 2 s)."""
        deadline, quiet = time.monotonic() + 2.0, 0
        while quiet < 3 and time.monotonic() < deadline:
            found = [
                p
                for p in self.directory.glob(f"{step}*")
                if p.is_dir() and (p.name == str(step) or p.name.startswith(f"{step}."))
            ]
            for p in found:
                shutil.rmtree(p, ignore_errors=True)
            quiet = 0 if found else quiet + 1
            time.sleep(0.05)

    # -- integrity and retention -----------------------------------------------------------------

    def _sums_path(self) -> Path:
        return self.directory / CHECKSUMS

    def _sums(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._sums_path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_sums(self, sums: dict[str, Any]) -> None:
        tmp = self._sums_path().with_suffix(".tmp")
        try:
            with faults_at(self._sums_path()):
                tmp.write_text(json.dumps(sums, sort_keys=True))
                os.replace(tmp, self._sums_path())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def problem(self, step: int) -> str | None:
        """Why checkpoint ``step`` cannot be trusted, or None: its bytes must match the SHA-256 that
        ``checksums.json`` recorded; a checkpoint without a readable checksum (the file deleted or
        damaged) is not trusted either."""
        entry = self._sums().get(str(step))
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return f"no readable checksum for it in {self._sums_path()}"
        if not self.path(step).is_dir() or tree_digest(self.path(step)) != entry["sha256"]:
            return "its files do not match their checksum"
        return None

    def verify(self, step: int) -> bool:
        """Whether checkpoint ``step`` still has the bytes it was saved with (:meth:`problem`)."""
        return self.problem(step) is None

    def mark_good(self, step: int) -> None:
        """The divergence guard measured checkpoint ``step``'s parameters and found them good."""
        sums = self._sums()
        if str(step) in sums:
            sums[str(step)]["good"] = True
            self._write_sums(sums)
            self.prune()

    def last_good(self) -> int | None:
        """The newest checkpoint that verifies (its bytes match its checksum)."""
        for step in sorted(self.all_steps(), reverse=True):
            if self.verify(step):
                return step
        return None

    def delete(self, step: int) -> None:
        self._manager.delete(step)
        sums = self._sums()
        if sums.pop(str(step), None) is not None:
            self._write_sums(sums)

    def prune(self) -> None:
        """Keep the newest ``keep`` checkpoints and, beyond them, the newest one the guard found good:
        the guard may still reject the newest, and a run must never be left with none."""
        if self.keep is None:
            return
        steps = sorted(self.all_steps(), reverse=True)
        keep = set(steps[: max(self.keep, 1)])
        sums = self._sums()
        good = [s for s in steps if sums.get(str(s), {}).get("good")]
        if good:
            keep.add(good[0])
        for step in steps:
            if step not in keep:
                self.delete(step)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` (newest when None) onto the structure, shapes, dtypes and
        shardings of ``abstract_state`` (e.g. ``jax.eval_shape`` of the live state)."""
        if step is not None:
            return self._restore(step, abstract_state)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise ConfigError(f"no checkpoint to restore in {self.directory}")
        damaged: list[int] = []
        for i, step in enumerate(steps):
            problem = self.problem(step)
            if problem is None:
                try:
                    restored = self._restore(step, abstract_state)
                except Exception as e:  # a missing / truncated file Orbax cannot read
                    problem = " ".join(str(e).split())[:160]
                else:
                    for bad in damaged:  # the run goes on from `step` and will write these again
                        self.delete(bad)
                    return restored
            damaged.append(step)
            older = steps[i + 1] if i + 1 < len(steps) else None
            print(
                f"sga-jax: warning: checkpoint {self.path(step)} is damaged ({problem}); "
                + (f"falling back to step {older}" if older is not None else "no older one")
                + " (the damaged one is removed when an older one restores)",
                file=sys.stderr,
            )
        raise ConfigError(
            f"no intact checkpoint in {self.directory}; use another output_dir or train.resume=false"
        )

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        problem = self.problem(step)
        if problem is not None:
            raise ConfigError(f"checkpoint {self.path(step)} is not trusted: {problem}")
        target = jax.tree.map(_abstract, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["meta"] or {})

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the ``params`` of checkpoint ``step`` (a partial restore: the optimizer state is
        not read); leaves the checkpoint lacks stay ``ShapeDtypeStruct``s for the caller to name."""
        target = jax.tree.map(_abstract, abstract_params)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)
            ),
        )
        return restored["state"]["params"]

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


class _HeldLog(logging.Filter):
    """Holds what Orbax logs (the ``absl`` logger) at WARNING and above while a save runs: replayed
    when the save succeeds or fails for another reason, dropped when the fault is a full disk (the
    one line of :meth:`Checkpointer.save` replaces one traceback per Orbax thread)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.records.append(record)
        return False

    def __enter__(self) -> _HeldLog:
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("absl").removeFilter(self)

    def replay(self) -> None:
        log = logging.getLogger("absl")
        for record in self.records:
            log.handle(record)
        self.records = []


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _drop_closed_loop_reports() -> None:
    """After Orbax gave up on a failed save, tensorstore completes the writes still in flight on its
    closed event loop: each reports ``RuntimeError('Event loop is closed')`` as an unraisable
    exception with its traceback, dozens of them after the one line that says what failed. Those
    are dropped (they say nothing); every other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "sga_jax_closed_loop", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook.sga_jax_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    # Orbax's write tasks that failed on the same fault are collected later, and asyncio logs each
    # as "Task exception was never retrieved" with its traceback: dropped too, only for that fault.
    logging.getLogger("asyncio").addFilter(_unretrieved_disk_faults)


def _unretrieved_disk_faults(record: logging.LogRecord) -> bool:
    """asyncio's default handler logs a task's unretrieved exception with ``exc_info``."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or _disk_full(exc) is None


def _disk_full(e: BaseException) -> int | None:
    """The errno of a full disk / quota / file-size fault anywhere in ``e``'s cause chain (Orbax and
    tensorstore re-raise I/O faults wrapped in their own exceptions), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.errno
        found = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's own ValueError
        if found and int(found.group(1)) in _DISK_FULL:
            return int(found.group(1))
        if "No space left on device" in str(e):
            return errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


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
        step = ckpt.last_good() if step is None else step
        if step is None:
            raise ConfigError(f"no intact checkpoint in {checkpoint_dir}")
        problem = ckpt.problem(step)
        if problem is not None:
            raise ConfigError(f"checkpoint {ckpt.path(step)} is not trusted: {problem}")
        params = ckpt.restore_params(step, abstract_params)
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
