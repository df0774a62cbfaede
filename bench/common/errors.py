"""Error types for problems a user can fix.

Every message names the bad value and says what to do. The CLI prints these as
one line (`error: ...`) instead of a traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """Base class: a problem with the user's input, config or data."""


class ConfigError(BenchError, ValueError):
    """A suite file, flag or parameter has a bad value."""


class DataError(BenchError, ValueError):
    """A cohort, labels file, coords or features file has bad content."""


class MissingFileError(BenchError, FileNotFoundError):
    """A file or folder the stage needs does not exist."""


class WriteError(BenchError):
    """An output cannot be written (read-only folder, full disk, I/O error): names the path and the OS error."""

    def __init__(self, path: object, error: BaseException) -> None:
        detail = f"[Errno {error.errno}] {error.strerror}" if getattr(error, "strerror", None) else str(error)
        super().__init__(f"cannot write {path}: {detail}. Outputs finished before it are kept; free space or "
                         "choose a writable --workdir, then rerun the same command to resume")
        self.path = path
        self.errno = getattr(error, "errno", None)


class SlideError(BenchError):
    """A slide cannot be opened or read (corrupt, truncated, not a slide, no mpp)."""

    def __init__(self, message: str, slide: str | None = None) -> None:
        super().__init__(message)
        self.slide = slide


class TrainingError(BenchError):
    """Training stopped for a reason recorded in the run (NaN loss, empty bag...)."""

    def __init__(self, message: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
