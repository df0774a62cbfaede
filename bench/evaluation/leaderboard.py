"""Leaderboards: run records -> `leaderboards/<suite>.md` (+ PNG plots), never typed by hand.

    build_leaderboard(Path("workdir"), "subtyping", Path("leaderboards"), reported="abmilx")

writes `leaderboards/subtyping.md` and `leaderboards/subtyping/*.png` from the
records under `workdir/runs/subtyping/` (`bench.evaluation.records`). Per dataset:

- **Measured table**: one row per method (paradigm, encoder, aggregator), every
  metric as `mean [low, high]` of the record's test-set bootstrap (3 decimals),
  then the costs (train time, inference s/slide, peak memory and its kind,
  parameters). Rows are sorted by the primary metric (its direction from the
  record); the best value of each metric column is bold.
- **Paired test against the best**: the best row's predictions and each other
  row's are compared with `bench.evaluation.metrics.paired_bootstrap` on the primary
  metric, with the best record's resample count, bootstrap seed and confidence
  (so the resamples are the ones behind the best row's interval). A row whose
  difference from the best is not significant is marked `≈`; the `vs best`
  column gives the two-sided bootstrap p-value either way.
- **Several splits** (seeds or folds) of one method: one row per method. Each
  metric cell is the average over the method's splits of the per-split
  bootstrap mean, low and high (for one split, exactly the record's numbers);
  `splits` counts them and `sd` is the standard deviation of the per-split
  primary means. Costs are averaged too. The paired test runs on every split
  both methods have; the row counts as significantly different only when it
  is on every one of them, and the p-value shown is the largest.
- **Failed runs** are listed under the table with their error, never in it.
- **One split file per split**: the rows of a table compare predictions of the
  same test bags, so every ranked record of a split tag (e.g.
  `holdout-seed0-fold0`) must come from the same split file (`split.sha256`).
  Per dataset and split tag, the sha256 of the most ok records wins (a tie goes
  to the file of the most recently ended record); records made on another file
  are listed under the table as **not ranked**, with both files and the command
  that reruns them, never in it.
- **Unreadable records**: run folders under `runs/<suite>/` whose run.json is
  damaged, of another schema, or missing (predictions, weights or a checkpoint
  but no run.json: an interrupted run) are listed under their dataset's table
  with the reason, so the board says what it leaves out.
- **Paths** in the board are relative to the work folder (the board is committed;
  machine paths are not): split files as `splits/<dataset>/<file>.csv`, run
  folders as `runs/<suite>/...`; the work and output folders as given when
  relative, relative to the current folder when inside it, else `<workdir>` /
  `<out>`. Commands are shown as recorded.
- **Plots**: primary metric (interval as error bars) against inference seconds
  per slide (log x) with the Pareto front; ROC curves (classification; binary,
  or the macro average of one-vs-rest curves) or Kaplan-Meier curves of the
  high/low predicted-risk halves split at the median risk (survival), from
  each method's first split.
- **Sweeps**: for each method with a `bench sweep` study (`bench.evaluation.sweeps.read_best`):
  trials, failed, best validation value, best parameters, importances.
- **Reported rows** (`reported="abmilx"`): the numbers the paper prints
  (`bench/evaluation/reported.csv`), in their own table, never mixed with measured rows.
  A dataset finds its rows by its `data` name (e.g. `tcga-brca-surv` -> `TCGA-BRCA`,
  case-insensitive) and its task kind.

`bench/evaluation/reported.csv` columns: source (e.g. `abmilx`), table (number in the
paper), task, dataset (the suites' `data` names), paradigm, encoder, aggregator
(the paper's names), metric (this harness's metric name), value (as printed, in
`unit`), plus_minus (the number the paper prints after ±; it does not say whether
that is a standard deviation or an interval half-width; empty where the ± column is
something else, see note), unit, note. Empty value = not a number (the note says why,
e.g. out of memory).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.common.files import atomic_path, write_text_atomic
from bench.data.layout import Layout
from bench.evaluation.records import PREDICTIONS, RUN_FILE, SKIPPED_FILE, format_interval, load_run
from bench.evaluation.training import CHECKPOINT_DIR

if TYPE_CHECKING:
    import pandas as pd

    from bench.evaluation.records import RunRecord

SYNTHETIC_NOTE = "SYNTHETIC demo data — numbers show the harness working, not the merits of the paradigms"
NOT_SIGNIFICANT = "≈"
REPORTED_CSV = "reported.csv"
REPORTED_COLUMNS = ("source", "table", "task", "dataset", "paradigm", "encoder", "aggregator", "metric", "value",
                    "plus_minus", "unit", "note")
REPORTED_SOURCES = {
    "abmilx": ("the ABMILX paper", "Tang et al., *Revisiting End-to-End Learning with Slide-level Supervision in "
                                   "Computational Pathology*"),
}
METRIC_LABELS = {"auc": "AUC", "balanced_accuracy": "balanced acc", "f1_macro": "macro F1", "accuracy": "accuracy",
                 "qwk": "QWK", "c_index": "C-index"}
MEMORY_KINDS = {"cuda_max_allocated": "CUDA", "peak_rss_since_reset": "RSS", "process_peak_rss": "process RSS"}


# ----------------------------------------------------------------------------- one row: a method's records


@dataclass(frozen=True)
class MethodRow:
    """One method on one dataset: its ok records, one per split, sorted by split tag."""

    method: str
    records: tuple[RunRecord, ...]

    @property
    def first(self) -> RunRecord:
        return self.records[0]

    def field(self, key: str) -> str:
        return str(self.first.data.get(key) or self.first.data.get("method", {}).get(key) or "")

    def metric(self, name: str) -> tuple[float, float, float] | None:
        """(mean, low, high) averaged over splits (the module docstring's rule)."""
        cis = [r.metrics[name] for r in self.records if name in r.metrics]
        if not cis:
            return None
        mean, low, high = (statistics.fmean(float(ci[k]) for ci in cis) for k in ("mean", "low", "high"))
        return mean, low, high

    def spread(self, name: str) -> float | None:
        means = [float(r.metrics[name]["mean"]) for r in self.records if name in r.metrics]
        return statistics.stdev(means) if len(means) > 1 else None

    def cost(self, key: str) -> float | None:
        values = [float(r.costs[key]) for r in self.records if isinstance(r.costs.get(key), (int, float))]
        return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Comparison:
    """Paired bootstrap of the best row against another row, over their common splits."""

    p_value: float | None
    significant: bool | None
    splits: int
    reason: str = ""


def _group(records: Sequence[RunRecord], primary: str) -> tuple[list[MethodRow], list[tuple[RunRecord, str]]]:
    by_method: dict[str, list[RunRecord]] = {}
    failed: list[tuple[RunRecord, str]] = []
    for r in records:
        if not r.ok:
            failed.append((r, str(r.data.get("error") or "no error recorded")))
        elif primary not in r.metrics:
            failed.append((r, f"the record has no {primary} interval"))
        else:
            by_method.setdefault(r.method, []).append(r)
    rows = [MethodRow(m, tuple(sorted(rs, key=lambda r: r.split))) for m, rs in by_method.items()]
    return rows, failed


def paired_results(a_row: MethodRow, b_row: MethodRow, primary: str) -> tuple[list[Any], str | None]:
    """(`paired_bootstrap(a, b)` on each split both rows have, on the resamples of a's record; the first error as
    "split: message", or None). An error stops at that split."""
    from bench.evaluation.metrics import paired_bootstrap

    theirs = {r.split: r for r in b_row.records}
    results = []
    for a in a_row.records:
        if a.split not in theirs:
            continue
        ci = a.metrics[primary]
        try:
            results.append(paired_bootstrap(a.task(), a.predictions(), theirs[a.split].predictions(), primary,
                                            n_resamples=int(ci["n_resamples"]), seed=int(ci["seed"]),
                                            confidence=float(ci.get("confidence", 0.95))))
        except (DataError, MissingFileError) as exc:
            return results, f"{a.split}: {exc}"
    return results, None


def compare(best: MethodRow, other: MethodRow, primary: str) -> Comparison:
    """`paired_bootstrap(best, other)` on each common split (resamples of the best record)."""
    n_common = len({r.split for r in best.records} & {r.split for r in other.records})
    if not n_common:
        return Comparison(None, None, 0, "no split in common with the best row")
    results, error = paired_results(best, other, primary)
    if error is not None:
        return Comparison(None, None, n_common, error)
    return Comparison(max(r.p_value for r in results), all(r.significant for r in results), n_common)


# ----------------------------------------------------------------------------- what is left out of a table




def _sha(record: RunRecord) -> str:
    return str((record.data.get("split") or {}).get("sha256") or "")


def _ended(record: RunRecord) -> datetime:
    """When the run ended (aware, UTC); unknown or unparsable dates sort first."""
    try:
        when = datetime.fromisoformat(str(record.data.get("ended")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def split_files(records: Sequence[RunRecord]) -> dict[str, str]:
    """Split tag -> the sha256 of the split file one dataset's table uses for it.

    The sha256 of the most records wins; a tie goes to the file of the most recently
    ended record (then to the smaller sha256, so the choice never depends on order).
    """
    votes: dict[str, dict[str, list[datetime]]] = {}
    for r in records:
        votes.setdefault(r.split, {}).setdefault(_sha(r), []).append(_ended(r))
    return {tag: max(sorted(by_sha), key=lambda sha: (len(by_sha[sha]), max(by_sha[sha])))  # first max: smallest
            for tag, by_sha in votes.items()}


@dataclass(frozen=True)
class Unreadable:
    """A run folder with no readable record: `path` (relative to the work folder) and why."""

    dataset: str
    path: str
    reason: str


def unreadable_runs(workdir: Path, suite: str, records: Sequence[RunRecord]) -> list[Unreadable]:
    """Run folders under `runs/<suite>/` that `iter_runs` could not read, with the reason.

    A folder counts when it holds run.json, a predictions file, weights (*.safetensors) or
    a checkpoint folder, and is not inside another run folder (trainers keep job folders,
    e.g. GMA's, and checkpoints inside theirs); it is unreadable when its run.json is damaged
    or of another schema (`load_run` refuses it), or missing while the other files are there
    (an interrupted run, or a deleted record).
    """
    root = Layout(workdir).runs_root(suite)
    if not root.is_dir():
        return []
    runs = {Path(r.run_dir) for r in records}  # grows with the unreadable ones found
    outputs = set(PREDICTIONS.values())
    found = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):  # a folder comes before its subfolders
        rel = folder.relative_to(root)
        if CHECKPOINT_DIR in rel.parts or folder in runs or any(parent in runs for parent in folder.parents):
            continue
        record = folder / RUN_FILE
        if record.exists():
            try:
                load_run(folder)
                continue  # readable after all (written since the records were read)
            except (DataError, MissingFileError) as exc:
                reason = str(exc).replace(f" {record}", "").replace(str(record), RUN_FILE)
            shown = record
        else:
            made = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                          if p.name in outputs or p.suffix == ".safetensors"
                          or (p.name == CHECKPOINT_DIR and p.is_dir()))
            if not made:
                continue
            reason = (f"no {RUN_FILE}, only {', '.join(made)} (an interrupted run, or its record was deleted); "
                      f"the next `bench run --suite {suite}` reruns it")
            shown = folder
        runs.add(folder)
        found.append(Unreadable(rel.parts[0] if len(rel.parts) > 1 else "", _shown_path(shown, workdir),
                                _one_line(reason)))
    return found


@dataclass(frozen=True)
class Skipped:
    """A run this machine could not run (an optional extra it lacks, e.g. 2DMamba's CUDA kernel)."""

    dataset: str
    method: str
    split: str
    reason: str
    path: str
    earlier_record: bool  # a run.json of an earlier attempt is beside it (and in the table)


def skipped_runs(workdir: Path, suite: str) -> list[Skipped]:
    """The `run-skipped.json` records under `runs/<suite>/`, with their reasons; damaged ones are left out."""
    import json

    root = Layout(workdir).runs_root(suite)
    found = []
    for path in sorted(root.rglob(SKIPPED_FILE)) if root.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("status") != "skipped":
            continue
        found.append(Skipped(str(data.get("dataset", "")), str(data.get("method", path.parent.name)),
                             str(data.get("split", "")), _one_line(str(data.get("reason", ""))),
                             _shown_path(path, workdir), (path.parent / RUN_FILE).is_file()))
    return found


def _skipped_lines(skipped: Sequence[Skipped]) -> list[str]:
    if not skipped:
        return []
    return ["", "**Skipped runs** (this machine cannot run them; not in the table unless an earlier record is):", "",
            *(f"- `{s.method}` `{s.split}`: {s.reason}" + (" (its earlier record is in the table)" if s.earlier_record
                                                             else "") + f" — `{s.path}`" for s in skipped)]


def _current_sha(path: str, workdir: Path) -> str | None:
    """sha256 of the split file now at `path` (as recorded, or inside the work folder); None if it is gone."""
    from bench.common.files import sha256_file

    shown = Path(_shown_path(path, workdir))
    candidate = shown if shown.is_absolute() or shown == Path(path) else workdir / shown
    try:
        return sha256_file(candidate) if candidate.is_file() else None
    except OSError:
        return None


def _not_ranked_lines(off: Sequence[RunRecord], used: Mapping[str, RunRecord], suite: str,
                      workdir: Path) -> list[str]:
    """The records made on another split file than the table's, and how to bring them in."""
    if not off:
        return []
    lines = ["", "**Not ranked: made on another split file** (a table compares the test bags of one split file; "
                 "for each split, the file most records were made on is used):", ""]
    for r in off:
        mine, theirs = r.data.get("split") or {}, used[r.split].data.get("split") or {}
        seed = mine.get("seed", r.data.get("seed", 0))
        rerun = f"bench run --suite {suite} --datasets {r.dataset} --seeds {seed}"
        if _current_sha(str(mine.get("path", "")), workdir) == _sha(r):
            todo = (f"This record is on the split file now in the work folder and the table's are not: rerun "
                    f"those with `{rerun} --force`.")
        else:
            todo = f"Rerun it on the split file now in the work folder: `{rerun} --methods {r.method} --force`."
        path, table_path = (_shown_path(x.get("path", "?"), workdir) for x in (mine, theirs))
        table_file = ("another version of that file" if path == table_path else f"`{table_path}`")
        lines.append(f"- `{r.method}` `{r.split}`: split file `{path}` (sha256 `{_sha(r)[:12] or '?'}`); the table "
                     f"uses {table_file} (sha256 `{_sha(used[r.split])[:12] or '?'}`). {todo}")
    return lines


# ----------------------------------------------------------------------------- formatting


def _shown_path(path: str | Path, workdir: Path) -> str:
    """`path` relative to the work folder when it is inside it, else as recorded (posix)."""
    path = Path(path)
    for p, base in ((path, workdir), (path.resolve(), workdir.resolve())):
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def _shown_dir(path: Path, placeholder: str) -> str:
    """A folder as given when relative, relative to the current folder when inside it, else `placeholder`."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return placeholder


def _fmt_p(p: float) -> str:
    """`p=0.004`, or `p<0.001`."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "—"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _md_table(df: pd.DataFrame) -> str:
    from tabulate import tabulate

    return tabulate(df, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- the measured table


def _sort_rows(rows: list[MethodRow], primary: str, higher: bool) -> list[MethodRow]:
    def key(row: MethodRow) -> tuple[float, str]:
        mean = row.metric(primary)[0]  # type: ignore[index]
        return (-mean if higher else mean, row.method)

    return sorted(rows, key=key)


def measured_table(rows: list[MethodRow], comparisons: Mapping[str, Comparison], task: Mapping[str, Any]) -> str:
    """The Markdown table of `rows` (already sorted, best first)."""
    import pandas as pd

    metrics = list(task["metrics"])
    higher = {m: bool(task.get("higher_is_better", {}).get(m, True)) for m in metrics}
    primary = task["primary_metric"]
    best_of = {}
    for m in metrics:
        means = [row.metric(m)[0] for row in rows if row.metric(m) is not None]  # type: ignore[index]
        if means:
            best_of[m] = max(means) if higher[m] else min(means)
    named = any(row.method != "/".join(row.field(k) for k in ("paradigm", "encoder", "aggregator")) for row in rows)
    several = any(len(row.records) > 1 for row in rows)
    table = []
    for row in rows:
        out: dict[str, str] = {"paradigm": row.field("paradigm"), "encoder": row.field("encoder"),
                               "aggregator": row.field("aggregator")}
        if named:
            out["method"] = row.method
        if several:
            out["splits"] = str(len(row.records))
            sd = row.spread(primary)
            out[f"sd {METRIC_LABELS.get(primary, primary)}"] = "—" if sd is None else f"{sd:.3f}"
        for m in metrics:
            ci = row.metric(m)
            cell = "—" if ci is None else format_interval(*ci)
            if ci is not None and m in best_of and round(ci[0], 3) == round(best_of[m], 3):
                cell = f"**{cell}**"
            out[METRIC_LABELS.get(m, m)] = cell
        c = comparisons.get(row.method)
        if c is None:
            out["vs best"] = "best"
        elif c.p_value is None:
            out["vs best"] = "n/a"
        else:
            out["vs best"] = f"{'' if c.significant else NOT_SIGNIFICANT + ' '}{_fmt_p(c.p_value)}"
        out["train time"] = _fmt_seconds(row.cost("train_seconds"))
        infer = row.cost("infer_seconds_per_slide")
        out["infer s/slide"] = "—" if infer is None else f"{infer:.3g}"
        mem = row.cost("peak_memory_mb")
        kind = str(row.first.costs.get("peak_memory_kind") or "")
        out["peak memory"] = "—" if mem is None else f"{mem:.0f} MiB ({MEMORY_KINDS.get(kind, kind or '?')})"
        params, trainable = row.cost("params"), row.cost("trainable_params")
        frozen = trainable is not None and params is not None and trainable < params
        out["params"] = _fmt_count(params) + (f" ({_fmt_count(trainable)} trained)" if frozen else "")
        table.append(out)
    return _md_table(pd.DataFrame(table))


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no GUI
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def pareto_front(points: Sequence[tuple[float, float]], higher: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (lower x) and metric, by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher else points[i][1]))
    front, best = [], -math.inf
    for i in order:
        y = points[i][1] if higher else -points[i][1]
        if y > best:
            front.append(i)
            best = y
    return front


def _cost_plot(rows: list[MethodRow], task: Mapping[str, Any], dataset: str, path: Path) -> Path | None:
    primary = task["primary_metric"]
    higher = bool(task.get("higher_is_better", {}).get(primary, True))
    pts = [(row, row.cost("infer_seconds_per_slide"), row.metric(primary)) for row in rows]
    pts = [(row, x, ci) for row, x, ci in pts if x is not None and x > 0 and ci is not None]
    if not pts:
        return None
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    colors = {"two-stage": "tab:blue", "e2e": "tab:orange", "gma": "tab:green"}
    for row, x, (mean, low, high) in pts:
        paradigm = row.field("paradigm")
        ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=3,
                    color=colors.get(paradigm, "tab:gray"), label=paradigm)
        ax.annotate(row.method, (x, mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto_front([(x, ci[0]) for _, x, ci in pts], higher)
    ax.plot([pts[i][1] for i in front], [pts[i][2][0] for i in front], "--o", color="black", lw=1, ms=11,
            mfc="none", drawstyle="steps-post", label="Pareto front")  # rings: visible for a one-point front
    ax.set_xscale("log")
    ax.margins(x=0.2)  # room for the method labels right of the points
    ax.set_xlabel("inference seconds per slide (log scale)")
    ax.set_ylabel(f"test {METRIC_LABELS.get(primary, primary)} (bootstrap mean, interval)")
    ax.set_title(f"{dataset}: {METRIC_LABELS.get(primary, primary)} against inference cost")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), fontsize=8, loc="outside lower center", ncols=len(unique))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _roc_plot(rows: list[MethodRow], dataset: str, path: Path) -> Path | None:
    import numpy as np
    from sklearn.metrics import roc_curve

    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    grid = np.linspace(0, 1, 201)
    drawn = 0
    for row in rows:
        try:
            frame = row.first.predictions()
        except (MissingFileError, DataError):
            continue
        y = frame["label"].to_numpy().astype(int)
        cols = sorted((c for c in frame.columns if c.startswith("prob_")), key=lambda c: int(c[5:]))
        if len(cols) == 2:
            fpr, tpr, _ = roc_curve(y == 1, frame[cols[1]].to_numpy())
        else:  # macro average of the one-vs-rest curves on a common FPR grid
            curves = [np.interp(grid, *roc_curve(y == k, frame[c].to_numpy())[:2]) for k, c in enumerate(cols)
                      if (y == k).any() and (y != k).any()]
            if not curves:
                continue
            fpr, tpr = grid, np.mean(curves, axis=0)
        auc = row.first.metrics.get("auc", {}).get("estimate")
        label = row.method + (f" (AUC {auc:.3f})" if isinstance(auc, (int, float)) else "")
        ax.plot(fpr, tpr, lw=1.5, label=label)
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{dataset}: test ROC" + ("" if len(cols) == 2 else " (macro one-vs-rest)"))
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    return _save(fig, path)


def _km_plot(rows: list[MethodRow], dataset: str, path: Path) -> Path | None:
    import numpy as np
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    frames = []
    for row in rows:
        try:
            frames.append((row, row.first.predictions()))
        except (MissingFileError, DataError):
            continue
    if not frames:
        return None
    cols = min(3, len(frames))
    n_rows = math.ceil(len(frames) / cols)
    fig = _figure(4.2 * cols, 3.4 * n_rows)
    axes = fig.subplots(n_rows, cols, squeeze=False, sharey=True)
    for ax in axes.flat[len(frames):]:
        ax.set_visible(False)
    for ax, (row, frame) in zip(axes.flat, frames):
        time = frame["time"].to_numpy(dtype=float)
        event = frame["event"].to_numpy().astype(bool)
        risk = frame["risk"].to_numpy(dtype=float)
        high = risk > np.median(risk)
        for mask, name, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
            if mask.any():
                t, s = kaplan_meier_estimator(event[mask], time[mask])
                ax.step(np.r_[0.0, t], np.r_[1.0, s], where="post", color=color, label=f"{name} (n={mask.sum()})")
        title = row.method
        if high.any() and (~high).any() and event.any():
            _, p = compare_survival(Surv.from_arrays(event, time), high.astype(int))
            title += f"\nlog-rank {_fmt_p(float(p))}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("time")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[:, 0]:
        ax.set_ylabel("survival probability")
    fig.suptitle(f"{dataset}: Kaplan-Meier curves of the predicted risk halves (split at the median risk)", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------- sweeps and reported rows


def _sweeps_section(workdir: Path, suite: str, dataset: str, methods: Sequence[str]) -> list[str]:
    import pandas as pd

    from bench.common.console import warn
    from bench.evaluation.sweeps import read_best, sweep_splits

    layout = Layout(workdir)
    table = []
    for method in methods:
        for split in sweep_splits(layout, suite, method, dataset):
            try:
                best = read_best(layout, suite, method, dataset, split)
            except DataError as exc:  # a damaged best.json must not hide the measured results
                warn(str(exc))
                continue
            if best is None:
                continue
            importances = sorted((best.get("importances") or {}).items(), key=lambda kv: -kv[1])
            value = best.get("best_value")
            table.append({
                "method": method, "split": split, "trials": str(best.get("n_trials", "?")),
                "failed": str(best.get("n_failed", "?")), "pruned": str(best.get("n_pruned", "?")),
                f"best {best.get('metric', 'validation')}": f"{value:.3f}" if isinstance(value, (int, float)) else "—",
                "best params": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in best["best_params"].items()) or "—",
                "importance": ", ".join(f"{k} {v:.2f}" for k, v in importances) or "—",
            })
    if not table:
        return []
    return ["", f"#### Sweeps (one study per split, on its train/validation parts only; `bench run --suite {suite} --params best` uses each split's own)", "",
            _md_table(pd.DataFrame(table))]


def load_reported(source: str) -> pd.DataFrame:
    """Rows of `bench/evaluation/reported.csv` from `source` (e.g. "abmilx"); unknown sources are an error."""
    import pandas as pd

    with resources.files("bench.evaluation").joinpath(REPORTED_CSV).open("r", encoding="utf-8") as f:
        table = pd.read_csv(f, dtype=str, keep_default_na=False)
    missing = [c for c in REPORTED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"bench/evaluation/{REPORTED_CSV} lacks columns {missing}; expected {list(REPORTED_COLUMNS)}")
    known = sorted(table["source"].unique())
    if source not in known:
        raise ConfigError(f"reported = {source!r}: no such source in bench/evaluation/{REPORTED_CSV}; known: {known}")
    return table[table["source"] == source].reset_index(drop=True)


def _reported_section(source: str, reported: pd.DataFrame, data_name: str, kind: str) -> list[str]:
    import pandas as pd

    rows = reported[(reported["dataset"].str.lower() == data_name.lower()) & (reported["task"] == kind)]
    if rows.empty:
        return []
    label, citation = REPORTED_SOURCES.get(source, (source, source))
    metrics = list(dict.fromkeys(rows["metric"]))
    by_method: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows.itertuples(index=False):
        out = by_method.setdefault((r.paradigm, r.encoder, r.aggregator),
                                   {"paradigm": r.paradigm, "encoder": r.encoder, "aggregator": r.aggregator})
        value = r.value if not r.plus_minus else f"{r.value} ± {r.plus_minus}"
        out[f"{METRIC_LABELS.get(r.metric, r.metric)} ({r.unit})"] = value or "—"
        if r.note:
            out["note"] = "; ".join(x for x in (out.get("note", ""), r.note) if x)
    tables = sorted(set(rows["table"]))
    return ["", f"#### Reported in {label} (not measured here)", "",
            f"As printed in table {', '.join(tables)} of {citation}, for {data_name} "
            f"({', '.join(METRIC_LABELS.get(m, m) for m in metrics)}): the authors' data, splits, settings and "
            "hardware, not this harness's runs. For comparison of scale only.", "",
            _md_table(pd.DataFrame(list(by_method.values())).fillna(""))]


# ----------------------------------------------------------------------------- footer


def degenerate_lines(rows: Sequence[MethodRow], primary: str, higher: bool) -> list[str]:
    """One line per row and metric whose interval has zero width, saying what that means (nothing is hidden)."""
    out = []
    for row in rows:
        names = [primary] + sorted(k for k in row.first.metrics if k != primary)
        for name in names:
            m = row.metric(name)
            if m is None or m[1] != m[2]:
                continue
            label = METRIC_LABELS.get(name, name)
            ranked = name in ("auc", "c_index")
            if ranked and m[0] == (1.0 if higher or name != primary else 0.0):
                why = ("every bootstrap resample of the test set is ranked perfectly (the planted effect is easy "
                       "for this method at this size)")
            elif ranked and m[0] == 0.0:
                why = ("every pair is ranked the wrong way round on every resample: the predictions are inverted "
                       "(e.g. a label-flipped output), not a measurement error")
            elif name == "qwk" and m[0] == 0.0:
                why = "the method gives every test bag the same grade, and kappa of a constant rating is 0"
            else:
                why = "every bootstrap resample gives the same value (the predictions do not vary across the test bags)"
            out.append(f"- `{row.method}`: {label} {m[0]:.3f} with a zero-width interval: {why}.")
    return out


def planted_lines(rows: Sequence[MethodRow], expected: Sequence[Mapping[str, Any]], primary: str) -> list[str]:
    """Markdown lines naming each planted effect and whether the table recovers it.

    Each expectation is {"better", "than": method names, "planted": knob, "value": its setting, "expected": what
    the knob should do}. Recovered = the paired bootstrap interval of better - than on the primary metric lies
    above 0 on every common split (the same test as the `vs best` column, one-sided in the expected direction).
    """
    by_method = {row.method: row for row in rows}
    label = METRIC_LABELS.get(primary, primary)
    lines = []
    for e in expected:
        head = (f"**Planted effect**: `{e['planted']}` = {e['value']:g} ({e['expected']}). Expected: "
                f"`{e['better']}` above `{e['than']}` on {label}. ")
        a, b = by_method.get(e["better"]), by_method.get(e["than"])
        if a is None or b is None:
            missing = " and ".join(f"`{m}`" for m, row in ((e["better"], a), (e["than"], b)) if row is None)
            lines += [head + f"Not checked: no finished run of {missing}.", ""]
            continue
        results, error = paired_results(a, b, primary)
        if error is not None or not results:
            lines += [head + f"Not checked: {_one_line(error or 'the two methods share no split.')}", ""]
            continue
        r = results[0]
        found = (f"Found: {r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}], paired bootstrap {_fmt_p(r.p_value)}"
                 + (f" (first of {len(results)} splits)" if len(results) > 1 else ""))
        if all(x.low > 0 for x in results):
            verdict = "**recovered**: the interval lies above 0."
        elif any(x.high < 0 for x in results):
            verdict = "**reversed**: the interval lies below 0 on a split."
        else:
            verdict = "**not recovered**: the interval contains 0 (no significant difference)."
        lines += [head + found + " — " + verdict, ""]
    return lines


def _operating_point_lines(records: Sequence[RunRecord]) -> list[str]:
    """How the threshold-dependent metrics decided: the validation-chosen thresholds, and the fallbacks."""
    points = [(r, r.data.get("operating_point")) for r in records if r.ok and r.data.get("operating_point")]
    chosen = [(r, op) for r, op in points if op.get("threshold") is not None]
    fallback = [(r, op) for r, op in points if op.get("threshold") is None and op.get("why") != "multi-class: "
                "argmax of the scores"]
    if not chosen and not fallback:
        return []
    out = []
    if chosen:
        values = ", ".join(f"{r.dataset} {r.method} {r.split}: {op['threshold']:.3f}" for r, op in chosen)
        out.append("- Operating points: balanced accuracy, F1 and accuracy of binary tasks use, per run, the threshold "
                   "on P(class 1) that maximises balanced accuracy (= Youden's J) on that run's validation "
                   f"predictions, never the test split; AUC needs none. Thresholds: {values}.")
    for r, op in fallback:
        out.append(f"- Operating point of {r.dataset} {r.method} {r.split}: argmax, because {op.get('why')}.")
    return out


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v not in (None, "")))


def _footer(records: Sequence[RunRecord], ranked_splits: Sequence[RunRecord], n_off: int, n_unreadable: int,
            suite: str, workdir: Path, out_dir: Path, command: str | None) -> list[str]:
    """How the numbers were made; `ranked_splits`: the records on the split files the tables use."""
    import pandas as pd

    splits = {}
    for r in ranked_splits:
        s = r.data.get("split") or {}
        key = (r.dataset, str(s.get("path", "")), str(s.get("sha256", "")))
        entry = splits.setdefault(key, {"seeds": set(), "folds": set()})
        entry["seeds"].add(str(s.get("seed", r.data.get("seed", ""))))
        entry["folds"].add(str(s.get("fold", "")))
    split_table = pd.DataFrame([{"dataset": ds, "split file": f"`{_shown_path(path, workdir)}`", "sha256": f"`{sha}`",
                                 "seeds": ", ".join(sorted(v["seeds"])), "folds": ", ".join(sorted(v["folds"]))}
                                for (ds, path, sha), v in sorted(splits.items())])
    boots = _unique([(ci.get("n_resamples"), f"{float(ci.get('confidence', 0.95)):.0%}")
                     for r in records for ci in r.metrics.values()])
    devices = _unique([r.data.get("device") or r.costs.get("device") for r in records])
    hosts = _unique([f"{h.get('cpu', '?')}, {h.get('platform', '?')}, Python {h.get('python', '?')}"
                     for r in records if isinstance(h := r.data.get("host"), Mapping)])
    versions: dict[str, list[str]] = {}
    for r in records:
        for k, v in (r.data.get("versions") or {}).items():
            versions.setdefault(k, [])
            if str(v) not in versions[k]:
                versions[k].append(str(v))
    commands = [command] if command else _unique([r.data.get("command") for r in records])
    ended = sorted(str(r.data.get("ended")) for r in records if r.data.get("ended"))
    lines = ["## How these numbers were made", ""]  # after a dataset section's closing blank line
    boot_text = ", ".join(f"{n} patient-level bootstrap resamples, {c} percentile interval" for n, c in boots)
    if boot_text:
        lines.append(f"- Intervals: {boot_text} of the test split, seeded with the run's seed; metric cells are "
                     "`mean [low, high]` of the resampled values.")
    else:  # every run failed: there is no interval to describe
        lines.append("- Intervals: none; no run of this suite finished (see the failed runs above).")
    lines += _operating_point_lines(records)
    lines += [f"- `{NOT_SIGNIFICANT}` in `vs best`: the paired bootstrap difference from the best row on the primary "
              "metric (same resamples as the best row's interval) is not significant, i.e. its interval contains 0; "
              "p is the two-sided bootstrap p-value. No mark: significantly different.",
              "- Several splits of a method (seeds, folds): one row; metric cells average the per-split mean, low and "
              "high; `sd` is the standard deviation of the per-split primary means; costs are averaged; the paired "
              "test runs on every split both rows have and the row is unmarked only if it differs on all of them "
              "(largest p shown). Plots use each method's first split.",
              "- Costs: train time includes validation and, for two-stage, the feature extraction of the slides it "
              "trains on; inference s/slide includes feature extraction for two-stage; peak memory at bag batch size "
              "1: CUDA = torch.cuda.max_memory_allocated, RSS = process resident-set peak since reset, process RSS = "
              "lifetime peak of the process (an upper bound).",
              f"- Runs: {len(records)} record{'' if len(records) == 1 else 's'} under `runs/{suite}/` of the "
              "work folder"
              + (f", finished {ended[0][:19]} to {ended[-1][:19]} UTC" if ended else "")
              + (f"; {n_off} not ranked (made on another split file)" if n_off else "")
              + (f"; {n_unreadable} run folder{'' if n_unreadable == 1 else 's'} without a readable record, "
                 "skipped (listed under their dataset)" if n_unreadable else "")
              + ".",
              f"- Device: {'; '.join(map(str, devices)) or 'not recorded'}. "
              f"Host: {'; '.join(hosts) or 'not recorded'}.",
              "- Software: " + (", ".join(f"{k} {' / '.join(v)}" for k, v in versions.items()) or "not recorded") + ".",
              f"- Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}; rebuild it from the records "
              f"with `bench leaderboard --suite {suite} --workdir {_shown_dir(workdir, '<workdir>')} "
              f"--out {_shown_dir(out_dir, '<out>')}`."]
    if commands:
        lines.append("- Reproduce the runs: " + "; ".join(f"`{c}`" for c in commands) + ".")
    paper_sets = sorted({ds for (ds, path, _), _ in splits.items() if Path(path).name.startswith("paper-seed")})
    if paper_sets:
        from bench.data.paper import PROVENANCE

        lines.append(f"- Splits of {', '.join(paper_sets)}: the ABMILX authors' own (protocol `paper`, their label "
                     f"and split files shipped in `{PROVENANCE['shipped']}` from {PROVENANCE['repository']} at "
                     f"{PROVENANCE['commit'][:7]}), so these test sets are the paper's; the other datasets use a "
                     "seeded patient-level split.")
    if not split_table.empty:
        lines += ["", "Split files (every ranked record of a dataset's split was made on the same file; paths "
                      "relative to the work folder):", "", _md_table(split_table)]
    return lines


# ----------------------------------------------------------------------------- the leaderboard


def _unreadable_lines(unreadable: Sequence[Unreadable]) -> list[str]:
    if not unreadable:
        return []
    return ["", "**Unreadable records** (skipped, not in the table):", "",
            *(f"- `{u.path}`: {u.reason}" for u in unreadable)]


def _dataset_section(recs: Sequence[RunRecord], unreadable: Sequence[Unreadable], workdir: Path, suite: str,
                     out_dir: Path, paper: pd.DataFrame | None, reported: str | None,
                     data_name: str, expected: Sequence[Mapping[str, Any]] = ()) -> tuple[list[str], list[RunRecord], int]:
    """(Markdown lines, records on the split files the table uses, number not ranked) of one dataset."""
    if not recs:
        return ["No readable record of this dataset.", *_unreadable_lines(unreadable)], [], 0
    dataset = recs[0].dataset
    task = dict(recs[0].data["task"])
    primary = task["primary_metric"]
    higher = bool(task.get("higher_is_better", {}).get(primary, True))
    candidates = [r for r in recs if r.ok and primary in r.metrics]
    chosen = {**split_files(recs), **split_files(candidates)}  # failed records decide only splits with no ok one
    off = [r for r in candidates if _sha(r) != chosen[r.split]]
    on_split = [r for r in recs if _sha(r) == chosen[r.split]]
    off_ids = {id(r) for r in off}
    rows, failed = _group([r for r in recs if id(r) not in off_ids], primary)  # a failed run is listed on any file
    n_test = _unique([r.data.get("n_test") for r in on_split if r.ok])
    lines = [f"Task: {task['kind']}; sorted by test {METRIC_LABELS.get(primary, primary)} "
             f"({'higher' if higher else 'lower'} is better); test bags: {', '.join(map(str, n_test)) or '—'}.", ""]
    if rows:
        rows = _sort_rows(rows, primary, higher)
        comparisons = {row.method: compare(rows[0], row, primary) for row in rows[1:]}
        if any(r.data.get("synthetic") for r in recs):  # planted effects exist on synthetic cohorts only
            lines += planted_lines(rows, expected, primary)
        lines.append(measured_table(rows, comparisons, task))
        lines += [f"- n/a vs best for {m}: {_one_line(c.reason)}" for m, c in comparisons.items()
                  if c.p_value is None]
        lines += degenerate_lines(rows, primary, higher)
        plot_dir = out_dir / suite
        plots = [("metric against inference cost", _cost_plot(rows, task, dataset, plot_dir / f"{dataset}-cost.png"))]
        if task["kind"] == "classification":
            plots.append(("ROC curves", _roc_plot(rows, dataset, plot_dir / f"{dataset}-roc.png")))
        elif task["kind"] == "survival":
            plots.append(("Kaplan-Meier curves", _km_plot(rows, dataset, plot_dir / f"{dataset}-km.png")))
        links = [f"![{dataset}: {what}]({path.relative_to(out_dir).as_posix()})" for what, path in plots if path]
        if links:
            lines += ["", *links]
        heatmaps = sorted((plot_dir / "heatmaps" / dataset).glob("*/*.png"))  # `bench run` draws them first
        if heatmaps:
            lines += ["", "Attention heatmaps (test slides; per-patch attention over the thumbnail, lesion truth "
                      "outlined on synthetic cohorts; `bench heatmap RUN_DIR` draws more): " + ", ".join(
                          f"[{p.parent.name.replace('_', '/')} {p.stem}]({p.relative_to(out_dir).as_posix()})"
                          for p in heatmaps)]
    else:
        lines.append("No run of this dataset finished.")
    if failed:
        lines += ["", "**Failed runs** (not in the table):", ""]
        lines += [f"- `{r.method}` `{r.split}`: {_one_line(err)}" for r, err in failed]
    used = {r.split: r for r in reversed(candidates) if _sha(r) == chosen[r.split]}
    lines += _not_ranked_lines(off, used, suite, workdir)
    lines += _unreadable_lines(unreadable)
    lines += _sweeps_section(workdir, suite, dataset, _unique([r.method for r in recs]))
    if paper is not None and reported is not None:
        lines += _reported_section(reported, paper, data_name, task["kind"])
    return lines, on_split, len(off)


def build_leaderboard(workdir: Path, suite: str, out_dir: Path, *, synthetic: bool = False,
                      reported: str | None = None, command: str | None = None,
                      data_names: Mapping[str, str] | None = None,
                      expectations: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Path:
    """Write `out_dir/<suite>.md` and `out_dir/<suite>/*.png` from the run records of `suite`.

    Args:
        workdir: the work folder holding `runs/<suite>/`.
        suite: the suite name (records' folder); built-in suites also give the datasets' `data` names.
        out_dir: folder of the leaderboards.
        synthetic: mark the leaderboard as synthetic demo data (also done when any record is synthetic).
        reported: a source of `bench/evaluation/reported.csv` (e.g. "abmilx") to show the paper's numbers.
        command: the command that reproduces the runs (default: each record's command).
        data_names: dataset name -> `data` name for matching reported rows (default: the dataset name itself; the runner and `bench leaderboard` pass the suite's).
        expectations: dataset name -> planted contrasts to check (`planted_lines`); the runner and
            `bench leaderboard` pass the suite's `expect` entries with their knob values.

    Returns:
        The path of the Markdown file.

    Raises:
        MissingFileError: the suite has no run records.
    """
    from bench.evaluation.records import iter_runs

    workdir, out_dir = Path(workdir), Path(out_dir)
    records = iter_runs(workdir, suite)
    unreadable = unreadable_runs(workdir, suite, records)
    if not records:
        skipped = "".join(f"; {u.path}: {u.reason}" for u in unreadable[:3])
        raise MissingFileError(f"no run records for suite {suite!r} under {Layout(workdir).runs_root(suite)}"
                               + (f" ({len(unreadable)} unreadable{skipped})" if unreadable else "")
                               + f"; run `bench run --suite {suite}` first (or pass the --workdir it used)")
    synthetic = synthetic or any(bool(r.data.get("synthetic")) for r in records)
    names = dict(data_names) if data_names is not None else {}
    paper = load_reported(reported) if reported else None
    title = f"# Leaderboard: {suite}" + (f" — {SYNTHETIC_NOTE}" if synthetic else "")
    lines = [title, ""]
    if synthetic:
        lines += [f"> **{SYNTHETIC_NOTE}.** The cohorts were written by the harness itself; encoders may be "
                  "randomly initialised and trained for few epochs.", ""]
    by_dataset: dict[str, list[RunRecord]] = {}
    for r in records:
        by_dataset.setdefault(r.dataset, []).append(r)
    skipped_of: dict[str, list[Skipped]] = {}
    for sk in skipped_runs(workdir, suite):
        skipped_of.setdefault(sk.dataset, []).append(sk)
        by_dataset.setdefault(sk.dataset, [])
    unreadable_of: dict[str, list[Unreadable]] = {}
    for u in unreadable:
        unreadable_of.setdefault(u.dataset, []).append(u)
        by_dataset.setdefault(u.dataset, [])  # a dataset whose every record is unreadable still gets its section
    ranked_splits: list[RunRecord] = []
    n_off = 0
    for dataset, recs in by_dataset.items():
        lines += [f"## {dataset or 'Run folders outside a dataset folder'}", ""]
        section, on_split, off = _dataset_section(recs, unreadable_of.get(dataset, []), workdir, suite, out_dir,
                                                  paper, reported, names.get(dataset, dataset),
                                                  (expectations or {}).get(dataset, ()))
        lines += [*section, *_skipped_lines(skipped_of.get(dataset, [])), ""]
        ranked_splits += on_split
        n_off += off
    lines += _footer(records, ranked_splits, n_off, len(unreadable), suite, workdir, out_dir, command)
    return write_text_atomic(out_dir / f"{suite}.md", "\n".join(lines) + "\n")


__all__ = ["build_leaderboard", "load_reported", "measured_table", "compare", "pareto_front", "split_files",
           "unreadable_runs", "skipped_runs", "MethodRow", "Comparison", "Unreadable", "Skipped", "SYNTHETIC_NOTE", "NOT_SIGNIFICANT"]
