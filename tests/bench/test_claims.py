"""Claims on work items (bench.orchestration.claims) and the worker's record guard: fast, no training."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.orchestration.claims import LeaseLost, read_claim, try_claim


def test_a_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "claims" / "item.claim"
    first = try_claim(path, worker="a", lease_s=30)
    assert first is not None and not first.took_over
    assert try_claim(path, worker="b", lease_s=30) is None  # live claim: refused, not taken over
    held = read_claim(path)
    assert (held.worker, held.pid, held.host) == ("a", os.getpid(), os.uname().nodename)
    assert held.expires == pytest.approx(time.time() + 30, abs=5)
    first.release()
    assert not path.exists()
    again = try_claim(path, worker="b", lease_s=30)
    assert again is not None and read_claim(path).worker == "b"
    assert [p.name for p in path.parent.iterdir()] == ["item.claim"]  # no unique temp files left behind


def test_an_expired_claim_is_taken_over_and_its_holder_may_not_write(tmp_path):
    path = tmp_path / "item.claim"
    stale = try_claim(path, worker="a", lease_s=0.3)  # no heartbeat: a killed or frozen worker
    stale.check()  # still ours while the lease runs
    time.sleep(0.45)
    new = try_claim(path, worker="b", lease_s=30)
    assert new is not None and new.took_over
    with pytest.raises(LeaseLost, match="held by b"):
        stale.check()
    assert not stale.renew()  # its heartbeat stops too
    stale.release()  # a taken-over claim is left to its new holder
    assert read_claim(path).worker == "b"
    new.check()


def test_the_heartbeat_keeps_a_claim_past_its_lease(tmp_path):
    path = tmp_path / "item.claim"
    claim = try_claim(path, worker="a", lease_s=0.6).start_heartbeat()
    try:
        time.sleep(1.5)  # 2.5 leases
        assert try_claim(path, worker="b", lease_s=0.6) is None
        claim.check()
    finally:
        claim.release()
    assert not path.exists()


def _race(path: str, start: float, queue) -> None:
    while time.time() < start:
        pass
    claim = try_claim(Path(path), worker=f"p{os.getpid()}", lease_s=30)
    queue.put(claim is not None)


def test_racing_processes_get_one_claim_each_time(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"item{round_}.claim"
        queue = ctx.Queue()
        start = time.time() + 0.3
        procs = [ctx.Process(target=_race, args=(str(path), start, queue)) for _ in range(6)]
        for p in procs:
            p.start()
        wins = [queue.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sum(wins) == 1, wins


def test_racing_takers_of_one_expired_claim_leave_one_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "item.claim"
    try_claim(path, worker="dead", lease_s=0.1)
    time.sleep(0.2)
    queue = ctx.Queue()
    start = time.time() + 0.3
    procs = [ctx.Process(target=_race, args=(str(path), start, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    wins = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(wins) == 1, wins
    assert read_claim(path).worker != "dead"


def test_a_claim_on_a_read_only_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    import errno

    import bench.orchestration.claims as claims
    from bench.common.errors import WriteError

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(claims, "open", read_only, raising=False)  # tests run as root: chmod would not stop us
    with pytest.raises(WriteError, match=str(tmp_path / "item.claim")):
        try_claim(tmp_path / "item.claim", worker="a")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_lost_its_item_writes_neither_output_nor_record(tmp_path, monkeypatch):
    """The stale worker's item finishes after another worker took it over: its guard stops the writes."""
    import bench.orchestration.plan as plan_mod
    import bench.orchestration.worker as worker_mod
    from bench.orchestration.claims import Claim
    from bench.orchestration.plan import ItemResult, Plan, WorkItem, read_item_record
    from bench.orchestration.runner import RunOptions

    item = WorkItem("train/mini/m/holdout-seed0-fold0", "fake")
    plan = Plan(SimpleNamespace(name="s"), RunOptions(workdir=tmp_path), (item,))
    ctx = SimpleNamespace(plan=plan, options=plan.options)
    output = tmp_path / "output.txt"

    def slow_execute(ctx, item, guard=None):
        # meanwhile the lease ran out (this worker's heartbeat could not renew it) and "b" took the item over
        time.sleep(0.5)
        taker = try_claim(plan.state_dir / "claims" / f"{item.file_name}.claim", worker="b", lease_s=30)
        assert taker is not None and taker.took_over
        output.write_text("b")
        guard()  # what run_one does before write_run
        output.write_text("stale a")
        return ItemResult("ok")

    monkeypatch.setattr(worker_mod, "execute", slow_execute)
    monkeypatch.setattr(plan_mod, "_done", lambda ctx, item, record: False)
    monkeypatch.setattr(Claim, "renew", lambda self: True)  # a frozen heartbeat: the mtime is not refreshed
    opts = worker_mod.WorkerOptions(worker_id="a", lease_s=0.3)
    outcome = worker_mod._try_item(ctx, item, "a", opts, set())
    assert outcome["status"] == "lost"
    assert output.read_text() == "b"
    assert read_item_record(plan, item) is None  # no record by the stale worker
    assert read_claim(plan.state_dir / "claims" / f"{item.file_name}.claim").worker == "b"
    events = [e["event"] for e in plan_mod.read_events(tmp_path, "s")]
    assert events == ["start", "lost"]


def test_a_failing_item_is_tried_twice_then_failed_and_what_needs_it_blocked(tmp_path, monkeypatch):
    import bench.orchestration.plan as plan_mod
    import bench.orchestration.worker as worker_mod
    from bench.orchestration.plan import MAX_ATTEMPTS, Plan, WorkItem, item_states, read_item_record
    from bench.orchestration.runner import RunOptions

    a = WorkItem("tile/d/10x-64px", "fake")
    b = WorkItem("train/d/m/holdout-seed0-fold0", "fake", needs=(a.id,))
    plan = Plan(SimpleNamespace(name="s"), RunOptions(workdir=tmp_path), (a, b))
    ctx = SimpleNamespace(plan=plan, options=plan.options)
    calls = []

    def broken(ctx, item, guard=None):
        calls.append(item.id)
        raise RuntimeError("planted failure")

    monkeypatch.setattr(worker_mod, "execute", broken)
    monkeypatch.setattr(plan_mod, "_done", lambda ctx, item, record: bool(record) and record["status"] == "ok")
    opts = worker_mod.WorkerOptions(worker_id="w", lease_s=30)
    assert MAX_ATTEMPTS == 2
    first = worker_mod._try_item(ctx, a, "w", opts, set())
    assert first["status"] == "failed" and "planted failure" in first["error"]
    assert [s.state for s in item_states(ctx)] == ["ready", "pending"]  # one retry left
    worker_mod._try_item(ctx, a, "w", opts, set())
    states = item_states(ctx)
    assert [s.state for s in states] == ["failed", "blocked"]
    record = read_item_record(plan, a)
    assert record["attempts"] == 2 and "RuntimeError: planted failure" in record["error"] and record["traceback"]
    assert calls == [a.id, a.id]
    assert not list((plan.state_dir / "claims").iterdir())  # every claim released
