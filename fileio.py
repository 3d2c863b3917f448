"""Atomic file writes: write to a temporary file in the target folder, then rename.

A reader never sees a half-written file: either the old file (or none) or the whole new one.
The temporary file (``.<name>.<random>.tmp``) is locked (``flock``) while it is written, so a
process killed mid-write leaves a temporary file that nobody holds: ``remove_stale_temp_files``
tells it from one a live writer (another run sharing the folder) is still writing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from errors import RunError

# flock errors that mean "this file system keeps no locks" (some FUSE and network mounts).
_NO_LOCKS = (errno.EOPNOTSUPP, errno.ENOLCK, errno.ENOSYS, errno.EINVAL)


def _lock(fd: int, blocking: bool) -> bool | None:
    """An exclusive flock on ``fd``: True when taken, False when another process holds it, None
    when the file system keeps no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in _NO_LOCKS:
            return None
        raise
    return True


def _locked_temp_file(folder: Path, name: str) -> tuple[int, str]:
    """A new temporary file for ``name`` in ``folder``, locked. A cleaner may have taken it between
    its creation and the lock (it then looked stale) and unlinked it: then another is made."""
    while True:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        _lock(fd, blocking=True)
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp_name
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it to ``path``.
    The temporary file is removed when ``write`` or the rename fails, and stays locked until the
    rename (a killed process releases the lock with its descriptors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _locked_temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp_name, path)   # still locked: a cleaner never takes a finished file
    except BaseException:
        # Unlocked once closed: a cleaner may have removed it already.
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _remove_if_stale(path: Path) -> bool:
    """Remove the temporary file ``path`` when no process holds its lock (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):   # finished meanwhile, or another user's to judge
        return False
    try:
        if not _lock(fd, blocking=False):   # held by a live writer, or no locks to tell
            return False
        # Still the same file under that name: not renamed to its target meanwhile.
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            return False
        if same:
            path.unlink()
        return same
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the ``.*.tmp`` files of ``atomic_write`` in ``folder`` that no live process is
    writing (left by a killed process); the names removed, sorted. Files being written are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [path.name for path in sorted(folder.iterdir())
            if _is_temp_file(path.name) and path.is_file() and _remove_if_stale(path)]


def readable_size(num_bytes: int) -> str:
    """'2.9 GB', '512 bytes' (decimal units, as df -H)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, flag: str | None = None, *,
                   needed_for: str | None = None) -> None:
    """RunError, one line naming ``folder`` (and ``flag``, the option that moves it), unless the
    folder can be created, a file can be created in it, and its file system has ``need_bytes`` free
    (``needed_for`` says what for in the message)."""
    folder = Path(folder)
    move = f", or choose another folder with {flag}" if flag else ""
    if folder.exists() and not folder.is_dir():
        raise RunError(f"cannot write to {folder}: it is a file, not a folder; move the file{move}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise RunError(f"cannot write to {folder} ({error.strerror or error}); make it writable{move}") from error
    if free < need_bytes:
        purpose = f" for {needed_for}" if needed_for else ""
        raise RunError(f"{folder} has {readable_size(free)} free, {readable_size(need_bytes)} ({need_bytes} bytes) "
                       f"needed{purpose}; free space there{move}")


def atomic_save_npy(path: str | os.PathLike, array) -> Path:
    """``numpy.save`` to exactly ``path`` (no ``.npy`` appended), atomically."""
    import numpy as np

    return atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
