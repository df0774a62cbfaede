"""Write failures (read-only folder, full disk, I/O error) end a stage with one line naming the path and
the OS error: what finished stays, no lock or partial file is left, skip reasons are not lost."""

from __future__ import annotations

import errno
import os

import h5py
import pytest

import bench.common.files as files
from bench.cli.main import main
from bench.common.errors import WriteError
from bench.common.files import atomic_path, file_lock, write_text_atomic

CASES = [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device"),
         (errno.EIO, "Input/output error")]


@pytest.mark.parametrize("code, text", CASES)
def test_a_failed_rename_names_the_path_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch, code, text):
    target = tmp_path / "out.txt"
    target.write_text("good")

    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(WriteError) as err:
        write_text_atomic(target, "new")
    assert str(target) in str(err.value) and f"[Errno {code}] {text}" in str(err.value)
    assert target.read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_cleanup_that_fails_too_does_not_hide_the_write_error(tmp_path, monkeypatch):
    # on a read-only disk the partial file cannot be removed either: that must not become the error
    real_unlink = type(tmp_path).unlink

    def unlink(self, missing_ok=False):
        if ".partial-" in self.name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    with pytest.raises(WriteError, match=r"cannot write .*skipped\.csv: \[Errno 30\] Read-only file system"):
        with atomic_path(tmp_path / "skipped.csv") as tmp:
            tmp.write_text("x")
            raise OSError(errno.EROFS, "Read-only file system")


def test_an_h5py_error_without_errno_is_recognised_from_its_message(tmp_path):
    exc = OSError("Unable to synchronously create file (unable to open file: name = 'x', errno = 28, "
                  "error message = 'No space left on device')")
    assert files.write_errno(exc) == errno.ENOSPC
    assert files.write_errno(OSError("Unable to open file (file signature not found)")) is None
    assert files.write_errno(FileNotFoundError(errno.ENOENT, "No such file")) is None


def test_a_lock_that_cannot_be_written_is_a_write_error_and_leaves_no_lock(tmp_path, monkeypatch):
    real_open = os.open

    def full(path, flags, mode=0o777):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode)

    monkeypatch.setattr(files.os, "open", full)
    with pytest.raises(WriteError, match=r"s1\.h5\.lock: \[Errno 28\]"):
        with file_lock(tmp_path / "s1.h5"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_bench_tile_on_a_disk_that_fills_up_ends_with_one_line_and_keeps_what_finished(
        synthetic_cohort, tmp_path, monkeypatch, capsys):
    cohort = synthetic_cohort("subtyping", n_slides=6)
    real_replace = os.replace
    renames = []

    def fill_after_first_slide(src, dst):
        if str(dst).endswith(".h5") and len(renames) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)
        if str(dst).endswith(".h5"):
            renames.append(dst)

    monkeypatch.setattr(files.os, "replace", fill_after_first_slide)
    code = main(["tile", "--cohort", str(cohort), "--out", str(tmp_path / "work"), "--magnification", "5",
                 "--patch-size", "128", "--no-qc"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "[Errno 28] No space left on device" in lines[0] and ".h5" in lines[0]
    assert "Traceback" not in err
    out = next((tmp_path / "work" / "tiles").rglob("*.h5"))
    with h5py.File(out, "r") as f:  # the finished slide is whole
        assert f["coords"].shape[1] == 2
    leftovers = [p.name for p in (tmp_path / "work").rglob("*") if p.name.endswith(".lock") or ".partial-" in p.name]
    assert leftovers == []


def test_skip_reasons_are_printed_when_their_report_cannot_be_written(tmp_path, monkeypatch, capsys):
    from bench.data.tiling import write_skip_report

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(WriteError, match="skipped.csv"):
        write_skip_report(tmp_path / "skipped.csv", [("s3", "smaller than one patch"), ("s7", "no tissue")])
    err = capsys.readouterr().err
    assert "skipped s3: smaller than one patch" in err and "skipped s7: no tissue" in err
