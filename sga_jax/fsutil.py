"""File-system safety: destinations we may replace, regular files only, checksums, an output-folder lock.

Every check here runs before anything is written, and raises an :class:`~sga_jax.errors.SgaJaxError`
naming the path, so the command line reports one line (exit code 2) and the user's files stay as
they were.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import stat
from pathlib import Path

from sga_jax.errors import ConfigError, ModelLoadError

# Written into every model folder we export: a non-empty folder without it is the user's, not ours.
EXPORT_MARKER = ".sga_jax_export"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(dst: str | os.PathLike, *, sources: tuple = (), overwrite: bool = False) -> Path:
    """Refuse a destination folder we must not replace; return it (expanded).

    Allowed: a path that does not exist, an empty folder, a folder we exported before (it holds
    :data:`EXPORT_MARKER`) or any folder when ``overwrite``. Never allowed, even with ``overwrite``:
    a file in the way, or a folder that is or contains one of ``sources`` (replacing it would delete
    the input)."""
    out = Path(dst).expanduser()
    real = out.resolve()
    for src in sources:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(s, real):
            raise ConfigError(f"destination {out} is or contains the source {src}; choose another folder")
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"destination {out} exists and is not a folder")
    if overwrite or (out / EXPORT_MARKER).is_file() or not any(out.iterdir()):
        return out
    raise ConfigError(
        f"destination {out} is a non-empty folder that sga_jax did not write; choose another folder "
        "or pass --overwrite to replace it"
    )


def write_marker(folder: Path) -> None:
    (folder / EXPORT_MARKER).write_text("written by sga_jax; this folder may be replaced by a later export\n")


# Inside an export's temporary folder (``.NAME.XXXXXXXX`` beside NAME) until it is renamed into
# place: the owner's pid and host, so a later export can tell a killed one's leftovers from a live one.
PARTIAL_MARKER = ".sga_jax_partial"


def mark_partial(tmp: Path) -> None:
    (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders that killed exports to ``out`` left beside it: named
    ``.{out.name}.*``, holding :data:`PARTIAL_MARKER`, written on this host by a process that is
    gone. A folder of a live export, of another host or without our marker is left alone."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for p in parent.glob(f".{glob_escape(out.name)}.*"):
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            owner = json.loads((p / PARTIAL_MARKER).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return glob.escape(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (after symlinks); a FIFO, device or folder would block or
    mislead a reader, so it is refused with a ModelLoadError."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise ModelLoadError(f"{what} {p}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{what} {p} is not a regular file")
    return p


# ------------------------------------------------------------------------------------ checksums


def tree_digest(folder: Path) -> str:
    """SHA-256 over the relative names and contents of every file under ``folder`` (sorted)."""
    h = hashlib.sha256()
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- lock


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/.lock`` for one run; the file names its holder.

    A second process that wants the same folder gets a ConfigError naming the holder's pid and host.
    The kernel drops the lock when the process dies, so a killed run never leaves it stuck."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl  # POSIX only: imported where the lock is taken, so the module imports anywhere

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"output_dir {self.path.parent} is in use by {holder}; "
                    "wait for it or use another output_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_os_error(e: OSError) -> str:
    """One line for an I/O fault: the file, the cause and, for a full disk, the space left."""
    name = e.filename or getattr(e, "filename2", None)
    cause = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = Path(name).parent if name else Path.cwd()
        try:
            import shutil

            free = shutil.disk_usage(where if where.exists() else Path.cwd()).free
            cause += f" ({free / 2**20:.1f} MiB free on that disk; free space or choose another folder)"
        except OSError:
            pass
    return f"{name}: {cause}" if name else cause


__all__ = [
    "EXPORT_MARKER",
    "FolderLock",
    "PARTIAL_MARKER",
    "check_destination",
    "describe_os_error",
    "mark_partial",
    "remove_stale_partials",
    "regular_file",
    "tree_digest",
    "write_marker",
]
