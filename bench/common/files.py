"""Safe file writing, hashing and lock files shared by every stage.

Every stage writes through `atomic_path`: the output appears under its final
name only once it is complete, so a killed run never leaves a half file that
looks whole. `config_hash` fingerprints the inputs of a stage so a rerun can
tell a valid cached output from a stale one.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "out.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (d / "out.txt").read_text()
    'done'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.common.errors import BenchError, WriteError

_PARTIAL_MARK = ".partial-"
# OS errors that mean "this output cannot be written here": they end the stage with one line (WriteError)
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EACCES, errno.EPERM})


def write_errno(exc: BaseException) -> int | None:
    """The errno of an OS error that means the output cannot be written, else None.

    h5py reports failures as OSError without an errno but with "errno = 30" in its message.
    """
    if not isinstance(exc, OSError) or isinstance(exc, BenchError):
        return None
    code = exc.errno
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in WRITE_ERRNOS else None


def partial_name(path: Path) -> Path:
    """Temporary sibling of `path` used while it is being written."""
    return path.with_name(f".{path.name}{_PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_partial(path: Path) -> bool:
    """True for a temporary file left behind by an interrupted write."""
    return path.name.startswith(".") and _PARTIAL_MARK in path.name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; rename it to `path` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed
    and `path` is left as it was, so an existing good file is never damaged.

    Raises:
        WriteError: the folder is read-only, the disk full or the device failing (one line
            naming `path` and the OS error; the cleanup never hides it).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if write_errno(exc) is None:
            raise
        raise WriteError(final.parent, exc) from None
    tmp = partial_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {final} produced no file at {tmp}")
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # nothing to remove, or a folder that refuses it too
            tmp.unlink()
        if write_errno(exc) is not None:
            raise WriteError(final, exc) from None
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    final = Path(path)
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON atomically; non-JSON values fail loudly."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 20.0 and 20 describe the same magnification
    return obj


def config_hash(config: Mapping[str, Any], length: int = 16) -> str:
    """Stable short hash of a JSON-like config (key order and 20 vs 20.0 do not matter)."""
    blob = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class LockHeld(BenchError):
    """Another live process holds the lock for this output."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], stale_after: float = 6 * 3600) -> Iterator[Path]:
    """Exclusive lock file for one output (TRIDENT-style batch jobs).

    Several workers can share a folder of slides: each takes the lock of a slide
    before working on it and skips slides whose lock is held. A lock whose owner
    process is gone (same host) or older than `stale_after` seconds is taken over.

    Raises:
        LockHeld: a live process holds the lock.
    """
    lock = Path(f"{path}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if write_errno(exc) is None:
            raise
        raise WriteError(lock.parent, exc) from None
    owner = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            if not isinstance(exc, FileExistsError):
                if write_errno(exc) is None:
                    raise
                raise WriteError(lock, exc) from None
            if _lock_is_stale(lock, stale_after):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise LockHeld(f"{lock} is held by {lock.read_text(errors='replace').strip() or 'another process'}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(owner)
        except OSError as exc:  # a full disk: no lock file is left behind
            with contextlib.suppress(OSError):
                lock.unlink()
            if write_errno(exc) is None:
                raise
            raise WriteError(lock, exc) from None
        break
    else:  # pragma: no cover - only when two processes race for a stale lock
        raise LockHeld(f"{lock} was taken by another process")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _lock_is_stale(lock: Path, stale_after: float) -> bool:
    try:
        host, pid, started = lock.read_text().strip().split(":")
    except (OSError, ValueError):
        return True
    if time.time() - float(started) > stale_after:
        return True
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False
