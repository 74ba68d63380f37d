# ruff: noqa: F811  (the fixtures made and keys are imported from test_agent_tasks)
"""Attacks on the N-d serving path and on drift references a second review found (each docstring says what it was; all fixed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops_agent.agent import Agent
from edgeops_agent.model import LoadedModel
from test_agent_tasks import _device, _make, keys, made  # noqa: F401  (fixtures)


def test_predict_racing_a_model_swap_to_another_nd_shape_does_not_raise_valueerror(
    made: dict[str, Any],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """predict() reads self.model (A, [1, 2, 4, 4]) and, after the inference, self.detector: when a
    model of another N-d shape (B, [1, 2, 5]) was activated in between, B's detector bins A's raw
    row: channel_counts reshaped 32 values to [-1, 2, 5] and raised a bare ValueError, uncounted,
    for a prediction that succeeded. Such rows are now discarded, as for a swap to a flat model."""
    a = made["classification"]
    agent = Agent(_device(tmp_path, a, keys[1]))
    other = _make(tmp_path, keys[0], "classification", sample=(2, 5))
    b = LoadedModel(other.manifest, other.model, digest="b", signer="s", expired=False)
    model = agent.model
    assert model is not None
    real = model.invoke

    def swapping(tensor: np.ndarray) -> np.ndarray:
        agent._activate(b)  # an install / rollback lands while A's inference runs
        return real(tensor)

    model.invoke = swapping  # type: ignore[method-assign]
    prediction = agent.predict(a.rows[0])  # ValueError: cannot reshape array of size 32 into shape (2,5)
    assert prediction.label in a.manifest.labels


@pytest.mark.parametrize("form", ["list", "float64", "batch-form list"])
def test_a_large_finite_value_in_a_list_is_served_like_the_same_float32_array(
    made: dict[str, Any],
    keys: tuple[Path, Path],
    tmp_path: Path,
    form: str,
) -> None:
    """prepare(): a list (every JSON request) or a float64 array goes through runner.check, which
    returns a [1, values] row; when the row's vdot passes the fast path's bound (here 1e20 in one
    value: (1e20 - 0.5) / 2 is finite), _prepare_large calls runner.check(x) again on that
    [1, 32] row and an N-d model refused it: "input must have shape [2, 4, 4] or [1, 2, 4, 4],
    got [1, 32]", while the same sample as a float32 ndarray was served. Both are served now."""
    a = made["classification"]
    agent = Agent(_device(tmp_path, a, keys[1]))
    big = a.rows[0].copy()
    big[0, 1, 1] = 1e20
    expected = agent.predict(big).logits  # float32 ndarray: served
    sent = {"list": big.tolist(), "float64": big.astype(np.float64), "batch-form list": [big.tolist()]}[form]
    assert agent.predict(sent).logits == expected


def test_output_drift_of_scores_drawn_from_the_reference_itself_raises_no_alarm() -> None:
    """feature_reference (also output_reference) binned the reference with the float64 quantile
    edges, but stored compact_float(edge) = float(str(float32(edge))), the shortest decimal, which
    is not the float32 value (0.15 vs float32(0.15) = 0.15000000596...). An edge on a tie (int8
    scores take a few levels, so nearly every decile is one) then bins the whole tie group one
    bin lower on the device than in the reference's fractions: the device sees drift in the very
    scores the reference was computed from (PSI ~0.76 here, the alarm level is 0.25). The fractions
    are now counted against the stored edges."""
    from edgeops_agent.drift import DriftConfig, DriftDetector
    from edgeops_core import DriftReference
    from edgeops_toolchain.data import feature_reference
    from edgeops_toolchain.tasks import output_reference

    rng = np.random.default_rng(0)
    for _ in range(2):  # the third draw of this generator is the one that shows it
        rng.gamma(1.0, 1.5, size=3000)
    q = np.clip(np.round(rng.gamma(4.0, 1.5, size=3000)), 0, 255) - 128  # int8 score codes
    scores = ((q.astype(np.float32) + np.float32(128)) * np.float32(0.05)).astype(np.float32)[:, None]
    outputs = output_reference(scores, ("anomaly_score",))
    features = feature_reference(np.zeros((10, 1), np.float32), ("x",))
    cfg = DriftConfig(window=3000, reservoir=0, input_ring=0, labelled_rows=0)
    detector = DriftDetector(DriftReference(3000, features, (), outputs), 1, cfg)
    detector.update_batch(np.zeros((3000, 1)), np.zeros(3000, dtype=np.int64), scores)
    assert detector.prediction_psi() < 0.01, detector.status()
