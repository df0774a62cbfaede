"""Launching GMA jobs with torchrun and never hanging silently.

The parent (`run_job`) writes a job file, starts

    python -m torch.distributed.run --standalone --nproc-per-node N+1 -m e2e.gma --job FILE

in its own process session, streams the ranks' output, tails the event log
rank 0 appends to (one JSON line per step heartbeat and per epoch) and hands
epoch events to a callback (Optuna pruning). Three layers stop a broken job:

1. every collective runs under the process group's timeout (`timeout_s`): a
   rank that hangs makes its peers fail with a timeout, a rank that dies makes
   them fail at once (gloo sees the closed connection);
2. torchrun's agent stops every worker as soon as one exits with an error;
3. the parent kills the whole session when nothing happened for
   `timeout_s + 60` seconds (a hang outside any collective, or a start-up that
   never gets going); the ranks' own timeouts normally fire first.

A job outlives nobody: the job file carries the launching process (`launch`:
pid, its start time, a nonce); on Linux torchrun gets a parent-death signal
(SIGTERM, which it forwards to the ranks), and every rank runs a watchdog
thread that ends the rank when the launcher or torchrun is gone; rank 0 checks
again before it writes its result. Every path in the job file and on the
command line is absolute (torchrun starts in the source folder, not the
caller's).

Each rank that fails writes `errors/rank<r>.json` (type, message, epoch, time);
the parent turns those and torchrun's failure summary into one error that says
which rank failed first and why, of the failing rank's own error type
(ConfigError, DataError, SlideError) or TrainingError.

Rank side: `init_distributed` checks the torchrun environment before anything
is built (missing rendezvous address, world size < 2), `EventLog` and
`write_error` are the two files ranks write, `start_watchdog` / `ensure_launcher` stop
an orphaned rank, `inject_fault` is the test hook.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import errors as bench_errors
from bench.common.errors import BenchError, ConfigError, TrainingError
from bench.common.files import write_json_atomic

EVENTS = "events.jsonl"
ERRORS = "errors"
PROGRESS = "progress"
JOB = "job.json"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# error types a rank may raise that the parent re-raises as themselves (bad input, not a crash)
_PASS_THROUGH = ("ConfigError", "DataError", "SlideError", "MissingFileError")
LAUNCH = "launch"  # job key: the process that launched the job (pid, its start time, a nonce)
# the path fields of a job ("a.b": key b of table a, "a.*": every value of table a); `write_job`
# makes them absolute, since torchrun runs in the source folder, not in the caller's
JOB_PATHS = ("out", "folder", "tiles_dirs.*", "bags.split_path", "cohort.root", "cohort.labels", "cohort.slide_dir",
             "config.weights")
# path variables of the child's environment made absolute the same way (os.pathsep lists for PYTHONPATH)
_ENV_PATHS = ("PYTHONPATH", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME")
WATCH_INTERVAL_S = 1.0  # how often a rank's watchdog looks for its launcher
ORPHAN_EXIT = 75  # exit status of a rank that stopped because its launcher is gone


_BY_HAND = f" (to run this job file by hand with torchrun, delete its {LAUNCH!r} entry)"


class LauncherGone(BenchError):
    """The process that launched this job is gone: a rank stops without writing anything."""


# ----------------------------------------------------------------------------- rank side


def torchrun_env() -> dict[str, str]:
    """The torchrun variables of this process; a ConfigError naming the missing ones."""
    missing = [k for k in _TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"e2e.gma must be started by torchrun, which sets the rendezvous address and ranks; "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Run "
            "`torchrun --nproc-per-node N+1 -m e2e.gma --job FILE` (one node) or `bench train --paradigm gma`")
    env = {k: os.environ[k] for k in _TORCHRUN_ENV}
    world = int(env["WORLD_SIZE"])
    if world < 2:
        raise ConfigError(f"GMA needs a world size >= 2 (1 aggregator rank + N >= 1 encoder ranks), got WORLD_SIZE="
                          f"{world}; use --nproc-per-node 3 (or more), or mode = 'chunked' on one device")
    return env


def init_distributed(backend: str, timeout_s: float, device: str = "auto") -> tuple[Any, str]:
    """Join the process group; returns (this rank's device, backend used).

    `backend` "auto" means NCCL when CUDA is used, else gloo. On CUDA each rank
    takes GPU LOCAL_RANK of its node. Every collective afterwards fails after
    `timeout_s` seconds instead of waiting forever.
    """
    import torch
    import torch.distributed as dist

    env = torchrun_env()
    local = int(env["LOCAL_RANK"])
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this node")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start at "
                              "most that many processes per node (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("backend 'nccl' needs CUDA devices; use backend = 'gloo' (or 'auto') on CPU")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend must be auto, gloo or nccl, got {backend!r}")
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=float(timeout_s))}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(backend, **kwargs)
    return dev, backend


class EventLog:
    """Rank 0's append-only JSON-lines log that the parent tails (heartbeats, epochs)."""

    def __init__(self, path: str | Path | None, min_interval: float = 2.0) -> None:
        self.path = Path(path) if path else None
        self.min_interval = min_interval
        self._last = 0.0

    def write(self, event: str, **values: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "time": time.time(), **values}, default=float) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)  # one write of a whole line: the reader never sees half an event
        self._last = time.monotonic()

    def heartbeat(self, **values: Any) -> None:
        """A progress line, at most every `min_interval` seconds."""
        if time.monotonic() - self._last >= self.min_interval:
            self.write("heartbeat", **values)


def write_error(folder: str | Path, rank: int, exc: BaseException) -> None:
    """Record why this rank failed, for the parent's message."""
    info = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "epoch": getattr(exc, "epoch", None),
        "communication": bool(getattr(exc, "communication", False)),
        "time": time.time(),
        "traceback": "" if isinstance(exc, BenchError) else traceback.format_exc(limit=20),
    }
    try:
        write_json_atomic(Path(folder) / ERRORS / f"rank{rank}.json", info)
    except OSError:
        pass  # the error itself still reaches stderr


def progress_file(folder: str | Path, rank: int) -> Path:
    """Where a rank announces the collective it enters (`DistTopology.progress_path`)."""
    path = Path(folder) / PROGRESS / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _laggards(folder: Path) -> str | None:
    """'rank r fell behind ...' when some ranks stopped earlier in the step sequence than the others."""
    seen: dict[int, tuple[tuple[int, int], str]] = {}
    for path in (folder / PROGRESS).glob("rank*.txt"):
        try:
            rnd, phase, what = path.read_text(encoding="utf-8").strip().split("\t", 2)
            seen[int(path.stem[4:])] = ((int(rnd), int(phase)), what)
        except (OSError, ValueError):
            continue
    if len(seen) < 2:
        return None
    first = min(k for k, _ in seen.values())
    last = max(k for k, _ in seen.values())
    if first == last:
        return None
    behind = sorted(r for r, (k, _) in seen.items() if k == first)
    lead = min(r for r, (k, _) in seen.items() if k == last)
    return (f"rank(s) {', '.join(map(str, behind))} fell behind: last seen {seen[behind[0]][1]!r}, while rank "
            f"{lead} had reached {seen[lead][1]!r} (a rank that hangs or dies stops first)")


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc; ("gone", "") if none; None without /proc."""
    try:
        data = Path(f"/proc/{int(pid)}/stat").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ("gone", "") if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def launcher_info() -> dict[str, Any]:
    """What a job records about the process that launches it (checked by `launcher_gone`)."""
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "start": stat[1] if stat else None, "host": socket.gethostname(),
            "nonce": uuid.uuid4().hex, "time": time.time()}


def launcher_gone(job: Mapping[str, Any], *, check_job_file: bool = False) -> str | None:
    """Why the job's launcher is gone (it exited, or its pid now belongs to another process), else None.

    With `check_job_file`, also when the job file in the job's folder now
    carries another nonce (a newer launch took the folder over). A job without
    `launch` (torchrun started by hand), or a rank on another host than the
    launcher (its pid means nothing there), has no launcher to watch: None.
    """
    info = job.get(LAUNCH)
    if not info or info.get("host", socket.gethostname()) != socket.gethostname():
        return None
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"the process that launched this job (pid {pid}) is gone"
    except PermissionError:
        pass  # a process of another user holds the pid: /proc tells it apart below
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("gone", "Z", "X"):
            return f"the process that launched this job (pid {pid}) has exited"
        if info.get("start") and start != info["start"]:
            return f"the process that launched this job (pid {pid}) is gone; the pid now belongs to another process"
    if check_job_file:
        path = Path(job.get("folder") or job["out"]) / JOB
        try:
            nonce = (json.loads(path.read_text(encoding="utf-8")).get(LAUNCH) or {}).get("nonce")
        except (OSError, json.JSONDecodeError, AttributeError):
            nonce = info.get("nonce")  # no readable job file there: nothing says another launch took over
        if nonce != info.get("nonce"):
            return f"{path} now belongs to another launch"
    return None


def ensure_launcher(job: Mapping[str, Any], *, check_job_file: bool = False) -> None:
    """Raise LauncherGone when the job's launcher is gone (call before writing results or weights)."""
    reason = launcher_gone(job, check_job_file=check_job_file)
    if reason:
        raise LauncherGone(f"{reason}; stopping without writing results{_BY_HAND}")


def start_watchdog(job: Mapping[str, Any], rank: int, interval: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """A daemon thread that ends this rank (exit status ORPHAN_EXIT) once the launcher or its parent is gone.

    The parent is torchrun: if it vanished, this rank was re-parented (its
    parent pid changed). Nothing is written on the way out (`os._exit`: no
    cleanup, no finally blocks), so a rank that outlived its job cannot
    overwrite results of a later one. Jobs without `launch`: no watchdog.
    """
    if not job.get(LAUNCH):
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            reason = launcher_gone(job)
            if reason is None and os.getppid() != parent:
                reason = f"torchrun (pid {parent}), which started this rank, is gone"
            if reason:
                try:
                    print(f"rank {rank}: {reason}; stopping without writing results{_BY_HAND}", file=sys.stderr,
                          flush=True)
                except Exception:  # noqa: BLE001 - the console may be gone with the launcher
                    pass
                os._exit(ORPHAN_EXIT)

    thread = threading.Thread(target=watch, name="gma-watchdog", daemon=True)
    thread.start()
    return thread


def inject_fault(fault: Mapping[str, Any] | None, rank: int, epoch: int, step: int) -> None:
    """Test hook from the job file: {"rank": r | "all", "epoch": e, "step": s, "kind": "kill" | "hang" | "raise"}."""
    if not fault or (fault.get("rank") != "all" and int(fault.get("rank", -1)) != rank):
        return
    if int(fault.get("epoch", 0)) != epoch or int(fault.get("step", 0)) != step:
        return
    kind = fault.get("kind")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at epoch {epoch}, step {step}")


# ----------------------------------------------------------------------------- parent side


def _absolute(value: Any) -> str:
    return str(Path(value).expanduser().resolve())


def _path_str(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a GMA job holds {type(value).__name__} {value!r}, which is not JSON")


def absolute_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `job` with every path field (`JOB_PATHS`) absolute, relative ones taken from the current folder."""
    out = json.loads(json.dumps(dict(job), default=_path_str))  # a deep copy; Path values become strings
    for field in JOB_PATHS:
        *parents, key = field.split(".")
        table: Any = out
        for name in parents:
            table = table.get(name) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            continue
        for k in (list(table) if key == "*" else [key]):
            if table.get(k) not in (None, ""):
                table[k] = _absolute(table[k])
    return out


def write_job(job: Mapping[str, Any], folder: str | Path) -> Path:
    """Write `folder/job.json` with absolute paths (`absolute_job`); returns its absolute path."""
    path = Path(_absolute(folder)) / JOB
    write_json_atomic(path, absolute_job(job))
    return path


def torchrun_command(job_path: Path, nproc: int) -> list[str]:
    """The one-node launch (`--standalone` picks a free rendezvous port); the job path made absolute."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "--max-restarts=0", "--monitor-interval=0.2", "-m", "e2e.gma", "--job", _absolute(job_path)]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of torchrun and its ranks.

    OMP_NUM_THREADS defaults to 1 (what torchrun would set, with a banner on
    the console, for more than one process per node); path variables are made
    absolute; torchrun variables of a parent that itself runs under torchrun
    are dropped.
    """
    out = dict(os.environ if env is None else env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL: a timed-out collective aborts
    out.setdefault("OMP_NUM_THREADS", "1")
    for k in _TORCHRUN_ENV + ("GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        out.pop(k, None)  # a parent started by torchrun must not leak its own ranks
    for k in _ENV_PATHS:
        if out.get(k):
            out[k] = os.pathsep.join(_absolute(p) if p else p for p in out[k].split(os.pathsep))
    return out


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn for Popen: on Linux the child gets SIGTERM when the launching thread dies (even by SIGKILL).

    torchrun handles SIGTERM by stopping its ranks. The signal follows the
    thread that started the child, which `run_job` keeps waiting until the job
    ends. The ctypes function is looked up here, before the fork; the child only
    calls it. None elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os._exit(1)

    return preexec


def _kill_session(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the job's process session (torchrun and its ranks), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Tail:
    """Reads complete new lines of a growing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return [line for line in data[: end + 1].decode("utf-8", errors="replace").splitlines() if line.strip()]


def run_job(job: Mapping[str, Any], folder: Path, nproc: int, *, timeout_s: float,
            on_event: Callable[[dict], None] | None = None, echo: bool = True,
            env: Mapping[str, str] | None = None, slack_s: float = 60.0) -> float:
    """Run one GMA job to the end; returns its wall-clock seconds.

    Args:
        job: the job (JSON-able); `folder` receives job.json, events.jsonl, errors/. Relative
            paths (`folder` and the job's `JOB_PATHS`) are taken from the current folder and
            written absolute; the job gets `launch` (this process, see `launcher_gone`).
        nproc: world size (1 aggregator + N encoder ranks).
        timeout_s: the ranks' collective timeout; the parent gives up after
            `timeout_s + slack_s` seconds without any event or output.
        on_event: called with every event rank 0 logs; if it raises, the job is
            terminated and the exception propagates (e.g. optuna.TrialPruned).
        echo: forward the ranks' output to stderr.

    Raises:
        ConfigError / DataError / SlideError: a rank refused its input.
        TrainingError: a rank failed, died or hung, or the job stopped making progress.
    """
    folder = Path(_absolute(folder))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / EVENTS, *sorted((folder / ERRORS).glob("rank*.json")),
                  *sorted((folder / PROGRESS).glob("rank*.txt"))]:
        stale.unlink(missing_ok=True)  # a previous attempt's events/errors would confuse this one
    job_path = write_job({**dict(job), LAUNCH: launcher_info()}, folder)
    start = time.monotonic()
    # cwd: the source root, so that `-m e2e.gma` imports; every path the ranks get is absolute (write_job).
    # Own session: Ctrl-C in the console reaches the parent only, which stops the job (_kill_session).
    proc = subprocess.Popen(torchrun_command(job_path, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent(), env=child_env(env),
                            cwd=str(Path(__file__).resolve().parents[2]))
    tail: deque[str] = deque(maxlen=300)
    last_activity = [time.monotonic()]
    stopping = threading.Event()  # set when this process stops the job: torchrun's shutdown noise is not echoed

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            tail.append(line)
            last_activity[0] = time.monotonic()
            if echo and not stopping.is_set():
                print(f"[gma] {line}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    events = _Tail(folder / EVENTS)
    limit = float(timeout_s) + float(slack_s)  # slack: start-up (imports on a loaded machine), teardown
    try:
        while True:
            done = proc.poll() is not None
            for line in events.lines():
                last_activity[0] = time.monotonic()
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if on_event is not None:
                    on_event(event)
            if done:
                break
            idle = time.monotonic() - last_activity[0]
            if idle > limit:
                stopping.set()
                _kill_session(proc)
                raise TrainingError(
                    f"GMA job made no progress for {idle:.0f} s (limit {limit:.0f} s from timeout_s={timeout_s:g}) "
                    f"and was stopped; a rank hangs outside any collective. Last output:\n" + _last(tail))
            time.sleep(0.2)
    except BaseException:
        stopping.set()  # Ctrl-C, a pruned trial, a failure: the ranks' tracebacks from our SIGTERM are noise
        _kill_session(proc)
        raise
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise job_error(folder, proc.returncode, list(tail))
    return time.monotonic() - start


def _last(lines: Any, n: int = 15) -> str:
    rows = [ln for ln in list(lines) if ln.strip()][-n:]
    return "\n".join(f"  | {ln[:300]}" for ln in rows)


_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _exit_codes(output: list[str]) -> dict[int, int]:
    """rank -> exit code from torchrun's failure summary (negative: killed by that signal)."""
    out: dict[int, int] = {}
    for block in "\n".join(output).split("time      :")[1:]:
        m = _FAILURE.search(block)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def job_error(folder: Path, returncode: int, output: list[str]) -> BenchError:
    """One error for a failed job: the root cause first, then what the other ranks saw."""
    reports = []
    for path in sorted((folder / ERRORS).glob("rank*.json")):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    codes = _exit_codes(output)
    reported = {int(r["rank"]) for r in reports}
    # killed by something other than torchrun's own SIGTERM: the rank died (SIGKILL, OOM killer, segfault)
    deaths = {rank: _signal_name(c) for rank, c in codes.items() if c < 0 and -c != signal.SIGTERM}
    # stopped by torchrun while still running, without an error: in a hang, the rank that hung
    silent = sorted(rank for rank, c in codes.items() if -c == signal.SIGTERM and rank not in reported)
    primary = sorted((r for r in reports if not r.get("communication")), key=lambda r: r.get("time", 0.0))
    secondary = sorted((r for r in reports if r.get("communication")), key=lambda r: r.get("time", 0.0))
    root: dict[str, Any] = {"type": "TrainingError", "epoch": None}
    others = primary[1:] + secondary
    lag = None if primary or deaths else _laggards(folder)
    if primary:
        root = primary[0]
        head = f"rank {root['rank']} failed: {root['type']}: {root['message']}"
    elif deaths:
        rank, sig = sorted(deaths.items())[0]
        deaths.pop(rank)
        head = f"rank {rank} died ({sig}) without reporting an error (killed, or out of memory)"
    elif lag:  # a hang: the rank that stopped first, then the timeouts the others hit
        root = {**(secondary[0] if secondary else root), "traceback": ""}
        head = lag
    elif secondary:
        root, others = secondary[0], secondary[1:]
        head = root["message"]
    else:
        head = f"torchrun exited with status {returncode} and no rank reported an error"
    lines = [f"rank {r['rank']}: {r['type']}: {r['message'][:300]}" for r in others]
    lines += [f"rank {rank}: killed by {sig}" for rank, sig in sorted(deaths.items())]
    if silent and not primary and not lag:
        lines.append(f"rank(s) {', '.join(map(str, silent))} reported no error and were still running when the "
                     "job was stopped (if a rank hung, it is among them)")
    if root.get("traceback"):
        lines.append("traceback of the root cause:\n" + root["traceback"].rstrip())
    message = f"GMA job failed: {head}"
    if lines:
        message += "\n" + "\n".join(lines)
    if not reports:
        message += "\nlast output:\n" + _last(output)
    if root["type"] in _PASS_THROUGH:
        return getattr(bench_errors, root["type"])(message)
    return TrainingError(message, epoch=root.get("epoch"))
