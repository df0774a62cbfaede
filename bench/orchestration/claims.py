"""Claims on work items that hold across processes and nodes sharing one work folder.

A claim is a file `<claims>/<item>.claim` made create-exclusive in an NFS-safe way: the
claimant writes a uniquely named file with its identity, then `os.link`s it to the claim
name and checks that the unique file has two links (`st_nlink == 2`). `link` is atomic on
NFS (v2 and later) and Lustre, unlike `O_CREAT | O_EXCL` on old NFS clients, and the link
count also tells the truth when the server's reply to a successful `link` was lost.

The content of a claim never changes (worker id, host, pid, a random token, when it was
claimed, the lease length); the lease is its modification time, which the holder's heartbeat
thread refreshes with `os.utime` every third of the lease. Refreshing a claim that another
worker has just taken over only extends that worker's lease, so the heartbeat needs no lock.

A claim whose modification time is older than its lease (a killed worker, a lost node) is
taken over: the taker renames it to a unique stale name (only one of several takers can
rename it), checks that what it renamed is the stale claim it judged (a holder that renewed in
between gets its claim linked back), removes it and claims as usual. A holder that lost its
claim notices at its next heartbeat or at `Claim.check()`, which every write of a final output
calls first (`LeaseLost`): a stale worker never writes over the new holder's output.

The lease is judged against this machine's clock while the claim's time comes from the file
server (utime with no time argument sets the server's time over NFS), so a lease should be
much longer than the clock skew between nodes (the default, 60 s, is).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> claim = try_claim(d / "item.claim", worker="w1", lease_s=30)
    >>> claim is not None and try_claim(d / "item.claim", worker="w2", lease_s=30) is None
    True
    >>> claim.release(); (d / "item.claim").exists()
    False
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common.errors import WriteError
from bench.common.files import write_errno

DEFAULT_LEASE_S = 60.0


class LeaseLost(Exception):
    """This worker no longer holds the claim of the item it works on (its lease ran out and
    another worker took the item over): it must not write the item's outputs.

    Not a BenchError on purpose: code that records a method's failure and goes on must let
    it through."""


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says about its holder, and how fresh its lease is."""

    path: Path
    worker: str
    host: str
    pid: int
    token: str
    claimed: float
    lease_s: float
    renewed: float  # the claim file's modification time

    @property
    def expires(self) -> float:
        return self.renewed + self.lease_s

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.expires

    def to_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "host": self.host, "pid": self.pid, "claimed": self.claimed,
                "lease_s": self.lease_s, "renewed": self.renewed, "expires": self.expires}


def read_claim(path: str | os.PathLike[str]) -> ClaimInfo | None:
    """The claim at `path`, or None when there is none (or it vanished while being read).

    A claim file that cannot be parsed (a claimant killed between writing and linking cannot
    leave one, but a disk can) counts as expired from its modification time with a zero lease.
    """
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return ClaimInfo(path, str(data["worker"]), str(data["host"]), int(data["pid"]), str(data["token"]),
                         float(data["claimed"]), float(data["lease_s"]), st.st_mtime)
    except (ValueError, KeyError, TypeError):
        return ClaimInfo(path, "?", "?", -1, "", st.st_mtime, 0.0, st.st_mtime)


def _unique(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:10]}")


def _link_exclusive(src: Path, dst: Path) -> bool:
    """Link `src` to `dst` unless `dst` exists; True when this call made the link (NFS-safe)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except OSError as exc:
        if write_errno(exc) is not None:
            raise WriteError(dst, exc) from None
        # e.g. a lost reply over NFS: the link count of our unique file tells whether it worked
    try:
        return os.stat(src).st_nlink == 2
    except FileNotFoundError:  # pragma: no cover - our own unique file is never removed by others
        return False


@dataclass
class Claim:
    """A claim this process holds; `start_heartbeat()` keeps its lease alive until `release()`."""

    info: ClaimInfo
    took_over: bool = False  # this claim replaced an expired one (its item may have a checkpoint to resume)
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def holds(self) -> bool:
        """True while the claim file is ours and its lease has not run out."""
        now = read_claim(self.path)
        return now is not None and now.token == self.info.token and not now.expired()

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the claim (call before writing a final output)."""
        if self.lost or not self.holds():
            self._lost.set()
            holder = read_claim(self.path)
            by = f"now held by {holder.worker} on {holder.host}" if holder is not None else "no longer claimed"
            raise LeaseLost(f"{self.path.name}: this worker ({self.info.worker}) lost its lease ({by}); "
                            "its output is not written")

    def renew(self) -> bool:
        """Refresh the lease (the claim file's mtime); False (and `lost`) when the claim is not ours any more."""
        if not self.holds():
            self._lost.set()
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)  # server time on NFS; on a claim just taken over it only extends the new lease
        return True

    def start_heartbeat(self, interval: float | None = None) -> Claim:
        """Renew the lease every `interval` seconds (default: a third of the lease) in a daemon thread."""
        every = self.info.lease_s / 3 if interval is None else interval

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        return
                except OSError:  # a hiccup of the file server: try again at the next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours (a taken-over claim is left alone)."""
        self.stop_heartbeat()
        aside = _unique(self.path, "release")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_claim(aside)
        if moved is not None and moved.token != self.info.token:  # not ours: put the new holder's claim back
            _link_exclusive(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()


def _write_unique(path: Path, data: dict[str, Any]) -> Path:
    tmp = _unique(path, "new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(json.dumps(data))
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if write_errno(exc) is None:
            raise
        raise WriteError(path, exc) from None
    return tmp


def try_claim(path: str | os.PathLike[str], *, worker: str, lease_s: float = DEFAULT_LEASE_S,
              take_over: bool = True) -> Claim | None:
    """Claim `path` for `worker`; None when a live claim of another worker holds it.

    An expired claim is taken over when `take_over` (see the module docstring).

    Raises:
        WriteError: the claims folder cannot be written (read-only, full disk), naming it.
    """
    path = Path(path)
    now = time.time()
    token = uuid.uuid4().hex
    data = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "claimed": now, "lease_s": float(lease_s)}
    tmp = _write_unique(path, data)
    took_over = False
    try:
        for _ in range(3):
            if _link_exclusive(tmp, path):
                os.utime(path)  # the lease starts now (the file was written a moment ago)
                info = read_claim(path)
                if info is None or info.token != token:  # pragma: no cover - removed under us by a taker
                    return None
                return Claim(info, took_over=took_over)
            held = read_claim(path)
            if held is None:
                continue  # released between our link and our look: try again
            if not (take_over and held.expired()):
                return None
            if not _take_over(path, held):
                return None
            took_over = True
        return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _take_over(path: Path, judged: ClaimInfo) -> bool:
    """Move an expired claim out of the way; False when another worker got there first or it was renewed."""
    aside = _unique(path, "stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # gone already (released or taken): claim as usual
    moved = read_claim(aside)
    if moved is not None and (moved.token != judged.token or not moved.expired()):
        # renewed or replaced between our look and the rename: give it back (unless someone claimed meanwhile)
        _link_exclusive(aside, path)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        return False
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()
    return True


__all__ = ["Claim", "ClaimInfo", "LeaseLost", "DEFAULT_LEASE_S", "read_claim", "try_claim"]
