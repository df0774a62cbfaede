"""Planted-effect knobs of the synthetic generator move the truth they claim to, and are validated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.common.errors import ConfigError
from bench.data.synthetic import NORMAL, SyntheticSpec, make_cohort, plan_cohort

SMALL = {"n_slides": 8, "width": 1024, "height": 768}


@pytest.mark.parametrize("rate", [0.03, 0.3])
def test_the_witness_rate_is_the_measured_share_of_tissue_in_lesions(tmp_path, rate):
    out = make_cohort(SyntheticSpec(kind="subtyping", witness_rate=rate, **SMALL), tmp_path / "c")
    manifest = json.loads((out / "cohort.json").read_text())
    measured = [t["lesion_fraction_of_tissue"] for t in manifest["truth"].values()]  # from the lesion masks
    assert np.mean(measured) == pytest.approx(rate, rel=0.05)
    assert manifest["planted"]["witness_rate"]["value"] == rate and "mean pooling" in \
        manifest["planted"]["witness_rate"]["expected"]


def test_lesion_contrast_blends_lesion_nuclei_from_normal_to_full():
    zero, half, full = (plan_cohort(SyntheticSpec(kind="subtyping", lesion_contrast=c, **SMALL))[0]
                        for c in (0.0, 0.5, None))
    for a, b, c in zip(zero, half, full):
        assert a.lesion == NORMAL
        assert b.lesion.radius_um == pytest.approx((NORMAL.radius_um + c.lesion.radius_um) / 2)
        assert b.lesion.density == pytest.approx((NORMAL.density + c.lesion.density) / 2)


def test_label_noise_records_another_class_for_that_share_of_patients_and_keeps_the_lesions():
    spec = SyntheticSpec(kind="subtyping", n_slides=40, width=1024, height=768, label_noise=0.25)
    noisy, _ = plan_cohort(spec)
    clean, _ = plan_cohort(SyntheticSpec(kind="subtyping", n_slides=40, width=1024, height=768))
    patients = {p.patient_id for p in noisy}
    flipped = {p.patient_id for p in noisy if p.recorded_label is not None}
    assert len(flipped) == round(0.25 * len(patients))
    assert all(p.recorded_label != p.label for p in noisy if p.recorded_label is not None)
    assert [(p.label, p.lesion) for p in noisy] == [(p.label, p.lesion) for p in clean]  # morphology: true class


def test_hazard_strength_sets_how_much_risk_follows_the_lesion_score():
    def concordance(beta):
        plans, outcomes = plan_cohort(SyntheticSpec(kind="survival", n_slides=400, width=1024, height=768,
                                                    hazard_strength=beta))
        from sksurv.metrics import concordance_index_censored

        score = {p.patient_id: p.score for p in plans}
        pids = sorted(outcomes)
        time = np.array([outcomes[p][0] for p in pids])
        event = np.array([bool(outcomes[p][1]) for p in pids])
        return concordance_index_censored(event, time, np.array([score[p] for p in pids]))[0]

    assert concordance(0.0) == pytest.approx(0.5, abs=0.06)
    assert concordance(6.0) > concordance(2.5) > 0.6


@pytest.mark.parametrize("knob, value, text", [
    ("witness_rate", -0.1, "witness_rate = -0.1 is out of range: it must be in (0, 0.9]"),
    ("witness_rate", 0.0, "(0, 0.9]"),
    ("lesion_contrast", 1.5, "lesion_contrast = 1.5 is out of range: it must be in [0, 1]"),
    ("label_noise", 0.6, "label_noise = 0.6 is out of range: it must be in [0, 0.45]"),
])
def test_a_knob_out_of_range_names_the_knob_its_value_and_its_range(knob, value, text):
    with pytest.raises(ConfigError) as err:
        SyntheticSpec(kind="subtyping", **{knob: value})
    assert text in str(err.value)


def test_knobs_for_another_kind_are_refused():
    with pytest.raises(ConfigError, match="hazard_strength applies to survival only"):
        SyntheticSpec(kind="subtyping", hazard_strength=1.0)
    with pytest.raises(ConfigError, match="label_noise applies to subtyping and grading"):
        SyntheticSpec(kind="survival", label_noise=0.1)
