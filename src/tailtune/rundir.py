"""Atomic writes for the run directory: a kill at any moment leaves the old file or the new one.

Each file is written to a temporary sibling, flushed and fsynced, then renamed over the
target (rename is atomic on POSIX). A system's outputs are written into a temporary folder
that is fsynced and renamed into place only when every file is complete; a checkpoint's files
are fsynced before the file that marks it complete.

Several processes may share one run directory (``tailtune train --system X`` per cluster job):
:func:`locked` serialises their updates of the run's shared files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def default_mode(path: Path | str, folder: bool = False) -> None:
    """Give ``path`` the mode a new file (0666) or folder (0777) gets under the umask: mkstemp
    and mkdtemp make them private (0600 / 0700), and every output came out unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def share_private_files(folder: Path) -> None:
    """Give each file under ``folder`` that a library wrote owner-only the mode a new file gets
    under the umask: safetensors' ``save_file`` writes 0600, so head, adapter and exported
    weights were unreadable to other accounts while every other output file was not."""
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.stat().st_mode & 0o077:
            default_mode(path)


def temp_dir(target: Path) -> Path:
    """A new empty folder next to ``target`` (``.<name>.<random>``), to be renamed into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    default_mode(tmp, folder=True)
    return tmp


WRITE_PROBE = ".tailtune-write-check."  # prefix of the file write_problem creates and removes


def write_problem(path: Path) -> tuple[Path, str | None]:
    """Whether a file can be created at ``path`` (a folder, or one still to be made):
    (the nearest existing folder it would be created in, None) when it can, else (that path,
    why not: "is a file", or the OS's reason in lower case).

    Tried with a real file: permission bits, read-only mounts and immutable folders all differ
    in what ``os.access`` reports, but none lets a file be created.
    """
    base = Path(path)
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return base, "is a file"
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=WRITE_PROBE)
    except OSError as exc:
        return base, (exc.strerror or str(exc)).lower()
    os.close(fd)
    os.unlink(probe)
    return base, None


STALE_SECONDS = 3600  # a temporary sibling older than this belongs to a process that was killed


def remove_stale(target: Path) -> None:
    """Remove temporary siblings of ``target`` (``.<name>.*``, from :func:`atomic_write` and
    :func:`temp_dir`) older than :data:`STALE_SECONDS`: a killed process leaves them, at the
    full size it had reached (239 MB for a GGUF conversion). A younger one may be another
    process's work in progress and is kept."""
    import time

    target = Path(target)
    for tmp in target.parent.glob(f".{target.name}.*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def atomic_write(path: Path, write: Callable, binary: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() (e.g. disk full) does not say where
        raise
    return path


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush everything under ``folder`` (with ``files``: its files and subfolders) and then its
    own entries to disk. Before a checkpoint's marker file is written or a finished folder is
    renamed into place, so that after a power loss what is marked complete holds every byte its
    files were given (the Trainer and ``save_pretrained`` write them unsynced); and after, so
    that the rename itself survives. Where a folder cannot be opened for fsync (Windows) only
    the files are synced."""
    folder = Path(folder)
    if files:
        for path in sorted(folder.iterdir()):
            if path.is_dir() and not path.is_symlink():
                sync_folder(path)
            elif path.is_file():
                with open(path, "r+b" if os.name == "nt" else "rb") as f:  # Windows' _commit needs write access
                    os.fsync(f.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data) -> Path:
    return atomic_write(path, lambda f: json.dump(data, f, indent=2, default=_json_default))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def write_csv(path: Path, frame) -> Path:
    return atomic_write(path, lambda f: frame.to_csv(f, index=False))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, replacing an older one; on disk first."""
    share_private_files(tmp)
    sync_folder(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    sync_folder(Path(target).parent, files=False)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_or_fail(path: Path, damaged: str):
    """The JSON in ``path``, or a one-line TailtuneError naming the file and what to do
    (``damaged``): a cut file, bytes that are not UTF-8 and a missing file all read alike."""
    from tailtune.errors import TailtuneError, first_line

    try:
        return read_json(path)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TailtuneError(f"{path} is not readable JSON ({first_line(exc)}); {damaged}") from None


@contextlib.contextmanager
def locked(folder: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` across processes; yields whether it is held.

    The lock is ``flock`` on the folder itself, so there is no lock file to leave behind, and a
    killed holder releases it. ``wait=False`` yields False at once when another process holds
    it. Where ``fcntl`` does not exist (Windows) nothing is locked and it yields True.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
