"""Where every stage reads and writes inside a work folder.

One place for the paths of DESIGN.md's "path of one slide", so stages and the
runner never assemble paths by hand:

    data/<dataset>/                      synthetic cohorts (slides + labels.csv)
    tiles/<dataset>/<mag>x-<px>px/       <slide>.h5 coords, qc/<slide>.png, skipped.csv
    splits/<dataset>/<protocol>-seed<k>.csv (+ .sha256)
    features/<dataset>/<encoder>/<mag>x-<px>px/<slide>.h5
    patches/<dataset>/<mag>x-<px>px/<slide>.h5   packed JPEG patch store (E2E)
    runs/<suite>/<dataset>/<method>/<split>/     run.json, predictions.csv, weights
    sweeps/<suite>/<method>/                     Optuna study + best params
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bench.common.errors import ConfigError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def mag_tag(magnification: float, patch_size: int) -> str:
    """Folder name of one tiling: `mag_tag(20, 256) == '20x-256px'`, `mag_tag(2.5, 256) == '2.5x-256px'`."""
    if magnification <= 0:
        raise ConfigError(f"magnification must be positive, got {magnification}")
    if patch_size <= 0:
        raise ConfigError(f"patch size must be positive, got {patch_size}")
    return f"{magnification:g}x-{int(patch_size)}px"


def check_name(kind: str, value: str) -> str:
    """Refuse names that would escape their folder or break paths."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise ConfigError(
            f"{kind} {value!r} is not a safe name: use letters, digits, '.', '_', '+', '-' "
            "(no '/', no '..', not starting with '.')"
        )
    return value


@dataclass(frozen=True)
class Layout:
    """The folders of one work folder (`bench run --workdir`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def data_dir(self, dataset: str) -> Path:
        return self.root / "data" / check_name("dataset", dataset)

    def tiles_dir(self, dataset: str, magnification: float, patch_size: int) -> Path:
        return self.root / "tiles" / check_name("dataset", dataset) / mag_tag(magnification, patch_size)

    def split_file(self, dataset: str, protocol: str, seed: int) -> Path:
        return self.root / "splits" / check_name("dataset", dataset) / f"{check_name('protocol', protocol)}-seed{int(seed)}.csv"

    def features_dir(self, dataset: str, encoder: str, magnification: float, patch_size: int) -> Path:
        return (
            self.root / "features" / check_name("dataset", dataset) / check_name("encoder", encoder)
            / mag_tag(magnification, patch_size)
        )

    def patches_dir(self, dataset: str, magnification: float, patch_size: int) -> Path:
        return self.root / "patches" / check_name("dataset", dataset) / mag_tag(magnification, patch_size)

    def run_dir(self, suite: str, dataset: str, method: str, split: str) -> Path:
        parts = [check_name("method part", p) for p in method.split("/")]
        return self.root / "runs" / check_name("suite", suite) / check_name("dataset", dataset) / Path(*parts) / check_name("split", split)

    def runs_root(self, suite: str | None = None) -> Path:
        return self.root / "runs" if suite is None else self.root / "runs" / check_name("suite", suite)

    def sweep_dir(self, suite: str, method: str) -> Path:
        parts = [check_name("method part", p) for p in method.split("/")]
        return self.root / "sweeps" / check_name("suite", suite) / Path(*parts)
