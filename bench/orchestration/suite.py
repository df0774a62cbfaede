"""Suites: TOML files naming datasets, methods, hyperparameters and search spaces.

A suite is read once, here, and validated at the edge: an unknown key, a typo
or a bad value is an error naming the file, the key and what is allowed.
Built-in suites live in `bench/orchestration/suites/<name>.toml`; a user's own file works the
same way (`bench run --suite my_suite.toml`).

Schema (every key optional unless marked):

    name = "subtyping"                    # required
    description = "..."
    seeds = [0]                           # seed k: split file <protocol>-seed<k>.csv and training seed k
    bootstrap = 1000                      # resamples for the test-set intervals
    reported = "abmilx"                   # paper reference rows shown by the leaderboard

    [[encoders]]                          # register encoders without touching code
    name = "my-vit"; model = "hf-hub:org/model" (or a timm name); embed_dim = 768; ...

    [defaults.two-stage]                  # trainer parameters per paradigm
    [defaults.e2e]
    [defaults.gma]

    [[datasets]]
    name = "tcga-brca"                    # required; folder names under the work folder
    task = "classification"               # required: classification | grading | survival
    classes = ["IDC", "ILC"]
    data = "TCGA-BRCA"                    # folder under --data-root (labels.csv + slides/); default: name
    labels = "labels.csv"                 # labels file inside that folder
    mpp = 0.25                            # level-0 um/px for slides that record none
    primary_metric = "auc"
    oversample = 2.0                      # classification: majority:minority ratio in training
    folds = [0]                           # which folds of the split file to run (default: all)
    split = { protocol = "holdout", ratios = [0.7, 0.3], val_fraction = 0.2 }
    # or the authors' published split, shipped with the package (bench.data.paper); `synthetic` is the
    # split of the demo's synthetic cohort, whose slides are not the authors':
    # split = { protocol = "paper", source = "abmilx-tcga-brca-subtyping", synthetic = { protocol = "holdout" } }
    two_stage = { magnification = 20, patch_size = 256, input_size = 224 }
    e2e = { magnification = 10, patch_size = 256, input_size = 224, scales = [[10, 0.75], [5, 0.25]] }
    synthetic = { kind = "subtyping", n_slides = 40, width = 4096, height = 3072 }

    [[methods]]
    paradigm = "two-stage"                # required: two-stage | e2e | gma
    encoder = "resnet50-trunc"            # or encoders = [...] (grid)
    aggregator = "abmil"                  # or aggregators = [...] (grid)
    name = "..."                          # default: <paradigm>/<encoder>/<aggregator>
    params = { lr = 2e-4 }                # trainer parameters (override defaults)
    aggregator_params = { dropout = 0.25 }
    weights = "/path/to/encoder.safetensors"
    random_init = false                   # explicit: the encoder starts from random weights
    [methods.search]                      # Optuna search space; "aggregator.<p>" targets aggregator_params
    lr = { type = "float", low = 1e-5, high = 1e-3, log = true }

    [demo]                                # what runs without --data-root (synthetic cohorts)
    description = "..."
    seeds = [0]
    defaults = { two-stage = {...}, e2e = {...}, gma = {...} }
    datasets = { tcga-brca = { synthetic = {...}, two_stage = {...}, e2e = {...}, split = {...} } }
    methods = [ {...}, ... ]              # replaces the method list
"""

from __future__ import annotations

import difflib
import itertools
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bench.common.errors import ConfigError, MissingFileError
from bench.data.cohort import TASK_KINDS
from bench.data.layout import check_name
from bench.data.tiling import Tiling

PARADIGMS = ("two-stage", "e2e", "gma")
TASKS = TASK_KINDS
SEARCH_TYPES = ("float", "int", "categorical")


# --- validation helpers ----------------------------------------------------------------------


class _Where:
    """Names a place in a suite file for error messages: `suite.toml: datasets[1].split.ratios`."""

    def __init__(self, source: str, path: str = "") -> None:
        self.source, self.path = source, path

    def __truediv__(self, key: str | int) -> _Where:
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if self.path else str(key))
        return _Where(self.source, self.path + step)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path or '(top level)'}: {message}")


def _table(value: Any, where: _Where) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(f"expected a table, got {type(value).__name__} {value!r}")
    return value


def _keys(table: Mapping[str, Any], allowed: Sequence[str], where: _Where, required: Sequence[str] = ()) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise (where / key).error(f"unknown key {key!r}{hint} Allowed: {', '.join(allowed)}.")
    for key in required:
        if key not in table:
            raise where.error(f"missing required key {key!r}")


def _str(value: Any, where: _Where, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"expected a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.error(f"{value!r} is not one of {', '.join(choices)}{hint}")
    return value


def _num(value: Any, where: _Where, *, positive: bool = False, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.error(f"expected a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise where.error(f"expected an integer, got {value!r}")
    if positive and value <= 0:
        raise where.error(f"must be positive, got {value!r}")
    return int(value) if integer else float(value)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts/lists of a frozen suite value (for JSON and config hashes)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


# --- specs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One dimension of an Optuna search space."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str
    classes: tuple[str, ...] | None
    data: str
    labels: str
    mpp: float | None
    primary_metric: str | None
    oversample: float | None
    folds: tuple[int, ...] | None
    split: Mapping[str, Any]
    two_stage: Tiling
    e2e: Tiling
    synthetic: Mapping[str, Any]
    task_params: Mapping[str, Any]
    # planted effects the leaderboard checks: ({"better", "than", "planted"}, ...), synthetic cohorts only
    expect: tuple[Mapping[str, str], ...] = ()

    def split_spec(self) -> Any:
        from bench.data.splits import SplitSpec

        return SplitSpec(**thaw(self.split))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    paradigm: str
    encoder: str
    aggregator: str
    params: Mapping[str, Any] = field(default_factory=dict)
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    random_init: bool = False
    search: Mapping[str, SearchParam] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    source: str
    seeds: tuple[int, ...]
    bootstrap: int
    reported: str | None
    datasets: tuple[DatasetSpec, ...]
    methods: tuple[MethodSpec, ...]
    defaults: Mapping[str, Mapping[str, Any]]
    encoders: tuple[Mapping[str, Any], ...]
    demo: bool

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(_unknown("dataset", name, [d.name for d in self.datasets], self.name))

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(_unknown("method", name, [m.name for m in self.methods], self.name))

    def method_params(self, method: MethodSpec) -> dict[str, Any]:
        """Trainer parameters of a method: the paradigm's defaults, then the method's own."""
        return {**thaw(self.defaults.get(method.paradigm, {})), **thaw(method.params)}

    def expectations(self) -> dict[str, list[dict[str, Any]]]:
        """Dataset -> its planted contrasts with the knob's value and effect, for `build_leaderboard`."""
        from bench.data.synthetic import PLANTED_EXPECTED

        return {d.name: [{**e, "value": float(d.synthetic[e["planted"]]), "expected": PLANTED_EXPECTED[e["planted"]]}
                         for e in d.expect] for d in self.datasets if d.expect}

    def allowing_missing_slides(self) -> Suite:
        """The suite with `allow_missing = true` on every `paper` split (`bench run --allow-missing-slides`)."""
        from dataclasses import replace

        return replace(self, datasets=tuple(
            replace(d, split=_freeze({**thaw(d.split), "allow_missing": True}))
            if d.split.get("protocol") == "paper" else d for d in self.datasets))

    def select(self, datasets: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> Suite:
        """The suite restricted to some datasets and methods (names or glob patterns)."""
        from fnmatch import fnmatchcase
        from dataclasses import replace

        def pick(kind: str, names: Sequence[str] | None, items: Sequence[Any]) -> tuple[Any, ...]:
            if not names:
                return tuple(items)
            chosen = []
            for pattern in names:
                hits = [it for it in items if fnmatchcase(it.name, pattern)]
                if not hits:
                    raise ConfigError(_unknown(kind, pattern, [it.name for it in items], self.name))
                chosen += [h for h in hits if h not in chosen]
            return tuple(chosen)

        return replace(self, datasets=pick("dataset", datasets, self.datasets),
                       methods=pick("method", methods, self.methods))


def _unknown(kind: str, name: str, known: Sequence[str], suite: str) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"; did you mean: {', '.join(close)}?" if close else "."
    return f"unknown {kind} {name!r} in suite {suite!r}{hint} Known: {', '.join(known)}."


# --- loading ------------------------------------------------------------------------------------


def builtin_suites() -> list[str]:
    """Names of the suites shipped in bench/orchestration/suites/."""
    return sorted(p.name[:-5] for p in resources.files("bench.orchestration").joinpath("suites").iterdir() if p.name.endswith(".toml"))


def suite_path(name_or_path: str | Path) -> Path:
    """Resolve a built-in suite name or a TOML file path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise MissingFileError(f"suite file {p} does not exist")
        return p
    candidate = Path(str(resources.files("bench.orchestration").joinpath("suites", f"{name_or_path}.toml")))
    if not candidate.exists():
        raise ConfigError(_unknown("suite", str(name_or_path), builtin_suites(), "(built-ins)").replace(
            " in suite '(built-ins)'", "") + " Or give a path to a suite .toml file.")
    return candidate


def load_suite(name_or_path: str | Path, *, demo: bool = False) -> Suite:
    """Read and validate a suite; `demo=True` applies its [demo] table (synthetic data)."""
    path = suite_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_suite(raw, source=str(path), demo=demo)


_TOP = ("name", "description", "seeds", "bootstrap", "reported", "encoders", "defaults", "datasets", "methods", "demo")
_DATASET = ("name", "task", "classes", "data", "labels", "mpp", "primary_metric", "oversample", "folds", "split",
            "two_stage", "e2e", "synthetic", "task_params", "expect")
_METHOD = ("name", "paradigm", "encoder", "encoders", "aggregator", "aggregators", "params", "aggregator_params",
           "weights", "random_init", "search")
_DEMO = ("description", "seeds", "defaults", "datasets", "methods")
_TILING = ("magnification", "patch_size", "input_size", "scales")
_SPLIT = ("protocol", "ratios", "val_fraction", "folds", "repeats", "time_bins", "source", "allow_missing", "synthetic")
_SYNTH = ("kind", "n_slides", "width", "height", "mpp", "seed", "minority_fraction", "witness_rate", "lesion_contrast",
          "label_noise", "hazard_strength")


def parse_suite(raw: Mapping[str, Any], *, source: str = "<suite>", demo: bool = False) -> Suite:
    """Validate a suite dict (as read from TOML)."""
    top = _Where(source)
    _keys(raw, _TOP, top, required=("name", "datasets", "methods"))
    name = check_name("suite name", _str(raw["name"], top / "name"))
    demo_raw = _table(raw.get("demo", {}), top / "demo")
    _keys(demo_raw, _DEMO, top / "demo")
    if demo and not demo_raw:
        raise ConfigError(f"{source}: suite {name!r} has no [demo] table, so it cannot run without --data-root; "
                          "give --data-root with the real data")

    defaults = _parse_defaults(raw.get("defaults", {}), top / "defaults")
    if demo:
        for paradigm, values in _parse_defaults(demo_raw.get("defaults", {}), top / "demo" / "defaults").items():
            defaults[paradigm] = {**defaults.get(paradigm, {}), **values}

    datasets_raw = raw["datasets"]
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise (top / "datasets").error("expected a non-empty list of [[datasets]] tables")
    demo_ds = _table(demo_raw.get("datasets", {}), top / "demo" / "datasets") if demo else {}
    names = [d.get("name") for d in datasets_raw if isinstance(d, Mapping)]
    for key in demo_ds:
        if key not in names:
            raise (top / "demo" / "datasets" / key).error(f"no dataset named {key!r} in this suite (have {names})")
    datasets = []
    for i, d in enumerate(datasets_raw):
        where = top / "datasets" / i
        d = dict(_table(d, where))
        if demo and d.get("name") in demo_ds:
            overlay = _table(demo_ds[d["name"]], top / "demo" / "datasets" / d["name"])
            _keys(overlay, _DATASET, top / "demo" / "datasets" / d["name"])
            for key, value in overlay.items():
                d[key] = {**d[key], **value} if isinstance(value, Mapping) and isinstance(d.get(key), Mapping) else value
        datasets.append(_parse_dataset(_paper_split(d, where, demo), where))
        try:  # a bad split is an error at load, not after the cohort was tiled
            datasets[-1].split_spec()
        except ConfigError as exc:
            raise (where / "split").error(str(exc)) from None
    _unique([d.name for d in datasets], "dataset", top / "datasets")

    methods_raw = demo_raw["methods"] if demo and "methods" in demo_raw else raw["methods"]
    mwhere = top / "demo" / "methods" if demo and "methods" in demo_raw else top / "methods"
    if not isinstance(methods_raw, list) or not methods_raw:
        raise mwhere.error("expected a non-empty list of [[methods]] tables")
    methods: list[MethodSpec] = []
    for i, m in enumerate(methods_raw):
        methods += _parse_methods(_table(m, mwhere / i), mwhere / i)
    _unique([m.name for m in methods], "method", mwhere)
    known = [m.name for m in methods]
    for i, d in enumerate(datasets):
        for j, e in enumerate(d.expect):
            for key in ("better", "than"):
                if e[key] not in known:
                    raise (top / "datasets" / i / "expect" / j / key).error(_unknown("method", e[key], known, name))

    seeds_raw = demo_raw.get("seeds", raw.get("seeds", [0])) if demo else raw.get("seeds", [0])
    if not isinstance(seeds_raw, list) or not seeds_raw:
        raise (top / "seeds").error(f"expected a non-empty list of integers, got {seeds_raw!r}")
    seeds = tuple(int(_num(s, top / "seeds" / i, integer=True)) for i, s in enumerate(seeds_raw))
    if any(s < 0 for s in seeds):
        raise (top / "seeds").error(f"seeds must be >= 0, got {list(seeds)}")
    bootstrap = int(_num(raw.get("bootstrap", 1000), top / "bootstrap", positive=True, integer=True))
    encoders = raw.get("encoders", [])
    if not isinstance(encoders, list):
        raise (top / "encoders").error("expected a list of [[encoders]] tables")
    description = raw.get("description", "")
    if demo:
        description = demo_raw.get("description", description)
    return Suite(
        name=name, description=str(description), source=source, seeds=seeds, bootstrap=bootstrap,
        reported=raw.get("reported"), datasets=tuple(datasets), methods=tuple(methods),
        defaults=_freeze(defaults), encoders=tuple(_freeze(_table(e, top / "encoders" / i)) for i, e in enumerate(encoders)),
        demo=demo,
    )


def _unique(names: Sequence[str], kind: str, where: _Where) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise where.error(f"duplicate {kind} name(s): {', '.join(dupes)}; give each a distinct `name`")


def trainer_keys(paradigm: str) -> tuple[str, ...]:
    """The parameters the trainer of `paradigm` accepts (its `PARAM_KEYS`)."""
    if paradigm == "two-stage":
        from baselines.train import PARAM_KEYS
    elif paradigm == "e2e":
        from e2e.train import PARAM_KEYS
    else:
        from e2e.gma.config import PARAM_KEYS
    return tuple(PARAM_KEYS)


def _parse_defaults(raw: Any, where: _Where) -> dict[str, dict[str, Any]]:
    table = _table(raw, where)
    _keys(table, PARADIGMS, where)
    out = {}
    for k, v in table.items():
        values = _table(v, where / k)
        _keys(values, trainer_keys(k), where / k)  # a typo fails at load, before any stage runs
        out[k] = dict(values)
    return out


def _parse_tiling(raw: Any, where: _Where, default_mag: float) -> Tiling:
    t = _table(raw, where)
    _keys(t, _TILING, where)
    scales = []
    for i, s in enumerate(t.get("scales", [])):
        if not (isinstance(s, list) and len(s) == 2):
            raise (where / "scales" / i).error(f"expected [magnification, ratio], got {s!r}")
        scales.append((_num(s[0], where / "scales" / i, positive=True), _num(s[1], where / "scales" / i, positive=True)))
    if scales and abs(sum(r for _, r in scales) - 1) > 1e-6:
        raise (where / "scales").error(f"ratios must sum to 1, got {[r for _, r in scales]}")
    return Tiling(
        magnification=_num(t.get("magnification", default_mag), where / "magnification", positive=True),
        patch_size=int(_num(t.get("patch_size", 256), where / "patch_size", positive=True, integer=True)),
        input_size=int(_num(t.get("input_size", 224), where / "input_size", positive=True, integer=True)),
        scales=tuple(scales),
    )


def _paper_split(d: dict[str, Any], where: _Where, demo: bool) -> dict[str, Any]:
    """A dataset whose split is `paper` gets its `synthetic` split in a demo (synthetic cohorts are not the
    authors' slides); `synthetic` is dropped otherwise. Checked here, so a bad source fails at load."""
    split = _table(d.get("split", {}), where / "split")
    if split.get("protocol") != "paper":
        if demo and "synthetic" in split:  # a [demo] table gave its own split over the paper one
            return {**d, "split": {k: v for k, v in split.items() if k not in ("synthetic", "source")}}
        if "synthetic" in split:
            raise (where / "split" / "synthetic").error("`synthetic` belongs to a split with protocol = \"paper\"")
        return d
    synthetic = dict(_table(split.get("synthetic", {}), where / "split" / "synthetic"))
    _keys(synthetic, [k for k in _SPLIT if k not in ("source", "allow_missing", "synthetic")],
          where / "split" / "synthetic")
    from bench.data.paper import PAPER_SPLITS

    source = split.get("source")
    if source not in PAPER_SPLITS:
        raise (where / "split" / "source").error(f"expected one of the shipped splits {', '.join(PAPER_SPLITS)}, "
                                                 f"got {source!r}")
    chosen = synthetic if demo else {k: v for k, v in split.items() if k != "synthetic"}
    return {**d, "split": chosen}


def _parse_dataset(d: Mapping[str, Any], where: _Where) -> DatasetSpec:
    _keys(d, _DATASET, where, required=("name", "task"))
    name = check_name("dataset name", _str(d["name"], where / "name"))
    task = _str(d["task"], where / "task", TASKS)
    classes = d.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, (str, int)) for c in classes):
            raise (where / "classes").error(f"expected a list of at least two class names, got {classes!r}")
        classes = tuple(str(c) for c in classes)
    split = _table(d.get("split", {}), where / "split")
    _keys(split, _SPLIT, where / "split")
    synthetic = _table(d.get("synthetic", {}), where / "synthetic")
    _keys(synthetic, _SYNTH, where / "synthetic")
    folds = d.get("folds")
    if folds is not None:
        if not isinstance(folds, list) or not folds:
            raise (where / "folds").error(f"expected a non-empty list of fold numbers, got {folds!r}")
        folds = tuple(int(_num(f, where / "folds", integer=True)) for f in folds)
    oversample = d.get("oversample")
    if oversample is not None:
        oversample = _num(oversample, where / "oversample", positive=True)
    mpp = d.get("mpp")
    if mpp is not None:
        mpp = _num(mpp, where / "mpp", positive=True)
    return DatasetSpec(
        name=name, task=task, classes=classes, data=_str(d.get("data", name), where / "data"),
        labels=_str(d.get("labels", "labels.csv"), where / "labels"), mpp=mpp,
        primary_metric=d.get("primary_metric"), oversample=oversample, folds=folds, split=_freeze(split),
        two_stage=_parse_tiling(d.get("two_stage", {}), where / "two_stage", 20.0),
        e2e=_parse_tiling(d.get("e2e", {}), where / "e2e", 10.0),
        synthetic=_freeze(synthetic), task_params=_freeze(_table(d.get("task_params", {}), where / "task_params")),
        expect=_parse_expect(d.get("expect", []), synthetic, where / "expect"),
    )


def _parse_expect(raw: Any, synthetic: Mapping[str, Any], where: _Where) -> tuple[Mapping[str, str], ...]:
    """`expect = [{ better = METHOD, than = METHOD, planted = KNOB }]`: a contrast the cohort's knob plants."""
    from bench.data.synthetic import KNOBS

    if not isinstance(raw, list):
        raise where.error(f"expected a list of {{ better, than, planted }} tables, got {raw!r}")
    out = []
    for i, e in enumerate(raw):
        w = where / i
        e = _table(e, w)
        _keys(e, ("better", "than", "planted"), w, required=("better", "than", "planted"))
        knob = _str(e["planted"], w / "planted", [k for k, *_ in KNOBS])
        if synthetic.get(knob) is None:
            raise (w / "planted").error(f"the dataset's synthetic cohort does not set {knob}; an expectation needs "
                                        f"the knob that plants it (synthetic = {{ ..., {knob} = ... }})")
        better, than = _str(e["better"], w / "better"), _str(e["than"], w / "than")
        if better == than:
            raise w.error(f"better and than name the same method {better!r}")
        out.append(_freeze({"better": better, "than": than, "planted": knob}))
    return tuple(out)


def _parse_search(raw: Any, where: _Where) -> dict[str, SearchParam]:
    out = {}
    for key, spec in _table(raw, where).items():
        w = where / key
        spec = _table(spec, w)
        _keys(spec, ("type", "low", "high", "log", "step", "choices"), w, required=("type",))
        kind = _str(spec["type"], w / "type", SEARCH_TYPES)
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise (w / "choices").error("a categorical parameter needs a non-empty `choices` list")
            out[key] = SearchParam(type=kind, choices=tuple(choices))
            continue
        if "low" not in spec or "high" not in spec:
            raise w.error(f"a {kind} parameter needs `low` and `high`")
        low, high = _num(spec["low"], w / "low"), _num(spec["high"], w / "high")
        if not low < high:
            raise w.error(f"low must be below high, got low={low}, high={high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise (w / "low").error(f"a log-scale range needs low > 0, got {low}")
        out[key] = SearchParam(type=kind, low=low, high=high, log=log, step=spec.get("step"))
    return out


def _parse_methods(m: Mapping[str, Any], where: _Where) -> list[MethodSpec]:
    _keys(m, _METHOD, where, required=("paradigm",))
    paradigm = _str(m["paradigm"], where / "paradigm", PARADIGMS)

    def listed(single: str, plural: str) -> list[str]:
        if (single in m) == (plural in m):
            raise where.error(f"give exactly one of `{single}` or `{plural}`")
        values = [m[single]] if single in m else m[plural]
        if not isinstance(values, list) or not values:
            raise (where / plural).error(f"expected a non-empty list, got {values!r}")
        return [_str(v, where / (single if single in m else plural)) for v in values]

    encoders, aggregators = listed("encoder", "encoders"), listed("aggregator", "aggregators")
    if "name" in m and len(encoders) * len(aggregators) > 1:
        raise (where / "name").error("a method grid (encoders x aggregators) cannot share one `name`")
    params = _table(m.get("params", {}), where / "params")
    _keys(params, trainer_keys(paradigm), where / "params")
    agg_params = _table(m.get("aggregator_params", {}), where / "aggregator_params")
    search = _parse_search(m.get("search", {}), where / "search")
    _keys({k: v for k, v in search.items() if not k.startswith("aggregator.")}, trainer_keys(paradigm),
          where / "search")
    out = []
    for enc, agg in itertools.product(encoders, aggregators):
        name = m.get("name") or f"{paradigm}/{enc}/{agg}"
        for part in name.split("/"):
            check_name("method name part", part)
        out.append(MethodSpec(
            name=name, paradigm=paradigm, encoder=enc, aggregator=agg, params=_freeze(dict(params)),
            aggregator_params=_freeze(dict(agg_params)), weights=m.get("weights"),
            random_init=bool(m.get("random_init", False)), search=MappingProxyType(search),
        ))
    return out
