"""The example's data generator: deterministic, physically sensible, shiftable on demand."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import EXAMPLE

sys.path.insert(0, str(EXAMPLE))
import vibration_data as vd

sys.path.remove(str(EXAMPLE))


def test_shapes_names_and_determinism() -> None:
    x, y = vd.generate(300, seed=5)
    assert x.shape == (300, 106) and x.dtype == np.float32 and y.shape == (300,)
    assert len(vd.feature_names()) == 106 == len(set(vd.feature_names()))
    assert np.isfinite(x).all()
    x2, y2 = vd.generate(300, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = vd.generate(300, seed=6)
    assert not np.array_equal(x, x3)


def _col(name: str) -> int:
    return vd.feature_names().index(name)


def test_fault_signatures_follow_the_physics() -> None:
    x, y = vd.generate(2000, seed=1)
    normal, bearing = x[y == 0], x[y == 3]
    # Outer-race impacts: impulsive (kurtosis up) and energy near the 600 Hz resonance.
    assert np.median(bearing[:, _col("x_kurtosis")]) > np.median(normal[:, _col("x_kurtosis")])
    band = _col("x_band18_576_608hz")
    assert np.median(bearing[:, band]) > np.median(normal[:, band]) + 0.2  # log10: 1.6x the energy
    # Misalignment shows mostly in the axial (z) direction.
    mis = x[y == 2]
    assert np.median(mis[:, _col("z_log_rms")]) > np.median(normal[:, _col("z_log_rms")])
    rpm = x[:, _col("shaft_rpm")]
    assert rpm.min() >= 1200 and rpm.max() <= 2400


def test_shift_moves_the_distribution() -> None:
    base, _ = vd.generate(1000, seed=2)
    loud, _ = vd.generate(1000, seed=2, shift=vd.Shift(sensor_gain=2.0))
    # Doubling the gain adds log10(2) to every axis' log RMS.
    assert np.median(loud[:, _col("y_log_rms")] - base[:, _col("y_log_rms")]) == pytest.approx(np.log10(2), abs=0.01)
    offset, _ = vd.generate(1000, seed=2, shift=vd.Shift(feature_offsets={5: 0.5}))
    assert np.allclose(offset[:, 5] - base[:, 5], 0.5, atol=1e-5)
    assert np.array_equal(np.delete(offset, 5, axis=1), np.delete(base, 5, axis=1))
    _, only_normal = vd.generate(500, seed=2, shift=vd.Shift(class_weights=(1, 0, 0, 0, 0)))
    assert set(only_normal.tolist()) == {0}
    slow, _ = vd.generate(500, seed=2, shift=vd.Shift(rpm_range=(600.0, 700.0)))
    assert slow[:, _col("shaft_rpm")].max() <= 700
