"""`bench train`: one method on one cohort (any paradigm), recorded like a suite run."""

from __future__ import annotations

import argparse

HELP = "train and evaluate one method on a cohort: --paradigm two-stage | e2e | gma"
DESCRIPTION = (
    "Train one method on one cohort folder (labels.csv + slides/) and write its run record, with every stage "
    "the method needs done first and cached: tiling, the split file, feature extraction (two-stage). The same "
    "code path as `bench run`, for a suite of one dataset and one method (suite name --suite-name, default "
    "'train'), so `bench runs` and `bench leaderboard --suite train` show the result. GMA runs 1 aggregator + "
    "N encoder processes through torchrun (--nproc N+1; gloo on CPU). --features DIR trains a two-stage method "
    "on features extracted before, by CLAM (h5_files/), TRIDENT (features_<encoder>/) or `bench extract`, as "
    "they are: no extraction, and nothing is ever written into DIR."
)

_DEFAULT_AGGREGATOR = {"two-stage": "abmil", "e2e": "abmilx", "gma": "gma"}
_DEFAULT_ENCODER = {"two-stage": "resnet50-trunc", "e2e": "resnet18-trunc", "gma": "resnet18-trunc"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", required=True, help="cohort folder (labels.csv + slides/)")
    p.add_argument("--workdir", default="workdir", help="work folder (default: workdir)")
    p.add_argument("--dataset", help="dataset name (default: the cohort's name)")
    p.add_argument("--paradigm", choices=("two-stage", "e2e", "gma"), default="two-stage",
                   help="two-stage (features + MIL), e2e (from pixels, MRIS) or gma (gather/scatter)")
    p.add_argument("--encoder", help="encoder (default: resnet50-trunc for two-stage, resnet18-trunc otherwise)")
    p.add_argument("--aggregator", help="aggregator (default: abmil, abmilx for e2e, gma for gma)")
    p.add_argument("--weights", help="encoder weights file or Hub snapshot folder")
    p.add_argument("--random-init", action="store_true", help="random encoder weights (recorded in the run)")
    p.add_argument("--features", metavar="DIR",
                   help="two-stage: train on the existing features in DIR (CLAM output root or h5_files/, TRIDENT "
                        "features_<encoder>/, or bench extract's folder), read-only; --encoder names the encoder "
                        "that made them (default resnet50-trunc, CLAM's)")
    g = p.add_argument_group("trainer parameters (defaults: the paradigm's, see README)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--optimizer", choices=("adamw", "adam", "sgd"))
    g.add_argument("--samples", type=int, help="e2e: patches sampled per slide (MRIS s)")
    g.add_argument("--tiles", type=int, help="gma: tiles per slide per step (K)")
    g.add_argument("--nproc", type=int, help="gma: processes (1 aggregator + N encoders), e.g. 3")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other trainer parameter (repeatable), e.g. --param patience=10")
    g.add_argument("--aggregator-param", action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator parameter (repeatable), e.g. --aggregator-param dropout=0.1")
    t = p.add_argument_group("tiling")
    t.add_argument("--magnification", type=float, help="main magnification (default: 20 two-stage, 10 e2e/gma)")
    t.add_argument("--patch-size", type=int, default=256, help="patch size in pixels (default: 256)")
    t.add_argument("--input-size", type=int, default=224, help="network input size (default: 224)")
    t.add_argument("--scales", nargs="+", metavar="MAG:RATIO",
                   help="e2e multi-scale sampling, e.g. 10:0.75 5:0.25 (default: one scale)")
    s = p.add_argument_group("split and evaluation")
    s.add_argument("--protocol", choices=("holdout", "kfold", "mccv"), default="holdout")
    s.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.3], help="holdout/mccv ratios (default: 0.7 0.3)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="validation share carved from train (default: 0.2)")
    s.add_argument("--folds", type=int, nargs="+", help="which folds to run (default: all)")
    s.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    s.add_argument("--oversample", type=float, help="classification: majority:minority ratio in training, e.g. 2")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test metrics (default: 1000)")
    p.add_argument("--suite-name", default="train", help="suite name the record is filed under (default: train)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--force", action="store_true", help="retrain even when an up-to-date record exists")


def _value(text: str):
    """A --param value as TOML would read it (numbers, booleans, strings)."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: list[str], flag: str) -> dict:
    from bench.common.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def build_suite_dict(args: argparse.Namespace, task: str, classes, dataset: str, data: str) -> dict:
    """The one-dataset, one-method suite that `bench train` runs (validated like any suite file)."""
    from bench.common.errors import ConfigError

    params = _pairs(args.param, "--param")
    for key in ("epochs", "lr", "weight_decay", "optimizer", "samples", "tiles", "nproc"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    scales = []
    for item in args.scales or []:
        mag, sep, ratio = item.partition(":")
        try:
            scales.append([float(mag), float(ratio)])
        except ValueError:
            raise ConfigError(f"--scales expects MAG:RATIO items such as 10:0.75, got {item!r}") from None
    main_mag = args.magnification or (20.0 if args.paradigm == "two-stage" else (scales[0][0] if scales else 10.0))
    tiling = {"magnification": main_mag, "patch_size": args.patch_size, "input_size": args.input_size}
    split = {"protocol": args.protocol}
    if args.protocol == "kfold":
        split["folds"] = max(args.folds) + 1 if args.folds else 5
    else:
        split["ratios"] = list(args.ratios)
        if len(args.ratios) == 2:
            split["val_fraction"] = args.val_fraction
    ds = {"name": dataset, "task": task, "data": data, "split": split, "two_stage": tiling,
          "e2e": {**tiling, **({"scales": scales} if scales else {})}}
    if classes and task == "classification":
        ds["classes"] = list(classes)
    if args.oversample is not None:
        ds["oversample"] = args.oversample
    if args.folds:
        ds["folds"] = list(args.folds)
    encoder = args.encoder or _DEFAULT_ENCODER[args.paradigm]
    aggregator = args.aggregator or _DEFAULT_AGGREGATOR[args.paradigm]
    method = {"paradigm": args.paradigm, "encoder": encoder, "aggregator": aggregator, "params": params,
              "aggregator_params": _pairs(args.aggregator_param, "--aggregator-param"),
              "random_init": bool(args.random_init)}
    if args.weights:
        method["weights"] = args.weights
    if getattr(args, "features", None):  # its own name: runs on given features never replace extracted ones
        from baselines.features import folder_tag

        method["name"] = f"two-stage/{encoder}+{folder_tag(args.features)}/{aggregator}"
    return {"name": args.suite_name, "description": f"bench train on {dataset}", "seeds": [args.seed],
            "bootstrap": args.bootstrap, "defaults": {args.paradigm: paradigm_defaults(args.paradigm, task)},
            "datasets": [ds], "methods": [method]}


def paradigm_defaults(paradigm: str, task: str) -> dict:
    """Appendix B.3 settings of the ABMILX paper (GMA: the GMA paper), per paradigm and task."""
    if paradigm == "two-stage":
        return {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "epochs": 200 if task == "grading" else 75}
    if paradigm == "e2e":
        return {"classification": {"optimizer": "adamw", "lr": 8e-5, "weight_decay": 0.0, "epochs": 75},
                "grading": {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200},
                "survival": {"optimizer": "adamw", "lr": 8e-5, "weight_decay": 5e-2, "epochs": 30}}[task]
    return {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.0}


def given_features(args: argparse.Namespace, cohort):
    """Check `--features DIR` before any stage runs: the flags that go with it, and the folder itself
    (every row of every file the cohort uses); slides without a file are left out, with a warning."""
    from baselines.encoders import get_encoder
    from baselines.features import external_features
    from bench.common.console import info, warn
    from bench.common.errors import ConfigError

    if args.paradigm != "two-stage":
        raise ConfigError(f"--features trains a two-stage method (MIL on features), not --paradigm {args.paradigm}")
    if args.random_init or args.weights:
        raise ConfigError("--features trains on features extracted before: --random-init and --weights do not "
                          "apply (no encoder runs)")
    given = external_features(args.features, cohort.slide_ids)
    encoder = args.encoder or _DEFAULT_ENCODER[args.paradigm]
    info(f"features: {len(given.slides)} slides in {given.folder} ({given.layout} layout, {given.embed_dim}-d), "
         "read-only: nothing is extracted or written there")
    if given.missing:
        warn(f"{len(given.missing)} of {len(cohort.slide_ids)} slides have no feature file in {given.folder} "
             f"(e.g. {given.missing[0]}.h5); they are left out")
    expected = get_encoder(encoder).embed_dim
    if expected != given.embed_dim:
        warn(f"the features in {given.folder} are {given.embed_dim}-dimensional but {encoder} gives {expected}; "
             f"the run records encoder {encoder}: pass --encoder with the one that made them (see `bench encoders`)")
    return given


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.data.cohort import load_cohort
    from bench.cli.commands.run import command_line
    from bench.orchestration.runner import RunOptions, outcome_table, run_suite, stage_table
    from bench.orchestration.suite import parse_suite

    cohort_dir = Path(args.cohort)
    cohort = load_cohort(cohort_dir)
    dataset = args.dataset or cohort.name
    given = given_features(args, cohort) if args.features else None
    raw = build_suite_dict(args, cohort.task, cohort.classes, dataset, cohort_dir.resolve().name)
    suite = parse_suite(raw, source="bench train")
    extra = {"features_dir": given.folder} if given is not None else {}  # read by the runner's extract_features
    options = RunOptions(workdir=Path(args.workdir), data_root=cohort_dir.resolve().parent, device=args.device,
                         leaderboards=None, force=args.force, command=command_line(), **extra)
    report = run_suite(suite, options)
    print(outcome_table(report))
    print()
    print(stage_table(report))
    for outcome in report.outcomes:
        print(f"record: {outcome.run_dir / 'run.json'}")
    return 1 if report.failed else 0
