"""Drift detection on the example's physical generator: false alarms and detection delay."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest

from conftest import EXAMPLE
from edgeops_agent.drift import RARITY_MAX, DriftConfig, DriftDetector
from edgeops_core import DriftReference, FeatureReference


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vibration_data_for_drift", EXAMPLE / "vibration_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> tuple[DriftReference, np.ndarray]:
    """The drift reference exactly as a build of the example computes it (6 000 training windows)."""
    from edgeops_toolchain.data import check_data, load_dataset
    from edgeops_toolchain.project import load_project

    project = load_project(EXAMPLE)
    ds = load_dataset(project)
    report = check_data(ds, project.checks, project.preprocessing)
    fractions = tuple(float(f) for f in np.bincount(ds.y_train, minlength=len(ds.label_names)) / ds.y_train.size)
    std = np.array([f.std for f in report.features])
    return DriftReference(sample_count=int(ds.x_train.shape[0]), features=report.features, prediction_fractions=fractions), std


def _feed(det: DriftDetector, x: np.ndarray, y: np.ndarray, batch: int = 500) -> list[tuple[int, bool]]:
    changes = []
    for s in range(0, len(x), batch):
        changes += det.update_batch(x[s : s + batch], y[s : s + batch])
    return changes


@pytest.mark.slow
def test_false_alarms_and_detection_delay_on_the_generator(reference: tuple[DriftReference, np.ndarray]) -> None:
    ref, std = reference
    gen = _generator()
    x, y = gen.generate(100_000, 1234)  # fresh windows, never seen by the reference
    det = DriftDetector(ref, 5)
    changes = _feed(det, x, y)  # predictions: the true classes, whose mix matches the reference
    raised = [s for s, up in changes if up]
    assert len(raised) <= 1, f"stationary alarms at inputs {raised}"
    assert det.status().max_cusum < det.config.cusum_h

    # A 0.5 sigma shift of any single feature, after 1 000 stationary inputs, raises the alarm within 300.
    warm_x, warm_y = x[:1000], y[:1000]
    delays = []
    for k in range(x.shape[1]):
        det = DriftDetector(ref, 5)
        _feed(det, warm_x, warm_y)
        shifted = x[1000:1300].copy()
        shifted[:, k] += 0.5 * std[k]
        hit = next((i + 1 for i in range(300) if det.update(shifted[i], int(y[1000 + i]))), None)
        assert hit is not None, f"feature {ref.features[k].name}: no alarm within 300 windows"
        assert ref.features[k].name in det.status().features_over
        delays.append(hit)
    print(f"detection delay over {len(delays)} features: median {np.median(delays):.0f}, max {max(delays)}")


def _toy_reference(n_features: int = 3) -> DriftReference:
    edges = tuple(float(q) for q in np.quantile(np.random.default_rng(0).normal(size=100_000), np.linspace(0.1, 0.9, 9)))
    feats = tuple(
        FeatureReference(name=f"f{i}", mean=0.0, std=1.0, min=-5.0, max=5.0, bin_edges=edges, bin_fractions=(0.1,) * 10)
        for i in range(n_features)
    )
    return DriftReference(sample_count=100_000, features=feats, prediction_fractions=(0.5, 0.5))


def test_alarm_hysteresis_psi_and_reservoir() -> None:
    rng = np.random.default_rng(1)
    det = DriftDetector(_toy_reference(), 2, DriftConfig(window=500, reservoir=50))
    x = rng.normal(size=(2000, 3))
    labels = rng.integers(0, 2, size=2000)
    assert _feed(det, x, labels) == [] and det.status().max_psi < 0.1
    shifted = rng.normal(size=(1000, 3))
    shifted[:, 1] += 1.0
    changes = _feed(det, shifted, labels[:1000], batch=37)
    assert [up for _, up in changes] == [True] and changes[0][0] < 2000 + 150  # raised once, not re-raised
    status = det.status()
    assert status.alarm and status.features_over == ["f1"] and status.max_feature == "f1" and status.max_psi > 0.25
    back = _feed(det, rng.normal(size=(3000, 3)), rng.integers(0, 2, size=3000))
    assert [up for _, up in back] == [False]  # cleared once the inputs are back to normal for a full window
    assert len(det.reservoir()) == 50 and all(len(r) == 3 for r in det.reservoir())


def test_prediction_drift_alarm() -> None:
    rng = np.random.default_rng(2)
    det = DriftDetector(_toy_reference(), 2, DriftConfig(window=200))
    x = rng.normal(size=(1000, 3))
    changes = _feed(det, x, np.zeros(1000, dtype=np.int64))  # every prediction is class 0: the mix moved
    assert [up for _, up in changes] == [True] and det.status().prediction_psi > 0.25


def test_rarity_is_one_inside_the_reference_and_grows_outside_it_up_to_the_cap() -> None:
    det = DriftDetector(_toy_reference(), 2)
    inside = np.random.default_rng(3).normal(size=(200, 3)).clip(-4.9, 4.9)
    assert np.allclose(det.rarity(inside), 1.0)  # equal-fraction bins: every in-range value scores 1
    # Just outside [min, max] = [-5, 5], 5.01 standard deviations out: the normal tail's -ln P(|Z| >= z).
    edge = det.rarity(np.array([[5.01, 0.0, 0.0]]))[0]
    tail = 5.01**2 / 2 + math.log(5.01) + math.log(math.pi / 2) / 2
    assert edge == pytest.approx((tail / math.log(10) + 2) / 3, rel=1e-6)
    # Past a maximum 2 standard deviations out, no reference sample was there: at most 1/(n+1) of the mass.
    ref = _toy_reference()
    narrow = dataclasses.replace(ref, features=tuple(dataclasses.replace(f, max=2.0) for f in ref.features))
    near = DriftDetector(narrow, 2).rarity(np.array([[2.01, 0.0, 0.0]]))[0]
    assert near == pytest.approx((math.log(100_001) / math.log(10) + 2) / 3, rel=1e-6)
    farther = det.rarity(np.array([[x, x, x] for x in (6.0, 8.0, 12.0, 1e300, -1e300)]))
    assert list(farther[:3]) == sorted(farther[:3]) and farther[0] > edge
    assert farther[3] == farther[4] == RARITY_MAX  # capped, and a huge value warns of no overflow
    assert det.rarity(np.zeros((0, 3))).shape == (0,)
