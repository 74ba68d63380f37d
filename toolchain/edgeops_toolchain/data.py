"""The dataset and its checks: the first step of every build.

:func:`load_dataset` calls the project's data entry point and checks the structure (splits
present, 2-D float features of the declared width, 1-D integer labels in range).
:func:`check_data` then checks the values (NaN/inf, magnitude, class balance, rows shared
between train and test) and profiles every feature; that profile becomes the manifest's
drift reference and the preprocessing statistics. A failed check raises :class:`DataError`
naming the split, the feature and the row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgeops_core import FeatureReference, Preprocessing
from edgeops_toolchain.errors import DataError
from edgeops_toolchain.project import Checks, Project, load_entry

__all__ = ["DataReport", "Dataset", "check_data", "compact_float", "feature_reference", "load_dataset"]

SPLITS = ("train", "val", "test")
#: Interior quantile edges of the drift reference: deciles.
REFERENCE_QUANTILES = tuple(np.linspace(0.1, 0.9, 9))


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test features (float32) and labels (int64) with their names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    label_names: tuple[str, ...]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of split ``train``, ``val`` or ``test``."""
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def digest(self) -> str:
        """sha256 over names, shapes and bytes of every array: the dataset's identity."""
        h = hashlib.sha256()
        h.update("\0".join(self.feature_names).encode() + b"\1" + "\0".join(self.label_names).encode())
        for split in SPLITS:
            for arr in self.split(split):
                h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class DataReport:
    """What the data checks found and measured."""

    rows: Mapping[str, int]
    class_fractions: tuple[float, ...]
    duplicate_fraction: float
    constant_features: tuple[str, ...]
    preprocessing: Preprocessing
    features: tuple[FeatureReference, ...]


def _names(raw: Mapping[str, object], key: str) -> tuple[str, ...]:
    value = raw.get(key)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"dataset: '{key}' must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise DataError(f"dataset: '{key}' has duplicate names")
    return tuple(value)


def load_dataset(project: Project) -> Dataset:
    """Call the project's data entry point and check the dataset's structure.

    Raises:
        ProjectError: the entry point cannot be imported or raises.
        DataError: a split is missing or has the wrong shape or dtype.
    """
    func = load_entry(project, project.data_entry)
    try:
        raw = func(**project.data_params)
    except Exception as exc:  # the project's code may raise anything
        raise DataError(f"dataset entry {project.data_entry!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise DataError(f"dataset entry {project.data_entry!r} must return a mapping, got {type(raw).__name__}")
    features, labels = _names(raw, "feature_names"), _names(raw, "label_names")
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        x_raw, y_raw = raw.get(f"x_{split}"), raw.get(f"y_{split}")
        if x_raw is None or y_raw is None:
            raise DataError(f"dataset: split '{split}' is missing (need x_{split} and y_{split})")
        x, y = np.asarray(x_raw), np.asarray(y_raw)
        if x.ndim != 2 or x.shape[1] != len(features):
            raise DataError(
                f"dataset: x_{split} must have shape [rows, {len(features)}] (one column per feature name), got {list(x.shape)}"
            )
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"dataset: x_{split} must be numeric, got dtype {x.dtype}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"dataset: y_{split} must have shape [{x.shape[0]}] (one label per row), got {list(y.shape)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"dataset: y_{split} must hold integer class indices, got dtype {y.dtype}")
        if x.shape[0] == 0:
            raise DataError(f"dataset: split '{split}' is empty")
        bad = (y < 0) | (y >= len(labels))
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"dataset: y_{split}[{row}] = {int(y[row])} is not a class index in 0..{len(labels) - 1}")
        arrays[f"x_{split}"] = x.astype(np.float32)
        arrays[f"y_{split}"] = y.astype(np.int64)
    return Dataset(feature_names=features, label_names=labels, **arrays)


def feature_reference(x: np.ndarray, names: tuple[str, ...]) -> tuple[FeatureReference, ...]:
    """Per-feature statistics and decile bins of ``x``, the drift baseline."""
    x64 = x.astype(np.float64)
    edges = np.quantile(x64, REFERENCE_QUANTILES, axis=0)  # (9, features)
    refs = []
    for j, name in enumerate(names):
        col, e = x64[:, j], edges[:, j]
        # Bin i holds e[i-1] <= v < e[i]; the agent must bin the same way (searchsorted right).
        counts = np.bincount(np.searchsorted(e, col, side="right"), minlength=len(e) + 1)
        fractions = counts / counts.sum()
        refs.append(
            FeatureReference(
                name=name,
                mean=compact_float(col.mean()),
                std=compact_float(col.std()),
                min=compact_float(col.min()),
                max=compact_float(col.max()),
                bin_edges=tuple(compact_float(v) for v in e),
                bin_fractions=tuple(round(float(v), 6) for v in fractions),
            )
        )
    return tuple(refs)


def compact_float(value: float | np.floating) -> float:
    """``value`` at float32 precision, written with the fewest digits that round-trip.

    Features and model outputs are float32 on the device; storing doubles' 17 digits in
    the manifest only makes it larger (it roughly halves the manifest).
    """
    return float(str(np.float32(value)))


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


def check_data(ds: Dataset, checks: Checks, preprocessing: str) -> DataReport:
    """Check the values of every split and profile the training features.

    Raises:
        DataError: NaN/inf, a value beyond ``checks.max_abs_value``, a class under
            ``checks.min_class_fraction`` of train, or more than
            ``checks.max_duplicate_fraction`` of test rows also in train.
    """
    for split in SPLITS:
        x, _ = ds.split(split)
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise DataError(
                f"dataset: x_{split} has {int(bad.sum())} NaN/inf value(s); first at row {row}, feature {ds.feature_names[col]!r}"
            )
        big = np.abs(x) > checks.max_abs_value
        if big.any():
            row, col = (int(v) for v in np.argwhere(big)[0])
            raise DataError(
                f"dataset: x_{split}[{row}] feature {ds.feature_names[col]!r} = {float(x[row, col]):.6g} exceeds "
                f"|value| <= {checks.max_abs_value:g} (checks.max_abs_value)"
            )
    counts = np.bincount(ds.y_train, minlength=len(ds.label_names))
    fractions = counts / counts.sum()
    for name, frac in zip(ds.label_names, fractions, strict=True):
        if frac < checks.min_class_fraction or frac == 0:
            raise DataError(
                f"dataset: class {name!r} is {frac:.1%} of x_train, below the {checks.min_class_fraction:.1%} "
                "minimum (checks.min_class_fraction)"
            )
    train_rows = _row_keys(ds.x_train)
    shared = sum(1 for row in np.ascontiguousarray(ds.x_test) if row.tobytes() in train_rows)
    dup = shared / ds.x_test.shape[0]
    if dup > checks.max_duplicate_fraction:
        raise DataError(
            f"dataset: {shared} of {ds.x_test.shape[0]} test rows ({dup:.1%}) also appear in train, over the "
            f"{checks.max_duplicate_fraction:.1%} limit (checks.max_duplicate_fraction): held-out accuracy would be inflated"
        )
    mean = ds.x_train.astype(np.float64).mean(axis=0)
    std = ds.x_train.astype(np.float64).std(axis=0)
    constant = tuple(n for n, s in zip(ds.feature_names, std, strict=True) if s < 1e-12)
    if preprocessing == "standardize":
        # A constant feature carries no information; dividing by 1 keeps it finite.
        pre = Preprocessing(
            "standardize", tuple(compact_float(m) for m in mean), tuple(compact_float(s) if s >= 1e-12 else 1.0 for s in std)
        )
    else:
        pre = Preprocessing("none")
    return DataReport(
        rows={split: int(ds.split(split)[0].shape[0]) for split in SPLITS},
        class_fractions=tuple(float(f) for f in fractions),
        duplicate_fraction=dup,
        constant_features=constant,
        preprocessing=pre,
        features=feature_reference(ds.x_train, ds.feature_names),
    )
