"""The dataset and its checks: the first step of every build.

:func:`load_dataset` calls the project's data entry point and checks the structure (splits
present, float samples ``[rows, *sample_shape]`` of one sample shape with one channel per
feature name, 1-D integer labels in range), then adds the project's field datasets
(:func:`with_field_data`): their labelled train-split rows join ``x_train``, their held-out
labelled rows are kept for metrics only. :func:`check_data` then checks the values (NaN/inf,
magnitude, class balance, rows shared between train and test) and profiles every channel;
that profile becomes the manifest's drift reference and the preprocessing statistics. A
failed check raises :class:`DataError` naming the split (or the field dataset), the feature
(channel) and the row (and, for an N-d sample, the position in it).

A sample is a flat feature vector ``[n_features]`` (each feature is a channel of one value)
or an N-d tensor of rank 2 to :data:`~edgeops_core.manifest.MAX_SAMPLE_RANK` whose first axis is the
channel axis (``[1, 8, 8]``: one channel of 8x8 values). A channel's statistics pool all its
values over every position of the sample (ADR 0021), so the device can bin a live sample's
values the same way. Field datasets hold flat feature vectors only: an N-d project refuses
them.

The drift reference describes the training split, except when the build has at least
:data:`MIN_FIELD_REFERENCE_ROWS` labelled field rows and the project keeps the default
``[data] field_reference = "field"``: then it describes those rows (ADR 0016).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeops_core import UNLABELLED, FeatureReference, FieldDataset, Preprocessing, load_field_dataset
from edgeops_core.manifest import MAX_SAMPLE_RANK
from edgeops_toolchain.errors import DataError
from edgeops_toolchain.project import Checks, Project, load_entry

__all__ = [
    "FIELD_SPLITS",
    "MIN_FIELD_REFERENCE_ROWS",
    "NPZ_ARRAYS",
    "DataReport",
    "Dataset",
    "FieldRows",
    "channel_values",
    "check_data",
    "check_field_names",
    "check_threshold_rows",
    "compact_float",
    "data_source",
    "feature_reference",
    "field_rows",
    "load_dataset",
    "load_field_data",
    "load_npz",
    "reference_rows",
    "with_field_data",
]

SPLITS = ("train", "val", "test")
#: Interior quantile edges of the drift reference: deciles.
REFERENCE_QUANTILES = tuple(np.linspace(0.1, 0.9, 9))
#: Labelled field rows needed before the drift reference is taken from them: fewer make
#: decile edges too noisy to tell drift from sampling error.
MIN_FIELD_REFERENCE_ROWS = 100
#: Which labelled field rows :func:`field_rows` selects.
FIELD_SPLITS = ("train", "holdout", "all")


@dataclass(frozen=True)
class FieldRows:
    """What a build took from its field datasets.

    Attributes:
        digests: the datasets' digests, sorted.
        train_rows: labelled train-split rows added to ``x_train`` (after deduplication).
        holdout_x / holdout_y: the held-out labelled rows: measured on, never trained on.
        labelled_x / labelled_y: every labelled row (train and held out), deduplicated.
    """

    digests: tuple[str, ...]
    train_rows: int
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    labelled_x: np.ndarray
    labelled_y: np.ndarray


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
    field: FieldRows | None = None

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of split ``train``, ``val`` or ``test``."""
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(n_features,)`` for a flat vector, ``(C, ...)`` for an N-d one."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def sample_ndim(self) -> int:
        """The rank of a sample (1 for a flat feature vector): ``apply_preprocessing``'s ``sample_ndim``."""
        return self.x_train.ndim - 1

    def digest(self) -> str:
        """sha256 over names, shapes and bytes of every array: the dataset's identity.

        With field data, ``x_train`` holds the merged rows and the field datasets' digests
        are hashed too (they determine the held-out rows).
        """
        h = hashlib.sha256()
        h.update("\0".join(self.feature_names).encode() + b"\1" + "\0".join(self.label_names).encode())
        for split in SPLITS:
            for arr in self.split(split):
                h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        if self.field is not None:
            h.update(b"\2" + "\0".join(self.field.digests).encode())
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
    #: What ``features`` describe: ``training`` (the training split) or ``field`` (the labelled field rows).
    reference_source: str = "training"


def _names(raw: Mapping[str, object], key: str, where: str = "dataset") -> tuple[str, ...]:
    value = raw.get(key)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{where}: '{key}' must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise DataError(f"{where}: '{key}' has duplicate names")
    return tuple(value)


#: The arrays of a ``[data] npz`` file: the dataset entry point's mapping, as arrays.
NPZ_ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "feature_names", "label_names")


def load_npz(path: Path) -> dict[str, object]:
    """The dataset mapping stored in a ``[data] npz`` file (:data:`NPZ_ARRAYS`, nothing else).

    Read with ``allow_pickle=False``: an object array (a pickle) is refused, never executed.
    ``feature_names`` and ``label_names`` are 1-D string arrays; the other arrays are checked
    by :func:`load_dataset` like an entry point's.

    Raises:
        DataError: the file is not a readable ``.npz``, or an array is missing, extra, pickled
            or (for the names) not 1-D strings; the message names the array.
    """
    where = f"data.npz {path.name}"
    arrays: dict[str, object] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            extra = sorted(set(npz.files) - set(NPZ_ARRAYS))
            if extra:
                raise DataError(f"{where}: unexpected array {extra[0]!r} (expected exactly {', '.join(NPZ_ARRAYS)})")
            for name in NPZ_ARRAYS:
                if name not in npz.files:
                    raise DataError(f"{where}: array {name!r} is missing (expected {', '.join(NPZ_ARRAYS)})")
                try:
                    arrays[name] = npz[name]
                except ValueError as exc:  # allow_pickle=False refuses object arrays here
                    raise DataError(f"{where}: array {name!r} cannot be read without pickle: {exc}") from exc
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: not a readable .npz file: {exc}") from exc
    for name in ("feature_names", "label_names"):
        value = arrays[name]
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "U":
            shape = list(value.shape) if isinstance(value, np.ndarray) else "?"
            dtype = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise DataError(f"{where}: array {name!r} must be 1-D strings, got dtype {dtype} shape {shape}")
        arrays[name] = [str(v) for v in value]
    return arrays


def load_dataset(project: Project, *, field_data: Sequence[tuple[Path, FieldDataset]] | None = None) -> Dataset:
    """Call the project's data entry point, check the dataset's structure and add the field data.

    Args:
        project: the project.
        field_data: the project's field datasets, already loaded (:func:`load_field_data`);
            ``None`` loads ``project.field_data``.

    Raises:
        ProjectError: the entry point cannot be imported or raises.
        DataError: a split is missing or has the wrong shape or dtype; a field dataset does
            not match the project or fails a check.
        FieldDataError: a field dataset file cannot be read or is refused.
    """
    if project.data_npz is not None:
        raw: Mapping[str, object] = load_npz(project.data_npz)
    else:
        entry = str(project.data_entry)
        func = load_entry(project, entry)
        try:
            returned = func(**project.data_params)
        except Exception as exc:  # the project's code may raise anything
            raise DataError(f"dataset entry {entry!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(returned, Mapping):
            raise DataError(f"dataset entry {entry!r} must return a mapping, got {type(returned).__name__}")
        raw = returned
    where = data_source(project)
    features, labels = _names(raw, "feature_names", where), _names(raw, "label_names", where)
    arrays: dict[str, np.ndarray] = {}
    sample: tuple[int, ...] | None = None  # x_train's sample shape, which the other splits must share
    for split in SPLITS:
        x_raw, y_raw = raw.get(f"x_{split}"), raw.get(f"y_{split}")
        if x_raw is None or y_raw is None:
            raise DataError(f"{where}: split '{split}' is missing (need x_{split} and y_{split})")
        x, y = np.asarray(x_raw), np.asarray(y_raw)
        sample = _check_sample_shape(x, f"{where}: x_{split}", len(features), sample)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{where}: x_{split} must be numeric, got dtype {x.dtype}")
        if project.task.kind == "regression":  # task-aware targets: see _regression_targets
            arrays[f"y_{split}"] = _regression_targets(y, f"{where}: y_{split}", x.shape[0], labels)
        else:
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DataError(f"{where}: y_{split} must have shape [{x.shape[0]}] (one label per row), got {list(y.shape)}")
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{where}: y_{split} must hold integer class indices, got dtype {y.dtype}")
        if x.shape[0] == 0:
            raise DataError(f"{where}: split '{split}' is empty")
        if project.task.kind != "regression":
            bad = (y < 0) | (y >= len(labels))
            if bad.any():
                row = int(np.argmax(bad))
                raise DataError(f"{where}: y_{split}[{row}] = {int(y[row])} is not a class index in 0..{len(labels) - 1}")
            arrays[f"y_{split}"] = y.astype(np.int64)
        arrays[f"x_{split}"] = x.astype(np.float32)
    if project.task.kind == "anomaly":
        _check_normal_rows(arrays, labels, project.task.normal_label, project.task.target_fpr, where)
    ds = Dataset(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_val=arrays["x_val"],
        y_val=arrays["y_val"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        feature_names=features,
        label_names=labels,
    )
    fields = load_field_data(project.field_data) if field_data is None else field_data
    if fields and ds.sample_ndim > 1:
        raise DataError(
            f"field data ({fields[0][0]}) holds flat feature vectors, but this project's samples have shape "
            f"{list(ds.sample_shape)}: field data is supported for flat [rows, n_features] data only; "
            "remove [data] field_data"
        )
    return with_field_data(ds, fields, project.checks) if fields else ds


def _check_sample_shape(x: np.ndarray, where: str, channels: int, expected: tuple[int, ...] | None) -> tuple[int, ...]:
    """``x``'s sample shape, or :class:`DataError` naming ``where`` and the shape expected.

    ``x`` must be ``[rows, *sample_shape]`` with ``sample_shape[0] == channels`` (one feature
    name per channel), a sample rank of 1 to :data:`MAX_SAMPLE_RANK` and no empty axis, and,
    when ``expected`` is given (x_train's), exactly that sample shape.
    """
    got = list(x.shape)
    if expected is not None:
        if tuple(x.shape[1:]) != expected or x.ndim < 2:
            want = ", ".join(["rows", *(str(d) for d in expected)])
            raise DataError(f"{where} must have shape [{want}] (x_train's sample shape), got {got}")
        return expected
    if not 2 <= x.ndim <= MAX_SAMPLE_RANK + 1 or x.shape[1] != channels or 0 in x.shape[1:]:
        raise DataError(
            f"{where} must have shape [rows, {channels}] (one column per feature name) or [rows, {channels}, ...] "
            f"(an N-d sample of at most {MAX_SAMPLE_RANK} axes whose first axis holds one channel per feature name), "
            f"got {got}"
        )
    return tuple(int(d) for d in x.shape[1:])


# -- task-aware label checks (regression targets, anomaly normal rows) --------------------------


def _regression_targets(y: np.ndarray, where: str, rows: int, names: tuple[str, ...]) -> np.ndarray:
    """A regression split's targets as float32 ``[rows, n_outputs]`` (``label_names`` name the outputs).

    Raises:
        DataError: not numeric, not ``[rows]`` (one output) or ``[rows, n_outputs]``, or not finite.
    """
    k = len(names)
    shapes = f"[{rows}, {k}] (one value per output name in label_names)" + (f" or [{rows}]" if k == 1 else "")
    if not (y.ndim == 2 and y.shape == (rows, k)) and not (y.ndim == 1 and k == 1 and y.shape[0] == rows):
        raise DataError(f"{where} must have shape {shapes} for task.kind = 'regression', got {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where} must hold numbers (regression targets), got dtype {y.dtype}")
    out = y.astype(np.float32).reshape(rows, k)
    bad = ~np.isfinite(out)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"{where} has {int(bad.sum())} NaN/inf target(s); first at row {row}, output {names[col]!r}")
    return out


def _check_normal_rows(arrays: Mapping[str, np.ndarray], labels: tuple[str, ...], normal: str, fpr: float, where: str) -> None:
    """An anomaly project trains on the normal rows of x_train and fits its threshold on those of x_val.

    Raises:
        DataError: ``normal`` is not a label, a split has no normal row (test: or no fault row
            either, so neither rate could be measured), or x_val has too few normal rows to fit
            the threshold at ``fpr`` (at least ``ceil(1 / fpr)``).
    """
    if normal not in labels:
        raise DataError(
            f"{where}: task.normal_label {normal!r} is not one of label_names ({', '.join(labels)}): an anomaly project "
            "needs its normal rows labelled"
        )
    index = labels.index(normal)
    for split, use in (("train", "train the model on"), ("val", "fit the threshold on"), ("test", "measure the FPR on")):
        if not (arrays[f"y_{split}"] == index).any():
            raise DataError(
                f"{where}: y_{split} has no row labelled {normal!r} (task.normal_label): an anomaly project needs "
                f"normal-only rows in x_{split} to {use}"
            )
    if (arrays["y_test"] == index).all():
        raise DataError(f"{where}: y_test has only {normal!r} (task.normal_label) rows: no fault row to measure detection on")
    check_threshold_rows(arrays["y_val"], labels, normal, fpr, where)


def data_source(project: Project) -> str:
    """How errors about the project's dataset name it: ``data.npz <file>`` or ``dataset``."""
    return f"data.npz {project.data_npz.name}" if project.data_npz is not None else "dataset"


def check_threshold_rows(y_val: np.ndarray, labels: tuple[str, ...], normal: str, fpr: float, where: str) -> None:
    """x_val must hold at least ``ceil(1 / fpr)`` normal rows to fit the threshold at ``fpr``.

    Checked when the data is loaded, and again before the threshold is fitted: a new
    ``target_fpr`` reuses the cached data step.

    Raises:
        DataError: too few normal rows in x_val.
    """
    need = math.ceil(1.0 / fpr - 1e-9)
    have = int((y_val == labels.index(normal)).sum())
    if have < need:
        raise DataError(
            f"{where}: x_val has {have} rows labelled {normal!r} (task.normal_label), too few to fit the anomaly "
            f"threshold at task.target_fpr = {fpr:g}: it needs at least ceil(1 / target_fpr) = {need}"
        )


def load_field_data(paths: Sequence[Path]) -> tuple[tuple[Path, FieldDataset], ...]:
    """Load field dataset files; the same content under two paths counts once.

    Returns:
        ``(path, dataset)`` pairs ordered by digest, so the merged rows do not depend on the
        order the files were named in.

    Raises:
        FieldDataError: a file cannot be read or is refused (the message names it).
    """
    loaded: dict[str, tuple[Path, FieldDataset]] = {}
    for path in paths:
        dataset = load_field_dataset(path)
        loaded.setdefault(dataset.digest, (path, dataset))
    return tuple(loaded[digest] for digest in sorted(loaded))


def check_field_names(
    path: Path, dataset: FieldDataset, feature_names: Sequence[str], label_names: Sequence[str], *, against: str
) -> None:
    """Check that ``dataset`` has exactly these feature and label names, in this order.

    Raises:
        DataError: naming ``path``, the field and the first difference; ``against`` says
            whose names they were compared with (``"the project's dataset"``).
    """
    for name, got, want in (
        ("feature_names", dataset.feature_names, tuple(feature_names)),
        ("label_names", dataset.label_names, tuple(label_names)),
    ):
        if got == want:
            continue
        if len(got) != len(want):
            detail = f"{len(got)} names, expected {len(want)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            detail = f"{name}[{i}] is {got[i]!r}, expected {want[i]!r}"
        raise DataError(f"field dataset {path}: {name} differ from those of {against}: {detail}")


def field_rows(datasets: Sequence[FieldDataset], which: str) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of split ``which`` (``train``, ``holdout`` or ``all``) of ``datasets``.

    Rows are concatenated in the given order; a row (features and label) that occurs more
    than once, within one dataset or across overlapping ones, is kept once, where it first
    occurs. A row's split depends on its features only (:meth:`FieldDataset.split`), so a
    row held out in one dataset is held out in all of them.
    """
    if which not in FIELD_SPLITS:  # a caller's bug, not user input
        raise ValueError(f"field split must be one of {', '.join(FIELD_SPLITS)}, got {which!r}")
    xs, ys = [], []
    for dataset in datasets:
        train, holdout = dataset.split()
        rows = {"train": train, "holdout": holdout, "all": np.union1d(train, holdout)}[which]
        xs.append(dataset.x[rows])
        ys.append(dataset.y[rows])
    if not xs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)
    first = _first_occurrences(x, y)
    return x[first], y[first]


def _first_occurrences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ascending indices of the first occurrence of each distinct (features, label) row."""
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.concatenate(
        [np.ascontiguousarray(x, dtype="<f4").view(np.uint8), np.ascontiguousarray(y, dtype="<i8").view(np.uint8).reshape(-1, 8)],
        axis=1,
    )
    rows = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    _, first = np.unique(rows, return_index=True)
    return np.sort(first)


def with_field_data(ds: Dataset, fields: Sequence[tuple[Path, FieldDataset]], checks: Checks) -> Dataset:
    """``ds`` with the labelled train-split rows of ``fields`` added to ``x_train``/``y_train``.

    Each dataset must have the project's feature and label names, and its labelled rows
    must pass ``checks.max_abs_value`` (finiteness is part of the format). Unlabelled rows
    are never used.

    Raises:
        DataError: names or values do not pass (the message names the file).
    """
    for path, dataset in fields:
        check_field_names(path, dataset, ds.feature_names, ds.label_names, against="the project's dataset")
        labelled = np.flatnonzero(dataset.y != UNLABELLED)
        big = np.abs(dataset.x[labelled]) > checks.max_abs_value
        if big.any():
            at, col = (int(v) for v in np.argwhere(big)[0])
            row = int(labelled[at])
            raise DataError(
                f"field dataset {path}: x[{row}] feature {ds.feature_names[col]!r} = {float(dataset.x[row, col]):.6g} "
                f"exceeds |value| <= {checks.max_abs_value:g} (checks.max_abs_value)"
            )
    sets = [dataset for _, dataset in fields]
    x_train, y_train = field_rows(sets, "train")
    holdout_x, holdout_y = field_rows(sets, "holdout")
    labelled_x, labelled_y = field_rows(sets, "all")
    return dataclasses.replace(
        ds,
        x_train=np.concatenate([ds.x_train, x_train]),
        y_train=np.concatenate([ds.y_train, y_train]),
        field=FieldRows(
            digests=tuple(sorted(d.digest for d in sets)),
            train_rows=int(x_train.shape[0]),
            holdout_x=holdout_x,
            holdout_y=holdout_y,
            labelled_x=labelled_x,
            labelled_y=labelled_y,
        ),
    )


def channel_values(x: np.ndarray) -> np.ndarray:
    """Samples ``[rows, C, ...]`` as one column per channel: ``[rows * positions, C]``.

    Each column holds every value of its channel at every position of every row, ordered
    by row, then position (row-major): ``x.reshape(rows, C, -1).transpose(0, 2, 1).reshape(-1, C)``.
    Flat rows ``[rows, C]`` are returned as they are.
    """
    if x.ndim <= 2:
        return x
    return np.ascontiguousarray(x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1).reshape(-1, x.shape[1]))


def feature_reference(x: np.ndarray, names: tuple[str, ...]) -> tuple[FeatureReference, ...]:
    """Per-channel statistics and decile bins of ``x``, the drift baseline.

    ``x`` is ``[rows, *sample_shape]``; a channel pools all of its values over every position
    of the sample (:func:`channel_values`), so the device bins each live value of a channel
    against the same edges.
    """
    x64 = channel_values(x).astype(np.float64)
    edges = np.quantile(x64, REFERENCE_QUANTILES, axis=0)  # (9, features)
    refs = []
    for j, name in enumerate(names):
        # The fractions are counted against the edges as the manifest stores them (float32,
        # fewest digits), not the float64 quantiles: on tied data (discrete sensor levels, int8
        # scores) a stored edge a hair below a tied value would move the whole tie one bin up
        # on the device, and the device would see drift in the reference data itself.
        col, e = x64[:, j], np.array([compact_float(v) for v in edges[:, j]], dtype=np.float64)
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
    return {row.tobytes() for row in np.ascontiguousarray(x).reshape(x.shape[0], -1)}


def _row_keys_list(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(x).reshape(x.shape[0], -1)]


def _where_in_sample(ds: Dataset, at: np.ndarray) -> str:
    """``feature 'f'`` (flat rows) or ``channel 'c' at position [i, j]`` of the index ``at`` = (row, channel, ...)."""
    name = ds.feature_names[int(at[1])]
    if len(at) == 2:
        return f"feature {name!r}"
    return f"channel {name!r} at position [{', '.join(str(int(v)) for v in at[2:])}]"


def reference_rows(ds: Dataset, source: str, normal_label: str | None = None) -> np.ndarray:
    """The raw rows a drift reference from ``source`` (:attr:`DataReport.reference_source`) describes.

    ``normal_label`` (anomaly projects): the training rows of that label only. The reference
    describes normal operation, what a device sees nearly all the time: fault rows that a
    project keeps in x_train (the autoencoder never learns them) would make normal inputs
    read as drifted, and would pull the standardization towards the faults.
    """
    if source == "field" and ds.field is not None:
        return ds.field.labelled_x
    if normal_label is not None:
        rows: np.ndarray = ds.x_train[ds.y_train == ds.label_names.index(normal_label)]
        return rows
    return ds.x_train


def check_data(
    ds: Dataset,
    checks: Checks,
    preprocessing: str,
    *,
    field_reference: str = "field",
    task: str = "classification",
    normal_label: str | None = None,
) -> DataReport:
    """Check the values of every split and profile the training features.

    Args:
        ds: the dataset (with its field rows, if any).
        checks: the thresholds.
        preprocessing: ``standardize`` or ``none``.
        field_reference: ``field``: profile the labelled field rows for the drift reference
            when there are at least :data:`MIN_FIELD_REFERENCE_ROWS`; ``training``: always
            profile the training split.
        task: the project's ``task.kind``: the class balance is checked for classifiers only
            (a regression has no classes; an anomaly model trains on the normal rows alone,
            whose presence :func:`load_dataset` checks).
        normal_label: an anomaly project's ``task.normal_label``: the standardization and the
            drift reference come from the normal training rows (:func:`reference_rows`).

    Raises:
        DataError: NaN/inf, a value beyond ``checks.max_abs_value``, a class under
            ``checks.min_class_fraction`` of train (classifiers), or more than
            ``checks.max_duplicate_fraction`` of test rows also in train.
    """
    for split in SPLITS:
        x, _ = ds.split(split)
        bad = ~np.isfinite(x)
        if bad.any():
            at = np.argwhere(bad)[0]
            raise DataError(
                f"dataset: x_{split} has {int(bad.sum())} NaN/inf value(s); first at row {int(at[0])}, {_where_in_sample(ds, at)}"
            )
        big = np.abs(x) > checks.max_abs_value
        if big.any():
            at = np.argwhere(big)[0]
            raise DataError(
                f"dataset: x_{split}[{int(at[0])}] {_where_in_sample(ds, at)} = {float(x[tuple(at)]):.6g} exceeds "
                f"|value| <= {checks.max_abs_value:g} (checks.max_abs_value)"
            )
    # Task-aware: a regression has no classes; an anomaly model needs normal rows only.
    counts = np.bincount(ds.y_train, minlength=len(ds.label_names)) if task != "regression" else np.zeros(0)
    fractions = counts / counts.sum() if task != "regression" else counts
    for name, frac in zip(ds.label_names, fractions, strict=False):
        if task == "classification" and (frac < checks.min_class_fraction or frac == 0):
            raise DataError(
                f"dataset: class {name!r} is {frac:.1%} of x_train, below the {checks.min_class_fraction:.1%} "
                "minimum (checks.min_class_fraction)"
            )
    train_rows = _row_keys(ds.x_train)
    shared = sum(1 for row in _row_keys_list(ds.x_test) if row in train_rows)
    dup = shared / ds.x_test.shape[0]
    if dup > checks.max_duplicate_fraction:
        raise DataError(
            f"dataset: {shared} of {ds.x_test.shape[0]} test rows ({dup:.1%}) also appear in train, over the "
            f"{checks.max_duplicate_fraction:.1%} limit (checks.max_duplicate_fraction): held-out accuracy would be inflated"
        )
    source = "training"
    if field_reference == "field" and ds.field is not None and ds.field.labelled_x.shape[0] >= MIN_FIELD_REFERENCE_ROWS:
        source = "field"
    normal = normal_label if task == "anomaly" else None
    # Per channel, pooled over the sample's positions (flat rows: per feature, as always).
    train64 = channel_values(reference_rows(ds, "training", normal)).astype(np.float64)
    mean, std = train64.mean(axis=0), train64.std(axis=0)
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
        # Field rows describe what the devices see now; the unlabelled ones never enter
        # (devices upload mostly inputs that looked drifted): see ADR 0016.
        features=feature_reference(reference_rows(ds, source, normal), ds.feature_names),
        reference_source=source,
    )
