"""Data checks on small synthetic datasets: each failure names split, row and feature."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgeops_toolchain.data import Dataset, check_data, feature_reference
from edgeops_toolchain.errors import DataError
from edgeops_toolchain.project import Checks

CHECKS = Checks(max_duplicate_fraction=0.0, min_class_fraction=0.05, max_abs_value=1e6)


def _dataset(seed: int = 0, rows: int = 200) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, size=n)

    (xa, ya), (xv, yv), (xt, yt) = split(rows), split(rows // 4), split(rows // 4)
    return Dataset(xa, ya, xv, yv, xt, yt, ("a", "b", "c", "d"), ("x", "y", "z"))


def test_clean_dataset_passes_and_is_profiled() -> None:
    ds = _dataset()
    report = check_data(ds, CHECKS, "standardize")
    assert report.rows == {"train": 200, "val": 50, "test": 50}
    assert sum(report.class_fractions) == pytest.approx(1.0)
    assert report.duplicate_fraction == 0.0
    assert report.preprocessing.mean == pytest.approx(ds.x_train.mean(axis=0), abs=1e-6)
    assert report.preprocessing.std == pytest.approx(ds.x_train.std(axis=0), abs=1e-6)
    assert [f.name for f in report.features] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_located(bad: float) -> None:
    ds = _dataset()
    ds.x_val[7, 2] = bad
    with pytest.raises(DataError, match=r"x_val has 1 NaN/inf value\(s\); first at row 7, feature 'c'"):
        check_data(ds, CHECKS, "standardize")


def test_out_of_range_value_is_located() -> None:
    ds = _dataset()
    ds.x_test[3, 1] = 5e7
    with pytest.raises(DataError, match=r"x_test\[3\] feature 'b' = 5e\+07 exceeds"):
        check_data(ds, CHECKS, "standardize")


def test_rare_class_is_reported() -> None:
    ds = _dataset()
    y = ds.y_train.copy()
    y[y == 2] = 0
    y[:3] = 2  # 1.5 % of train
    with pytest.raises(DataError, match=r"class 'z' is 1.5% of x_train, below the 5.0% minimum"):
        check_data(replace(ds, y_train=y), CHECKS, "standardize")


def test_train_test_leakage_is_reported() -> None:
    ds = _dataset()
    x_test = ds.x_test.copy()
    x_test[:5] = ds.x_train[10:15]
    with pytest.raises(DataError, match=r"5 of 50 test rows \(10.0%\) also appear in train"):
        check_data(replace(ds, x_test=x_test), CHECKS, "standardize")
    # a tolerance admits it
    check_data(replace(ds, x_test=x_test), replace(CHECKS, max_duplicate_fraction=0.2), "standardize")


def test_constant_feature_does_not_divide_by_zero() -> None:
    ds = _dataset()
    ds.x_train[:, 0] = 3.0
    report = check_data(ds, CHECKS, "standardize")
    assert report.constant_features == ("a",)
    assert report.preprocessing.std[0] == 1.0


def test_reference_bins_match_device_binning() -> None:
    """Fractions are what searchsorted(side='right') over the edges gives: the agent's rule."""
    x = np.random.default_rng(3).normal(size=(1000, 1)).astype(np.float32)
    (ref,) = feature_reference(x, ("f",))
    assert len(ref.bin_edges) == 9 and len(ref.bin_fractions) == 10
    counts = np.bincount(np.searchsorted(np.asarray(ref.bin_edges), x[:, 0].astype(np.float64), side="right"), minlength=10)
    assert np.allclose(counts / 1000, ref.bin_fractions, atol=2e-3)
    assert all(abs(f - 0.1) < 0.01 for f in ref.bin_fractions)  # deciles hold a tenth each
    assert ref.min <= ref.bin_edges[0] and ref.bin_edges[-1] <= ref.max
