"""GMA across processes (torchrun, gloo, CPU): equivalence, uneven shares, dead and hung ranks, bad ranks.

Every job runs under a collective timeout and the launcher's watchdog, and each
test has a pytest timeout on top, so no test can hang.
"""

from __future__ import annotations

import time

import pytest

from bench.common.errors import ConfigError, TrainingError


def test_bench_check_gma_passes_for_1_plus_2_processes_in_float64(capsys):
    """The paper's check: one process vs 1+2 gloo processes vs chunked; K=7 gives shares of 4 and 3."""
    from bench.cli.main import main

    code = main(["check-gma", "--nproc", "3", "--dtype", "float64", "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if ln.startswith(("1+2", "chunked"))]
    assert len(rows) == 3  # 1+2 keeping activations, 1+2 re-encoding chunks, chunked
    for row in rows:
        grad, param, loss = (float(x) for x in row.split()[-4:-1])
        assert max(grad, param, loss) <= 1e-10, row
    assert "PASS" in out


@pytest.mark.slow  # fault injection (a killed / hung rank): run with -m slow
def test_a_killed_encoder_rank_ends_the_job_with_a_clear_error_within_the_timeout():
    from e2e.gma.check import CheckProblem, check_gma

    start = time.monotonic()
    with pytest.raises(TrainingError) as info:
        check_gma((3,), ("float64",), problem=CheckProblem(steps=3), recompute=False, timeout_s=30,
                  fault={"rank": 2, "epoch": 0, "step": 1, "kind": "kill"})
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "rank 2" in message and "SIGKILL" in message, message


@pytest.mark.slow  # fault injection (a killed / hung rank): run with -m slow
def test_a_hung_encoder_rank_makes_the_others_fail_after_the_timeout():
    from e2e.gma.check import CheckProblem, check_gma

    start = time.monotonic()
    with pytest.raises(TrainingError) as info:
        check_gma((3,), ("float64",), problem=CheckProblem(steps=3), recompute=False, timeout_s=4,
                  fault={"rank": 1, "epoch": 0, "step": 1, "kind": "hang"})
    elapsed = time.monotonic() - start
    assert elapsed < 4 + 25, elapsed  # the timeout, plus process start-up and teardown
    message = str(info.value)
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert "rank(s) 1 fell behind" in message, message


def test_a_rank_with_another_feature_size_is_refused_before_training():
    from e2e.gma.check import check_gma

    with pytest.raises(ConfigError, match=r"feature size differs between ranks.*rank 2 produces 13"):
        check_gma((3,), ("float64",), recompute=False, timeout_s=30,
                  fault={"rank": 2, "kind": "feature_dim"})


@pytest.mark.slow
def test_the_parent_stops_a_job_whose_ranks_all_hang_outside_any_collective(tmp_path):
    """No rank waits in a collective, so no collective timeout fires: the parent's watchdog must."""
    from bench.common.files import config_hash
    from e2e.gma.check import CheckProblem
    from e2e.gma.launch import run_job

    problem = CheckProblem()
    job = {"kind": "check", "problem": problem.to_dict(), "problem_hash": config_hash(problem.to_dict()),
           "runs": [{"dtype": "float64", "recompute": False}], "out": str(tmp_path), "timeout_s": 3,
           "fault": {"rank": "all", "epoch": 0, "step": 1, "kind": "hang"}}
    start = time.monotonic()
    with pytest.raises(TrainingError, match="made no progress"):
        run_job(job, tmp_path, 3, timeout_s=3, slack_s=5, echo=False)
    assert time.monotonic() - start < 60
