"""File-system safety: destinations we may replace, regular files only, checksums, an output-folder lock.

Every check here runs before anything is written, and raises an :class:`~sga_jax.errors.SgaJaxError`
naming the path, so the command line reports one line (exit code 2) and the user's files stay as
they were.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sga_jax.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Written into every model folder we export: a non-empty folder without it is the user's, not ours.
EXPORT_MARKER = ".sga_jax_export"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(dst: str | os.PathLike, *, sources: tuple = (), overwrite: bool = False) -> Path:
    """Refuse a destination folder we must not replace; return it (expanded).

    Allowed: a path that does not exist, an empty folder, a folder whose every file is listed in its
    :data:`EXPORT_MARKER` (the files an earlier export of ours wrote; a file the user added since,
    e.g. ``NOTES.md`` or ``eval/``, makes the folder theirs) or any folder when ``overwrite``. Never
    allowed, even with ``overwrite``: a file in the way, or a folder that is or contains one of
    ``sources`` (replacing it would delete the input)."""
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
    if overwrite or not any(out.iterdir()):
        return out
    if not (out / EXPORT_MARKER).is_file():
        raise ConfigError(
            f"destination {out} is a non-empty folder that sga_jax did not write; choose another folder "
            "or pass --overwrite to replace it"
        )
    foreign = foreign_files(out)
    if foreign:
        raise ConfigError(
            f"destination {out} holds {len(foreign)} files sga_jax did not write (e.g. {foreign[0]}); "
            "choose another folder or pass --overwrite to replace it"
        )
    return out


# Names an export wrote before markers listed their files (a plain-text marker): model, config and
# tokenizer files at the top level or in ``adapter/``.
_LEGACY_EXPORT = (".json", ".safetensors", ".txt", ".model", ".jinja")


def _listed(folder: Path) -> set[str] | None:
    """The files the marker of ``folder`` lists; None for a plain-text marker of an older export."""
    try:
        doc = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError, UnicodeError, RecursionError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    return {str(f) for f in files} if isinstance(files, list) else None


def foreign_files(folder: Path) -> list[str]:
    """The files (and links) under ``folder`` that its marker does not list as written by sga_jax."""
    listed = _listed(folder)
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == EXPORT_MARKER or (p.is_dir() and not p.is_symlink()):
            continue
        if listed is not None:
            ours = rel in listed and not p.is_symlink()
        else:
            parts = rel.split("/")
            ours = (len(parts) == 1 or (len(parts) == 2 and parts[0] == "adapter")) and (
                p.suffix in _LEGACY_EXPORT and not p.is_symlink()
            )
        if not ours:
            found.append(rel)
    return found


def write_marker(folder: Path, files: Iterable[str] | None = None) -> None:
    """Write :data:`EXPORT_MARKER` listing the files sga_jax wrote into ``folder``: ``files``
    (relative names) added to those an earlier marker listed, or, when None, every file now under
    ``folder`` (a fresh temporary export folder holds only ours)."""
    if files is None:
        names = {
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name not in (EXPORT_MARKER, PARTIAL_MARKER)
        }
    else:
        names = set(files) | (_listed(folder) or set())
    doc = {"written_by": "sga_jax", "note": "only these files may be replaced by a later export",
           "files": sorted(names)}  # fmt: skip
    atomic_write_text(folder / EXPORT_MARKER, json.dumps(doc, indent=1) + "\n")


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

        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, what="the run lock")
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


def refuse_link(path: Path, what: str = "file") -> None:
    """A ConfigError when ``path`` is a symbolic link: sga_jax never writes through one (a linked
    ``.lock`` or ``metrics.jsonl`` would truncate or replace the file it points to)."""
    if Path(path).is_symlink():
        raise ConfigError(
            f"{what} {path} is a symbolic link; sga_jax does not write through links: remove it "
            "or use another folder"
        )


def open_nofollow(path: Path, flags: int, mode: int = 0o666, *, what: str = "file") -> int:
    """``os.open`` with ``O_NOFOLLOW``: a link at ``path`` is refused (ConfigError), not followed."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            refuse_link(path, what)
        raise


def ordinary_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode of an ordinary file of the user's (``0666 & ~umask``): ``mkstemp`` and
    safetensors' writer make 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` via a temporary file renamed into place (a link at ``path`` is replaced, never
    written through), with the user's umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with faults_at(path), os.fdopen(fd, "w") as f:  # a failed write names no file: name ours
            f.write(text)
        ordinary_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_figure(fig: Figure, path: Path) -> Path:
    """``fig.savefig`` to ``path`` (format from its suffix) as :func:`atomic_write_text` writes text:
    a temporary file with an unpredictable name, renamed into place, with the user's umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    try:
        with faults_at(path), os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png")
        ordinary_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def describe_os_error(e: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for an I/O fault: the file, the cause and, for a full disk, the space left on the
    disk that holds the file (its mount named). A fault without a file name (a buffered write) is
    placed at ``where`` (e.g. the run's ``output_dir``); never at the current directory, whose disk
    may not be the full one. A file-size fault names the limit, not the free space."""
    name = e.filename or getattr(e, "filename2", None) or where
    cause = e.strerror or str(e)
    if name is not None and e.errno in (errno.ENOSPC, errno.EDQUOT):
        space = disk_space(Path(name))
        advice = "your quota on it is used up" if e.errno == errno.EDQUOT else "free space"
        cause += f" ({space}; {advice} or choose another folder)" if space else ""
    elif name is not None and e.errno == errno.EFBIG:
        cause += " (a file-size limit: `ulimit -f`, or the largest file its file system holds)"
    return f"{name}: {cause}" if name else cause


@contextlib.contextmanager
def faults_at(path: str | os.PathLike) -> Iterator[None]:
    """Give an ``OSError`` that names no file (a failed buffered write) ``path`` as its file, so the
    one-line report names the disk that failed, not the current directory's."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(Path(path).expanduser())) from None


def disk_space(path: Path) -> str:
    """``N MiB free on the disk of DIR, mounted at MOUNT`` for the disk holding ``path`` (its
    nearest existing folder); empty when it cannot be measured."""
    folder = Path(os.path.abspath(path))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{free / 2**20:.1f} MiB free on the disk of {folder}, mounted at {mount}"


__all__ = [
    "EXPORT_MARKER",
    "FolderLock",
    "PARTIAL_MARKER",
    "atomic_write_text",
    "check_destination",
    "describe_os_error",
    "disk_space",
    "faults_at",
    "foreign_files",
    "open_nofollow",
    "ordinary_file_mode",
    "refuse_link",
    "mark_partial",
    "remove_stale_partials",
    "regular_file",
    "tree_digest",
    "write_marker",
]
