"""Offline feature extraction: coords HDF5 + slide -> features HDF5, one per slide and encoder.

For each slide a DataLoader reads batches of patches in worker processes (each
opens its own OpenSlide handle on first use; handles are never shared across a
fork), the frozen encoder embeds them under `torch.inference_mode`, and the
result is written atomically to `features/<dataset>/<encoder>/<mag>x-<px>px/<slide>.h5`:

- `features` (N, D) float32 (float16 on request), `coords` (N, 2) int64 with
  the coords file's attrs (so CLAM/TRIDENT tools read it);
- file attrs: created_by = "cpath-bench" (the marker: only files that carry it are
  ever replaced), encoder, weights_id, magnification, patch_size, input_size,
  seconds, peak memory, device, harness version, config_hash, ...

Where the transform runs: on CPU the workers turn uint8 patches into normalised
float tensors, so the main process only runs the model; on CUDA the workers
ship uint8 (4x fewer bytes through pinned memory) and the GPU normalises.

Resumable like TRIDENT's batch jobs: a finished slide is skipped after checking
its file (shape, dimension, attrs, config hash, no NaN/inf row); a stale or invalid
file of ours is redone (saying which and why), one that cannot even be opened is
first moved aside to `<slide>.h5.damaged`; a per-slide lock file lets several
processes share a folder; a slide that cannot be extracted is listed in
`skipped.csv` and the others go on. Feature files another tool made (CLAM,
TRIDENT: no marker) are never overwritten or deleted: the extraction stops with
`ForeignFeaturesError`, pointing at `bench train --features DIR`.

Checking every row of every file on each rerun would read the whole cohort's
features; so a file records the mtime it got once all its rows were checked
(`checked_mtime_ns`), and while it still has that mtime only the last row is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import __version__
from bench.common.console import info, progress
from bench.evaluation.costs import PeakMemory, StageTimer, device_name
from bench.common.errors import BenchError, ConfigError, DataError, MissingFileError, SlideError
from bench.common.files import LockHeld, atomic_path, config_hash, file_lock, is_partial
from bench.data.slides import LevelChoice, open_slide
from bench.data.tiling import Coords, SlideJob, read_coords, read_skip_report, write_skip_report
from bench.evaluation.training import autocast, resolve_device

from baselines.encoders import EncoderSpec, LoadedEncoder, PatchTransform
from baselines.features import (CHECKED_MTIME_ATTR, HARNESS_ATTRS, MARKER, MARKER_ATTR, check_feature_file,
                                harness_made, refuse_foreign)

FEATURES_VERSION = 1


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of an extraction run.

    Attributes:
        batch_size: patches per forward pass; None picks one for the device (`batch_size_for`).
        num_workers: DataLoader worker processes reading patches (0: read in this process);
            None picks them from the cores, the encoder's threads and the device (`settings`).
        device: "auto", "cpu", "cuda" or "cuda:N".
        float16: store features as float16 (half the disk; computed in float32 on CPU).
        precision: CUDA autocast precision; None = the encoder's preferred one. CPU runs fp32.
        force: re-extract slides whose features are up to date.
        torch_threads: intra-op threads of this process (None: torch's default). On few cores,
            leaving room for the reading workers can be faster; see benchmarks/bench_extract.py.
    """

    batch_size: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    float16: bool = False
    precision: str | None = None
    force: bool = False
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ConfigError(f"workers must be a non-negative integer, got {self.num_workers!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch threads must be positive, got {self.torch_threads}")


    def batch_size_for(self, device: torch.device, input_size: int) -> int:
        """The batch size to run: the one asked for, else 256 on CUDA (with AMP) and, on CPU, about
        eight 224-px images' worth (8 at 224 px, 24 at 128, 64 at 64 px and below).

        On CPU large batches run slower, not faster, once activations outgrow the caches:
        resnet50-trunc at 224 px does 18.4 patches/s at batch 8 and 13.0 at batch 64
        (BENCHMARKS.md, extract).
        """
        if self.batch_size is not None:
            return self.batch_size
        if device.type == "cuda":
            return 256
        return int(min(64, max(8, 8 * 224**2 // max(1, input_size) ** 2)))


    def settings(self, device: torch.device, input_size: int, cores: int | None = None,
                 threads: int | None = None) -> ExtractSettings:
        """The batch size, reading workers and encoder threads this run uses, and why.

        Reading workers: on CUDA the encoder needs one core and the others read (at most 8);
        on CPU the encoder's threads use the cores, so workers only read on cores the
        threads leave free: none when the cores do not exceed the encoder's threads (on 2
        cores a worker decoding JPEG tiles takes its time from the forward pass: resnet18-trunc
        ran at 0.80 of the bare forward with 2 workers and 0.93 reading in process;
        BENCHMARKS.md, extraction). What was asked for is kept.
        """
        cores = cores or available_cores()
        threads = threads or self.torch_threads or torch.get_num_threads()
        batch = self.batch_size_for(device, input_size)
        if self.num_workers is not None:
            workers, why = self.num_workers, "as asked"
        elif device.type == "cuda":
            workers = min(8, max(0, cores - 1))
            why = f"{cores} cores, one runs the GPU"
        elif cores <= threads:
            workers, why = 0, f"{cores} cores <= {threads} encoder threads: read in the main process"
        else:
            workers = min(4, cores - threads)
            why = f"{cores} cores, {threads} encoder threads: {workers} free cores read"
        return ExtractSettings(batch, workers, threads, str(device), why)


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ExtractSettings:
    """What an extraction runs with (`ExtractOptions.settings`): shown on the console, kept in the report."""

    batch_size: int
    num_workers: int
    torch_threads: int
    device: str
    why_workers: str

    def describe(self) -> str:
        return (f"batch {self.batch_size}, {self.num_workers} reading worker(s) ({self.why_workers}), "
                f"{self.torch_threads} encoder thread(s), {self.device}")


@dataclass(frozen=True)
class SlideResult:
    slide_id: str
    path: Path
    n_patches: int
    seconds: float  # extraction seconds (as recorded in the file for a reused one)
    peak_memory_mb: float
    reused: bool  # True when an up-to-date file already existed


@dataclass
class ExtractReport:
    done: list[SlideResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (slide_id, reason)
    busy: list[str] = field(default_factory=list)  # locked by another live process
    settings: ExtractSettings | None = None  # batch, workers, threads the run chose

    @property
    def n_new(self) -> int:
        return sum(not r.reused for r in self.done)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.done)


# ------------------------------------------------------------------------------ reading patches


class SlidePatches(torch.utils.data.Dataset):
    """Batches of one slide's patches; item i = patches [i*B, (i+1)*B).

    The slide is opened lazily, so each DataLoader worker opens its own handle.
    A read error comes back as `{"error": message}` instead of an exception, so
    the main process reports it cleanly (not as a worker traceback).
    """

    def __init__(self, slide_path: Path, coords: np.ndarray, choice: LevelChoice, batch_size: int,
                 transform: PatchTransform | None, mpp: float | None) -> None:
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64)  # (N, 2) level-0 top-left
        self.choice = choice
        self.batch_size = int(batch_size)
        self.transform = transform
        self.mpp = mpp
        self._slide = None

    def __len__(self) -> int:
        return math.ceil(len(self.coords) / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = index * self.batch_size
        xy = self.coords[start:start + self.batch_size]
        side = self.choice.patch_size
        patches = np.empty((len(xy), side, side, 3), dtype=np.uint8)  # (B, P, P, 3)
        try:
            if self._slide is None:
                self._slide = open_slide(self.slide_path, mpp=self.mpp)
            for i, (x, y) in enumerate(xy):
                self._slide.read_patch(int(x), int(y), self.choice, out=patches[i])  # straight into the batch
        except BenchError as exc:
            return {"start": start, "error": str(exc)}
        tensor = torch.from_numpy(patches)
        if self.transform is not None:
            tensor = self.transform(tensor)  # (B, 3, S, S) float32
        return {"start": start, "patches": tensor}

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None  # a handle is never pickled into a worker
        return state


# ------------------------------------------------------------------------------ one slide


def features_config(spec: EncoderSpec, weights_id: str, init_seed: int | None, coords: Coords,
                    float16: bool) -> dict[str, Any]:
    """What a feature file depends on; its hash decides whether a file can be reused."""
    return {
        "features_version": FEATURES_VERSION,
        "encoder": spec.name,
        "spec": spec.fingerprint(),
        "weights_id": weights_id,
        "init_seed": init_seed,
        "dtype": "float16" if float16 else "float32",
        "coords": {
            "n": len(coords),
            "sha256": _array_digest(coords.coords),
            "patch_size": coords.patch_size,
            "patch_size_level0": coords.patch_size_level0,
            "magnification": coords.target_magnification,
            "level": coords.level,
            "read_size": coords.read_size,
        },
    }


def _encoder_config(encoder: LoadedEncoder, coords: Coords, float16: bool) -> dict[str, Any]:
    return features_config(encoder.spec, encoder.weights_id, getattr(encoder.model, "init_seed", None), coords, float16)


def pending_slides(
    jobs: Iterable[SlideJob], coords_dir: str | Path, out_dir: str | Path, spec: EncoderSpec, weights_id: str,
    init_seed: int | None = None, *, float16: bool = False,
) -> list[SlideJob]:
    """Slides whose feature file is missing, stale, invalid or damaged (or whose coords cannot be read).

    Needs no model, so a rerun over a finished cohort never loads the weights.

    Raises:
        ForeignFeaturesError: a feature file another tool made is where a slide's would go.
    """
    coords_dir, out_dir = Path(coords_dir), Path(out_dir)
    jobs = list(jobs)
    refuse_foreign(out_dir / f"{job.slide_id}.h5" for job in jobs)
    pending = []
    for job in jobs:
        try:
            coords = read_coords(coords_dir / f"{job.slide_id}.h5")
        except BenchError:
            pending.append(job)  # the real run reports why
            continue
        fingerprint = config_hash(features_config(spec, weights_id, init_seed, coords, float16))
        if reuse_problem(out_dir / f"{job.slide_id}.h5", n_patches=len(coords), embed_dim=spec.embed_dim,
                         config_hash=fingerprint) is not None:
            pending.append(job)
    return pending


def reuse_problem(path: Path, *, n_patches: int, embed_dim: int, config_hash: str) -> str | None:
    """Why our feature file at `path` must be (re)made ("missing", "unreadable", or what is wrong
    with it), or None when it is up to date. The file is assumed to be ours (see `refuse_foreign`)."""
    if not path.is_file():
        return "missing"
    if harness_made(path) is None:
        return "unreadable"
    return check_feature_file(path, n_patches=n_patches, embed_dim=embed_dim, config_hash=config_hash,
                              attrs=HARNESS_ATTRS, scan="auto")


def _array_digest(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.int64).tobytes()).hexdigest()[:16]


def check_coords(coords: Coords, path: Path, magnification: float | None, patch_size: int | None) -> None:
    """Refuse coords that cannot give this run's features (no patches, other magnification or size)."""
    if len(coords) == 0:
        raise DataError(f"coords file {path} has no tissue patches; nothing to extract for this slide")
    if patch_size is not None and coords.patch_size != patch_size:
        raise DataError(f"coords file {path} has {coords.patch_size}px patches, expected {patch_size}px; "
                        "re-tile with `bench tile` at this patch size")
    if magnification is not None and coords.target_magnification > 0 and not math.isclose(
            coords.target_magnification, magnification, rel_tol=1e-3):
        raise DataError(f"coords file {path} was tiled at {coords.target_magnification:g}x, expected "
                        f"{magnification:g}x; re-tile with `bench tile --magnification {magnification:g}`")


def extract_slide(
    job: SlideJob, coords_path: str | Path, out_path: str | Path, encoder: LoadedEncoder,
    options: ExtractOptions = ExtractOptions(), *, magnification: float | None = None,
    patch_size: int | None = None, device: torch.device | None = None,
) -> SlideResult:
    """Extract (or reuse) the features of one slide.

    Raises:
        MissingFileError / DataError: coords missing, empty, or for another magnification or size.
        SlideError: the slide cannot be opened or read.
        LockHeld: another live process is extracting this slide.
        ForeignFeaturesError: another tool's feature file is at `out_path`; it is left as it is.
        WriteError / OSError: the feature file cannot be written (e.g. disk full); no file is left behind.
    """
    coords_path, out_path = Path(coords_path), Path(out_path)
    coords = read_coords(coords_path)
    check_coords(coords, coords_path, magnification, patch_size)
    fingerprint = config_hash(_encoder_config(encoder, coords, options.float16))
    expect = {"n_patches": len(coords), "embed_dim": encoder.spec.embed_dim, "config_hash": fingerprint}
    refuse_foreign([out_path])  # never overwrite another tool's file
    if not options.force and reuse_problem(out_path, **expect) is None:
        return _reused(job.slide_id, out_path, len(coords))
    with file_lock(out_path):
        refuse_foreign([out_path])
        problem = reuse_problem(out_path, **expect)
        if not options.force and problem is None:
            return _reused(job.slide_id, out_path, len(coords))  # another process finished it meanwhile
        _remove_stale_partials(out_path)  # we hold the lock: no one else is writing this slide
        if problem == "unreadable":  # cannot tell whose it is: keep its bytes, out of the way
            aside = _set_aside(out_path)
            info(f"re-extracting slide {job.slide_id}: its feature file {out_path} cannot be opened; "
                 f"moved it to {aside.name}")
        elif problem not in (None, "missing"):
            info(f"re-extracting slide {job.slide_id}: its feature file {out_path} cannot be reused ({problem})")
        device = device or resolve_device(options.device)
        feats, seconds, peak_mb, peak_kind, precision = _encode(job, coords, encoder, options, device)
        attrs = {
            "slide_id": job.slide_id, "encoder": encoder.spec.name, "encoder_source": encoder.spec.source,
            "weights_id": encoder.weights_id, "init_seed": getattr(encoder.model, "init_seed", None),
            "embed_dim": encoder.spec.embed_dim, "magnification": coords.target_magnification,
            "patch_size": coords.patch_size, "input_size": encoder.spec.input_size, "n_patches": len(coords),
            "seconds": seconds, "patches_per_second": len(coords) / max(seconds, 1e-9),
            "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind, "device": device_name(device),
            "precision": precision, "batch_size": options.batch_size_for(device, encoder.spec.input_size),
            "num_workers": options.settings(device, encoder.spec.input_size).num_workers,
            "dtype": "float16" if options.float16 else "float32", "harness_version": __version__,
            "config_hash": fingerprint, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_features(out_path, feats, coords, attrs)
    return SlideResult(job.slide_id, out_path, len(coords), seconds, peak_mb, reused=False)


def _reused(slide_id: str, path: Path, n: int) -> SlideResult:
    import h5py

    with h5py.File(path, "r") as f:
        seconds = float(f.attrs.get("seconds", 0.0))
        peak = float(f.attrs.get("peak_memory_mb", 0.0))
    return SlideResult(slide_id, path, n, seconds, peak, reused=True)


def _set_aside(path: Path) -> Path:
    """Rename a file to `<name>.damaged` (or `.damaged-2`, ...): never listed as features, never deleted."""
    for i in range(1, 1000):
        aside = path.with_name(f"{path.name}.damaged" + (f"-{i}" if i > 1 else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise OSError(f"cannot set {path} aside: {path}.damaged-1..999 all exist")


def _remove_stale_partials(out_path: Path) -> None:
    prefix = f".{out_path.name}"
    for p in out_path.parent.glob(f"{prefix}*"):
        if is_partial(p):
            p.unlink(missing_ok=True)


def workers_for(n_batches: int, num_workers: int) -> int:
    """Reading workers worth starting for a slide of `n_batches` batches.

    A worker pays off by reading ahead while the model runs the current batch, and
    starting one costs about as much as reading a batch of ~64 small patches (~50 ms on
    2 cores). So the first batch is not counted (nothing runs while it is read) and
    each worker needs at least two batches to read ahead: a one- or two-batch slide
    (the demo's) reads in this process, which made its extraction 1.7x faster.
    """
    return max(0, min(num_workers, (n_batches - 1) // 2))


def _encode(job: SlideJob, coords: Coords, encoder: LoadedEncoder, options: ExtractOptions,
            device: torch.device) -> tuple[np.ndarray, float, float, str, str]:
    """Run the encoder over every patch of a slide: (features (N, D), seconds, peak MiB, peak kind, precision)."""
    cuda = device.type == "cuda"
    precision = (options.precision or encoder.precision) if cuda else "fp32"
    settings = options.settings(device, encoder.spec.input_size)
    batch_size = settings.batch_size
    dataset = SlidePatches(job.path, coords.coords, coords.level_choice, batch_size,
                           None if cuda else encoder.transform, job.mpp or coords.mpp or None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers_for(len(dataset), settings.num_workers),
        pin_memory=cuda,
    )
    model = encoder.model
    n, dim = len(coords), encoder.spec.embed_dim
    out = torch.empty((n, dim), dtype=torch.float32, device=device)  # (N, D), copied to the host once
    timer = StageTimer(device)
    bar = progress(total=n, desc=job.slide_id, unit="patch")
    try:
        with PeakMemory(device) as peak, timer.stage("extract"), torch.inference_mode():
            for item in loader:
                if "error" in item:
                    raise SlideError(f"slide {job.slide_id}: {item['error']}", slide=job.slide_id)
                x, start = item["patches"], int(item["start"])
                if cuda:
                    x = x.to(device, non_blocking=True)
                    x = encoder.transform(x)  # uint8 (B, P, P, 3) -> float (B, 3, S, S) on the GPU
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    emb = model(x)  # (B, D)
                out[start:start + len(emb)] = emb.float()
                bar.update(len(emb))
            feats = out.cpu().numpy()
    finally:
        bar.close()
        dataset.close()
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise DataError(f"slide {job.slide_id}: {bad} patches gave NaN/inf embeddings with {precision} on "
                        f"{device.type}; rerun with --precision fp32")
    if options.float16:
        feats = feats.astype(np.float16)
    return feats, timer.total(), float(peak.mb), peak.kind, precision


# ------------------------------------------------------------------------------ files


def write_features(path: Path, features: np.ndarray, coords: Coords, attrs: dict[str, Any]) -> Path:
    """Write a feature file atomically and check it (every row) before it gets its final name.

    The file gets the marker attr and, as its mtime, the `checked_mtime_ns` it records (whole
    seconds: a later change to the file gives it another mtime), so reuse checks can trust it.
    """
    checked = time.time_ns() // 10**9 * 10**9
    attrs = {**attrs, MARKER_ATTR: MARKER, CHECKED_MTIME_ATTR: checked}
    with atomic_path(path) as tmp:
        _write_h5(tmp, features, coords, attrs)
        problem = check_feature_file(tmp, n_patches=len(coords), embed_dim=features.shape[1],
                                     config_hash=attrs["config_hash"], scan="all")
        if problem is not None:  # pragma: no cover - would be a bug in _write_h5
            raise DataError(f"feature file for {attrs['slide_id']} failed its check after writing: {problem}")
        os.utime(tmp, ns=(checked, checked))  # os.replace keeps it
    return path


def _write_h5(path: Path, features: np.ndarray, coords: Coords, attrs: dict[str, Any]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        cds = f.create_dataset("coords", data=coords.coords.astype(np.int64))
        coords_attrs = {
            "patch_size": coords.patch_size, "patch_size_level0": coords.patch_size_level0,
            "target_magnification": coords.target_magnification,
            "level0_magnification": coords.level0_magnification, "mpp": coords.mpp, "level": coords.level,
            "downsample": coords.downsample, "target_downsample": coords.target_downsample,
            "read_size": coords.read_size,
        }
        for key, value in coords_attrs.items():
            cds.attrs[key] = value  # TRIDENT/CLAM tools read coords-dataset attrs
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


# ------------------------------------------------------------------------------ many slides


def extract_cohort(
    jobs: Sequence[SlideJob] | Iterable[SlideJob], coords_dir: str | Path, out_dir: str | Path,
    encoder: LoadedEncoder, options: ExtractOptions = ExtractOptions(), *, magnification: float | None = None,
    patch_size: int | None = None,
) -> ExtractReport:
    """Extract the features of many slides; bad slides are skipped and listed in `skipped.csv`.

    Coords are read from `<coords_dir>/<slide_id>.h5`, features written to
    `<out_dir>/<slide_id>.h5`. Slides locked by another live process are left to it
    (`report.busy`).

    Raises:
        ForeignFeaturesError: feature files another tool made are where this run would write;
            nothing is extracted, written or deleted.
    """
    coords_dir, out_dir = Path(coords_dir), Path(out_dir)
    jobs = list(jobs)
    refuse_foreign(out_dir / f"{job.slide_id}.h5" for job in jobs)  # before any work: one error, nothing touched
    device = resolve_device(options.device)
    encoder.model.to(device)
    if device.type == "cuda":
        encoder.model.to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    if options.torch_threads is not None:
        torch.set_num_threads(options.torch_threads)
    settings = options.settings(device, encoder.spec.input_size)
    # every slide of the run with the same, resolved settings
    options = dataclasses.replace(options, batch_size=settings.batch_size, num_workers=settings.num_workers)
    info(f"extract {encoder.spec.name}: {settings.describe()}")
    report = ExtractReport(settings=settings)
    not_tiled = dict(read_skip_report(coords_dir / "skipped.csv"))  # why `bench tile` left a slide out
    bar = progress(jobs, desc=f"extract {encoder.spec.name}", unit="slide")
    try:
        for job in bar:
            try:
                result = extract_slide(job, coords_dir / f"{job.slide_id}.h5", out_dir / f"{job.slide_id}.h5",
                                       encoder, options, magnification=magnification, patch_size=patch_size,
                                       device=device)
            except LockHeld:
                report.busy.append(job.slide_id)
                continue
            except MissingFileError as exc:
                why = not_tiled.get(job.slide_id)
                if why is not None and not (coords_dir / f"{job.slide_id}.h5").exists():
                    report.skipped.append((job.slide_id, f"not tiled (`bench tile` skipped it): {why}"))
                else:
                    report.skipped.append((job.slide_id, str(exc)))
                continue
            except (SlideError, DataError, ConfigError) as exc:
                report.skipped.append((job.slide_id, str(exc)))
                continue
            except OSError as exc:  # other OS errors writing; a WriteError (full disk, read-only) ends the stage
                report.skipped.append((job.slide_id, f"cannot write features to {out_dir}: {exc}"))
                continue
            report.done.append(result)
            if not result.reused:
                bar.set_postfix(patches_per_s=f"{result.n_patches / max(result.seconds, 1e-9):.0f}")
    finally:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_skip_report(out_dir / "skipped.csv", report.skipped)
    return report


def summarize(report: ExtractReport, out_dir: Path) -> None:
    new = [r for r in report.done if not r.reused]
    secs = sum(r.seconds for r in new)
    rate = f", {sum(r.n_patches for r in new) / secs:.0f} patches/s" if secs > 0 else ""
    info(
        f"features of {len(report.done)} slides in {out_dir} ({len(new)} new{rate}, "
        f"{len(report.done) - len(new)} up to date)"
        + (f"; {len(report.busy)} being extracted by another process" if report.busy else "")
        + (f"; skipped {len(report.skipped)} (see {out_dir / 'skipped.csv'})" if report.skipped else "")
    )
    for slide_id, reason in report.skipped:
        info(f"  skipped {slide_id}: {reason}")


__all__ = [
    "ExtractOptions", "ExtractSettings", "available_cores", "SlideResult", "ExtractReport", "SlidePatches", "features_config", "pending_slides",
    "reuse_problem",
    "check_coords", "extract_slide", "extract_cohort", "write_features", "read_skip_report", "summarize", "FEATURES_VERSION",
]
