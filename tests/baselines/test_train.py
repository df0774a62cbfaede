"""train_two_stage on tiny feature bags the tests write: learning, every aggregator, determinism,
validation-only selection, survival patient bags, oversampling, bad input, resume, attention, costs."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from baselines.mil import AGGREGATORS
from bench.common.errors import ConfigError, DataError, TrainingError

DIM = 16
SMALL = {"hidden_dim": 32}  # tiny models: the loop, not the model, is under test
# TransMIL's 256 Nystrom landmarks cost ~0.3 s per forward even on a 30-instance bag
SMALL_FOR = {"transmil": {**SMALL, "n_landmarks": 16}}
# pretrained slide encoders as aggregators: their tiny random-init instances
SMALL_FOR.update({n: {"config": "tiny"} for n in AGGREGATORS.names() if "encoder" in AGGREGATORS.get(n).defaults})


# one torch thread: small models on 2 cores run faster, and timings do not fight the other tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_bag(path: Path, features: np.ndarray, seconds: float | None = None) -> Path:
    """A feature file in our layout (features, coords; `seconds` attr when given)."""
    with h5py.File(path, "w") as f:
        f["features"] = features.astype(np.float32)
        f["coords"] = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], axis=1).astype(np.int64)
        if seconds is not None:
            f.attrs["seconds"] = seconds
    return path


class Data:
    """Feature files with a planted signal: a positive bag holds lesion instances shifted by `signal`."""

    def __init__(self, root: Path, seed: int = 0, dim: int = DIM, signal: float = 1.5, seconds: bool = False):
        self.root, self.rng, self.dim, self.signal, self.seconds = root, np.random.default_rng(seed), dim, signal, seconds
        self.files: dict[str, Path] = {}
        self.lesions: dict[str, np.ndarray] = {}
        root.mkdir(parents=True, exist_ok=True)

    def slide(self, slide_id: str, positive: bool, n: int | None = None) -> str:
        n = n or int(self.rng.integers(20, 40))
        x = self.rng.standard_normal((n, self.dim))
        lesion = np.zeros(n, dtype=np.int64)
        if positive:
            lesion[self.rng.choice(n, size=max(2, n // 5), replace=False)] = 1
            x[lesion == 1, :4] += self.signal
        self.files[slide_id] = write_bag(self.root / f"{slide_id}.h5", x, 1.5 if self.seconds else None)
        self.lesions[slide_id] = lesion
        return slide_id

    def instance_labels(self, slide_id: str, coords: np.ndarray) -> np.ndarray:
        assert coords.shape == (len(self.lesions[slide_id]), 2)
        return self.lesions[slide_id]


def classification_fold(data: Data, n: dict[str, list[int]], task=None):
    """FoldBags with `n[part]` = labels of its bags, one slide per bag."""
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import FoldBags

    task = task or make_task("classification", classes=("neg", "pos"))
    parts = {}
    for part, labels in n.items():
        rows = []
        for i, y in enumerate(labels):
            sid = data.slide(f"{part}{i}", positive=bool(y))
            rows.append({"bag_id": sid, "patient_id": f"p-{sid}", "slide_ids": (sid,), "label": int(y)})
        parts[part] = pd.DataFrame(rows, columns=["bag_id", "patient_id", "slide_ids", "label"])
    return FoldBags(task=task.fit(task.targets_from_frame(parts["train"])), parts=parts,
                    split_path=data.root / "split.csv", split_sha256="0" * 64, fold=0)


def labels(n_neg: int, n_pos: int) -> list[int]:
    return [0] * n_neg + [1] * n_pos


def config(aggregator: str = "abmil", **kw):
    from baselines.train import TwoStageConfig

    base = dict(aggregator_params=SMALL, epochs=2, lr=1e-3, device="cpu", precision="fp32")
    return TwoStageConfig(aggregator=aggregator, **{**base, **kw})


def train(bags, data: Data, out: Path, cfg=None, **kw):
    from baselines.train import train_two_stage

    return train_two_stage(bags, data.files, cfg or config(), out, **kw)


# ----------------------------------------------------------------------------- learning


def test_abmil_learns_a_planted_signal_and_its_attention_finds_the_lesions(tmp_path):
    data = Data(tmp_path / "f")
    bags = classification_fold(data, {"train": labels(12, 12), "val": labels(4, 4), "test": labels(8, 8)})
    result = train(bags, data, tmp_path / "run", config(epochs=8, lr=5e-4, aggregator_params={}),
                   instance_labels=data.instance_labels)
    test = result.predictions["test"]
    metrics = bags.task.metrics(*bags.task.targets_and_scores_from_frame(test))
    assert metrics["auc"] > 0.9
    assert result.attention["attention_auc"] > 0.8 and result.attention["n_bags_auc"] == 8  # positive test bags
    assert result.attention["max_n"] is not None and 0 <= result.attention["sparsity"] <= 100
    assert all(0 <= h["val_attention_sparsity"] <= 100 and h["val_attention_max_n_all"] >= 1 for h in result.history)
    assert result.extra["attention_split"] == "test"


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_trains_and_its_saved_weights_reproduce_the_test_predictions(name, tmp_path):
    from baselines.mil import build_aggregator
    from bench.evaluation.training import load_safetensors

    data = Data(tmp_path / "f", seed=1)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(2, 2), "test": labels(2, 2)})
    result = train(bags, data, tmp_path / "run", config(name, aggregator_params=SMALL_FOR.get(name, SMALL)))
    assert len(result.history) == 2 and [h["epoch"] for h in result.history] == [0, 1]
    assert all(math.isfinite(h["train_loss"]) and "val_auc" in h for h in result.history)
    test = result.predictions["test"]
    assert list(test.columns) == ["bag_id", "patient_id", "label", "prob_0", "prob_1"]
    assert list(test["bag_id"]) == list(bags.parts["test"]["bag_id"])
    assert list(result.predictions["val"]["bag_id"]) == list(bags.parts["val"]["bag_id"])
    np.testing.assert_allclose(test[["prob_0", "prob_1"]].sum(axis=1), 1.0, rtol=1e-12)
    # the weights file alone gives the same test predictions
    state, meta = load_safetensors(result.weights["aggregator"])
    assert int(meta["in_dim"]) == DIM and meta["aggregator"] == name
    model = build_aggregator(name, DIM, 2, **SMALL_FOR.get(name, SMALL))
    model.load_state_dict(state)
    model.eval()
    def positions(slide: str) -> dict[str, torch.Tensor]:  # TITAN, GigaPath: the grid the trainer passes
        if not model.uses_coords:
            return {}
        with h5py.File(data.files[slide], "r") as f:
            return {"coords": torch.from_numpy(f["coords"][()] / 256).float()[None]}  # no attrs: the 256 px grid step

    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(h5py.File(data.files[s], "r")["features"][()])[None],
                                  **positions(s)).logits
                            for s in bags.parts["test"]["bag_id"]])
    np.testing.assert_allclose(bags.task.scores(logits), test[["prob_0", "prob_1"]].to_numpy(), rtol=1e-5, atol=1e-7)
    assert set(result.attention) >= {"sparsity", "max_n_all"}
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_same_seed_same_numbers_another_seed_differs(tmp_path):
    data = Data(tmp_path / "f", seed=2)
    bags = classification_fold(data, {"train": labels(4, 4), "val": labels(2, 2), "test": labels(2, 2)})
    runs = [train(bags, data, tmp_path / f"run{i}", config("clam-sb", seed=seed, epochs=2))
            for i, seed in enumerate((0, 0, 1))]
    pd.testing.assert_frame_equal(runs[0].predictions["test"], runs[1].predictions["test"], check_exact=True)
    assert [h["train_loss"] for h in runs[0].history] == [h["train_loss"] for h in runs[1].history]
    assert not np.allclose(runs[0].predictions["test"]["prob_1"], runs[2].predictions["test"]["prob_1"])


def test_bags_read_from_disk_give_the_numbers_of_bags_in_memory(tmp_path):
    data = Data(tmp_path / "f", seed=14)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(2, 2), "test": labels(2, 2)})
    cached = train(bags, data, tmp_path / "a", config())
    too_big = train(bags, data, tmp_path / "b", config(max_cache_gb=1e-6))  # does not fit: read per step
    off = train(bags, data, tmp_path / "c", config(cache_bags=False))
    assert cached.extra["bags_in_memory"] and not too_big.extra["bags_in_memory"] and not off.extra["bags_in_memory"]
    for other in (too_big, off):
        pd.testing.assert_frame_equal(cached.predictions["test"], other.predictions["test"], check_exact=True)


# ----------------------------------------------------------------------------- selection, survival, oversampling


def test_validation_only_selection_never_reads_the_test_files(tmp_path):
    data = Data(tmp_path / "f", seed=3)
    bags = classification_fold(data, {"train": labels(4, 4), "val": labels(3, 3), "test": labels(2, 2)})
    for sid in bags.parts["test"]["bag_id"]:
        data.files[sid].unlink()
    logged = []
    result = train(bags, data, tmp_path / "run", config(epochs=4, lr=3e-3), predict_test=False,
                   epoch_callback=lambda epoch, row: logged.append((epoch, row)))
    assert set(result.predictions) == {"val"}
    aucs = [h["val_auc"] for h in result.history]
    last_best = len(aucs) - 1 - int(np.argmax(aucs[::-1]))  # ties keep the later epoch
    assert result.best_epoch == last_best and result.best_value == max(aucs)
    assert [e for e, _ in logged] == [0, 1, 2, 3] and all("val_auc" in row for _, row in logged)
    assert result.extra["attention_split"] == "val" and "best validation auc" in result.extra["selection"]


def test_early_stopping_on_the_validation_metric(tmp_path):
    data = Data(tmp_path / "f", seed=15)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(2, 2), "test": labels(2, 2)})
    # a learning rate too small to move the validation AUC: no epoch improves on epoch 0, so patience 2 stops
    # after epoch 2; the flat metric ties, and ties keep the later epoch
    result = train(bags, data, tmp_path / "run", config(epochs=10, lr=1e-12, patience=2))
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert len({h["val_auc"] for h in result.history}) == 1
    assert result.best_epoch == 2 and result.extra["stopped_early"] and result.extra["last_epoch"] == 2


def test_without_validation_bags_the_last_epoch_is_kept(tmp_path):
    data = Data(tmp_path / "f", seed=4)
    bags = classification_fold(data, {"train": labels(3, 3), "val": [], "test": labels(2, 2)})
    result = train(bags, data, tmp_path / "run", config(epochs=3))
    assert result.best_epoch == 2 and result.best_value is None
    assert result.extra["selection"].startswith("last epoch (no validation bags")


def test_survival_patient_bags_concatenate_their_slides(tmp_path):
    from baselines.train import BagFeatures
    from bench.evaluation.tasks import make_task
    from bench.evaluation.training import FoldBags

    data = Data(tmp_path / "f", seed=5)
    rng = np.random.default_rng(0)
    parts = {}
    for part, n in (("train", 12), ("val", 6), ("test", 6)):
        rows = []
        for i in range(n):
            event = int(i % 3 != 0)
            ids = tuple(data.slide(f"{part}{i}-{k}", positive=bool(event and i % 2)) for k in range(2))
            rows.append({"bag_id": f"{part}{i}", "patient_id": f"{part}{i}", "slide_ids": ids,
                         "time": float(rng.uniform(1, 60)), "event": event})
        parts[part] = pd.DataFrame(rows)
    task = make_task("survival")
    bags = FoldBags(task=task.fit(task.targets_from_frame(parts["train"])), parts=parts,
                    split_path=tmp_path / "s.csv", split_sha256="1" * 64, fold=0)
    ids = parts["test"]["slide_ids"][0]
    store = BagFeatures([ids], data.files, cache=True, max_cache_gb=1.0)
    x = store.get(ids, "cpu")  # (1, N1 + N2, D)
    expect = np.concatenate([h5py.File(data.files[s], "r")["features"][()] for s in ids])
    assert x.shape == (1, len(expect), DIM) and np.array_equal(x[0].numpy(), expect)

    result = train(bags, data, tmp_path / "run", config("abmil", epochs=2), instance_labels=data.instance_labels)
    test = result.predictions["test"]
    assert list(test.columns) == ["bag_id", "patient_id", "time", "event", "risk"] and len(test) == 6
    assert all(0.0 <= h["val_c_index"] <= 1.0 for h in result.history)
    sizes = [sum(len(data.lesions[s]) for s in ids) for ids in parts["train"]["slide_ids"]]
    assert result.extra["flops_bag_size"] == round(np.mean(sizes))  # reference bag: a mean patient bag
    assert result.attention["n_bags_auc"] > 0  # patient-level lesion labels matched the concatenated bag


def test_an_epoch_visits_the_training_bags_in_the_order_of_task_epoch_indices(tmp_path, monkeypatch):
    import baselines.train as mod
    from bench.evaluation.tasks import make_task

    data = Data(tmp_path / "f", seed=6)
    task = make_task("classification", classes=("neg", "pos"), oversample_ratio=2.0)
    bags = classification_fold(data, {"train": labels(9, 3), "val": labels(2, 2), "test": labels(2, 2)}, task=task)
    reads: list[str] = []
    real = mod.read_features
    monkeypatch.setattr(mod, "read_features", lambda path, *a, **k: (reads.append(Path(path).stem), real(path))[1])
    train(bags, data, tmp_path / "run", config(epochs=1, seed=7, cache_bags=False))  # uncached: one read per step
    train_ids = set(bags.parts["train"]["bag_id"])
    seen = [s for s in reads if s in train_ids]
    order = bags.task.epoch_indices(bags.targets("train"), 7 + 0)
    assert seen == [bags.parts["train"]["bag_id"][int(i)] for i in order]
    assert sum(s.startswith("train") and bags.parts["train"].set_index("bag_id").loc[s, "label"] == 1
               for s in seen) == 5  # 3 minority bags oversampled to ceil(9 / 2)


# ----------------------------------------------------------------------------- bad input, resume


@pytest.mark.parametrize("cache", [True, False])
def test_nan_features_are_refused_naming_the_slide(tmp_path, cache):
    data = Data(tmp_path / "f", seed=8)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(1, 1), "test": labels(1, 1)})
    x = h5py.File(data.files["train4"], "r")["features"][()]
    x[3, 5] = np.nan
    write_bag(data.files["train4"], x)
    with pytest.raises(DataError, match="slide 'train4'.*NaN"):
        train(bags, data, tmp_path / "run", config(cache_bags=cache))


def test_bad_bags_are_refused_with_the_slide_named(tmp_path):
    data = Data(tmp_path / "f", seed=9)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(1, 1), "test": labels(1, 1)})
    write_bag(data.files["train1"], np.ones((10, DIM + 3)))
    with pytest.raises(DataError, match=r"slide 'train1' has 19-dimensional features .* have 16"):
        train(bags, data, tmp_path / "run")
    write_bag(data.files["train1"], np.ones((0, DIM)))
    with pytest.raises(DataError, match="slide 'train1': empty bag"):
        train(bags, data, tmp_path / "run")
    del data.files["train1"]
    with pytest.raises(DataError, match="slide 'train1' has no feature file"):
        train(bags, data, tmp_path / "run")


def test_a_label_outside_the_classes_is_a_data_error(tmp_path):
    from bench.evaluation.training import FoldBags

    data = Data(tmp_path / "f", seed=10)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(1, 1), "test": labels(1, 1)})
    test = bags.parts["test"].copy()
    test.loc[0, "label"] = 5
    bad = FoldBags(task=bags.task, parts={**bags.parts, "test": test}, split_path=bags.split_path,
                   split_sha256=bags.split_sha256, fold=0)
    with pytest.raises(DataError, match="test bags.*label 5 is outside"):
        train(bad, data, tmp_path / "run")


def test_a_nan_loss_stops_the_run_with_its_epoch(tmp_path, monkeypatch):
    from bench.evaluation.tasks import ClassificationTask

    data = Data(tmp_path / "f", seed=11)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(1, 1), "test": labels(1, 1)})
    with pytest.raises(TrainingError, match="training loss became (nan|inf).*epoch 0") as err:
        train(bags, data, tmp_path / "a", config(lr=1e30))
    assert err.value.epoch == 0
    real, calls = ClassificationTask.loss, []

    def nan_from_epoch_1(self, logits, targets):  # 6 training steps per epoch
        calls.append(1)
        return real(self, logits, targets) * (math.nan if len(calls) > 6 else 1.0)

    monkeypatch.setattr(ClassificationTask, "loss", nan_from_epoch_1)
    with pytest.raises(TrainingError, match="epoch 1, step 0") as err:
        train(bags, data, tmp_path / "b", config(epochs=3))
    assert err.value.epoch == 1
    assert (tmp_path / "b" / "checkpoint" / "state.pt").exists()  # what epoch 0 wrote is kept


def test_resume_after_an_interruption_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    from bench.evaluation.training import load_safetensors

    data = Data(tmp_path / "f", seed=12)
    bags = classification_fold(data, {"train": labels(3, 3), "val": labels(2, 2), "test": labels(2, 2)})
    cfg = config("abmil", epochs=4, aggregator_params={**SMALL, "dropout": 0.5})  # dropout: RNG must resume too
    full = train(bags, data, tmp_path / "full", cfg)

    def stop_after_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(bags, data, tmp_path / "cut", cfg, epoch_callback=stop_after_1)
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").exists()
    with pytest.raises(ConfigError, match="another configuration"):
        train(bags, data, tmp_path / "cut", config("abmil", epochs=4, lr=2e-3, aggregator_params=cfg.aggregator_params))
    resumed = train(bags, data, tmp_path / "cut", cfg)
    assert resumed.extra["resumed_from_epoch"] == 2
    a, b = (load_safetensors(r.weights["aggregator"])[0] for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    assert resumed.best_epoch == full.best_epoch
    assert not (tmp_path / "cut" / "checkpoint").exists()


# ----------------------------------------------------------------------------- config, costs


def test_config_from_params_refuses_unknown_keys_and_bad_values():
    from baselines.train import PARAM_KEYS, TwoStageConfig

    cfg = TwoStageConfig.from_params("abmil", {"lr": 1e-4, "epochs": 200, "patience": 5}, seed=3, device="cpu")
    assert (cfg.lr, cfg.epochs, cfg.patience, cfg.seed) == (1e-4, 200, 5, 3)
    assert TwoStageConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown two-stage parameter 'learning_rate'.*allowed: optimizer, lr"):
        TwoStageConfig.from_params("abmil", {"learning_rate": 1e-4})
    assert "max_cache_gb" in PARAM_KEYS
    for bad in ({"lr": 0}, {"epochs": 0}, {"epochs": 2.5}, {"precision": "fp8"}, {"optimizer": "lamb"},
                {"patience": 0}, {"warmup_epochs": 5, "epochs": 5}, {"weight_decay": -1}, {"cache_bags": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TwoStageConfig.from_params("abmil", bad)
    with pytest.raises(ConfigError, match="unknown aggregator 'abmill'"):
        TwoStageConfig.from_params("abmill", {})
    with pytest.raises(ConfigError, match="unknown parameter 'heads' for aggregator 'abmilx'"):
        TwoStageConfig.from_params("abmilx", {}, aggregator_params={"heads": 2})


def test_costs_include_feature_extraction_when_the_files_record_it(tmp_path):
    data = Data(tmp_path / "f", seed=13, seconds=True)
    bags = classification_fold(data, {"train": labels(2, 2), "val": labels(1, 1), "test": labels(1, 1)})
    result = train(bags, data, tmp_path / "run", config(epochs=1))
    c = result.costs
    assert c["feature_seconds"] == pytest.approx(1.5 * 6)  # train + val slides
    assert c["feature_seconds_per_slide"] == pytest.approx(1.5)
    assert c["train_seconds"] > c["feature_seconds"] and c["infer_seconds_per_slide"] > 1.5
    assert c["params"] > 0 and c["flops"] > 0 and c["peak_memory_mb"] > 0 and c["device"]
    assert result.params["aggregator"] == "abmil" and result.params["aggregator_params"] == SMALL
    # CLAM/TRIDENT files record no seconds: left out, with a note
    for p in data.files.values():
        with h5py.File(p, "a") as f:
            del f.attrs["seconds"]
    result = train(bags, data, tmp_path / "run2", config(epochs=1))
    assert result.costs["feature_seconds"] == 0.0 and "record no extraction time" in result.extra["feature_extraction"]


def test_bag_grid_is_level0_coords_over_the_patch_side_and_slides_of_a_bag_lie_side_by_side(tmp_path):
    from baselines.train import BagFeatures

    def slide(name: str, coords: list[list[int]]) -> Path:
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f["features"] = np.ones((len(coords), 4), dtype=np.float32)
            f["coords"] = np.asarray(coords, dtype=np.int64)
            f.attrs["patch_size_level0"] = 512  # a 40x scan tiled at 20x: 256 px patches are 512 px at level 0
            f.attrs["target_magnification"] = 20.0
        return path

    files = {"a": slide("a", [[1024, 512], [1536, 512], [1024, 2048]]), "b": slide("b", [[5120, 0], [6144, 512]])}
    for cache in (True, False):
        store = BagFeatures([("a",), ("a", "b")], files, cache=cache, max_cache_gb=1.0)
        np.testing.assert_array_equal(store.grid(("a",), "cpu")[0].numpy(), [[2, 1], [3, 1], [2, 4]])
        # b's columns start 2 right of a's rightmost (3); its rows and its own spacing are kept
        np.testing.assert_array_equal(store.grid(("a", "b"), "cpu")[0].numpy(),
                                      [[2, 1], [3, 1], [2, 4], [5, 0], [7, 1]])
        assert store.grid(("a", "b"), "cpu").dtype == torch.float32
