"""Projects: an ``edgeops.toml`` plus the Python modules its entry points name.

The project file is loaded into a frozen :class:`Project`; unknown tables or keys are
rejected so a typo cannot silently fall back to a default. Entry points are
``module:function`` where ``module`` is a ``.py`` file in the project folder; they are
imported only when a step needs them, so ``edgeops targets`` never imports torch.

A project either trains its model (``[model] entry`` + ``[train]``) or brings a trained one
(docs/projects.md, "Bring your own model"): ``[model] weights`` (a ``state_dict`` for the
entry point's module), ``[model] program`` (a ``torch.export`` program) or ``[model] onnx``.
A project that brings its model has no ``[train]`` table: it is refused rather than
ignored, so nobody believes settings in it shape the weights. Its data comes from the
entry point or from one ``[data] npz`` file. Files are paths relative to the project
folder, inside it, and must exist when the project is loaded.

``[task]`` says what the model does (docs/projects.md, "Tasks"): ``classification`` (the
default), ``regression`` or ``anomaly``. Keys that only an anomaly model uses are refused for
the other tasks, and an anomaly score the model computes itself (``score = "output"``) is only
accepted from a brought model: a model edgeops trains learns to reconstruct its input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgeops_core import TASKS
from edgeops_core.fields import FieldReader, load_toml
from edgeops_toolchain.errors import ProjectError

__all__ = [
    "ANOMALY_SCORES",
    "FIELD_REFERENCES",
    "MODEL_FILE_KEYS",
    "MODEL_FILE_MAX_BYTES",
    "PROJECT_FILE",
    "Checks",
    "Project",
    "Quantization",
    "TaskConfig",
    "Training",
    "load_entry",
    "load_project",
    "python_sources_digest",
]

PROJECT_FILE = "edgeops.toml"
#: Where the drift reference comes from when the build has field data (the first is the default).
FIELD_REFERENCES = ("field", "training")
#: How an anomaly model scores a sample (``[task] score``): the mean squared error of the
#: model's reconstruction of its input (edgeops computes it), or the model's own one output.
ANOMALY_SCORES = ("reconstruction", "output")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_ENTRY = re.compile(r"^[A-Za-z_]\w*:[A-Za-z_]\w*$")
#: ``[model]`` keys that name a trained model file, and what each holds.
#: The largest trained model file a project may name (512 MiB): far above any model an edge
#: target runs, and a bound on what a build reads into memory and hashes.
MODEL_FILE_MAX_BYTES = 512 * 1024**2

MODEL_FILE_KEYS = MappingProxyType(
    {
        "weights": "a PyTorch state_dict (torch.save) for the model entry point's module",
        "program": "a torch.export program (torch.export.save, .pt2)",
        "onnx": "an ONNX model (onnxruntime targets only)",
    }
)


@dataclass(frozen=True)
class Training:
    """Training hyperparameters."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int


@dataclass(frozen=True)
class Quantization:
    """Calibration settings for int8 quantization."""

    calibration_samples: int


@dataclass(frozen=True)
class TaskConfig:
    """The ``[task]`` table: what the model does.

    Attributes:
        kind: ``classification``, ``regression`` or ``anomaly`` (:data:`edgeops_core.TASKS`).
        normal_label: anomaly only: the label (one of the data's ``label_names``) of normal rows.
        target_fpr: anomaly only: the false-positive rate on held-out normal rows the score
            threshold is fitted to, in (0, 0.5).
        score: anomaly only: ``reconstruction`` (the model returns a reconstruction of its
            input; edgeops wraps it so the exported model outputs the per-sample mean squared
            error, ``[rows, 1]``; the default when edgeops trains) or ``output`` (a brought
            model already returns ``[rows, 1]``; the default, and the only choice, for one).
        max_fpr: anomaly only: the largest false-positive rate the deployed model may show on
            the held-out normal rows of x_test (default twice ``target_fpr``): a threshold
            fitted on validation rows that does not hold on unseen normal data fails the build.
        min_detection_rate: anomaly only: the smallest share of x_test's fault rows the
            deployed model must flag (default 0: not checked).
        max_mae: regression only: the largest mean absolute error the deployed model may have
            on x_test, in the targets' units (default ``None``: not checked).
    """

    kind: str = "classification"
    normal_label: str = "normal"
    target_fpr: float = 0.01
    score: str = "reconstruction"
    max_fpr: float | None = None
    min_detection_rate: float = 0.0
    max_mae: float | None = None

    @property
    def fpr_limit(self) -> float:
        """``max_fpr``, or twice ``target_fpr`` when the project does not set it."""
        return self.max_fpr if self.max_fpr is not None else 2 * self.target_fpr

    def budget_fields(self) -> dict[str, Any]:
        """What validate fits and checks, not what is trained: the quality floors, and an anomaly
        model's target false-positive rate (its threshold is fitted in validate, so a new
        ``target_fpr`` re-runs validate and what follows, not the training)."""
        if self.kind == "anomaly":
            return {"target_fpr": self.target_fpr, "max_fpr": self.fpr_limit, "min_detection_rate": self.min_detection_rate}
        if self.kind == "regression" and self.max_mae is not None:
            return {"max_mae": self.max_mae}
        return {}

    def digest_fields(self) -> dict[str, Any]:
        """The settings that shape a build (nothing for a classifier, so its cache keys and
        lineage stay as they were before tasks existed)."""
        if self.kind == "classification":
            return {}
        if self.kind == "regression":
            return {"kind": self.kind}
        return {"kind": self.kind, "normal_label": self.normal_label, "target_fpr": self.target_fpr, "score": self.score}

    def data_fields(self) -> dict[str, Any]:
        """The settings that shape the data step and the training: :meth:`digest_fields`
        without what only validate uses (``target_fpr``, keyed through :meth:`budget_fields`)."""
        return {k: v for k, v in self.digest_fields().items() if k != "target_fpr"}


@dataclass(frozen=True)
class Checks:
    """Data-check thresholds."""

    max_duplicate_fraction: float
    min_class_fraction: float
    max_abs_value: float


@dataclass(frozen=True)
class Project:
    """A validated project.

    Attributes:
        root: the project folder.
        name: bundle name (lowercase, digits, ``.-_``).
        version: semantic version of the model.
        description: one line about the model.
        model_entry / model_params: ``module:function`` building the ``torch.nn.Module``
            and the keyword arguments it gets besides ``n_features`` and ``n_classes``
            (``None`` / empty for a ``program`` or ``onnx`` model).
        model_file / model_kind: the trained model file (absolute) and the ``[model]`` key
            that named it (:data:`MODEL_FILE_KEYS`); ``None`` when the build trains.
        data_entry / data_params: ``module:function`` returning the dataset mapping
            (``None`` / empty when ``data_npz`` gives the dataset).
        data_npz: the dataset as one ``.npz`` file (absolute), or ``None``.
        data_files: glob patterns (relative to the project folder) of the files the dataset
            entry reads; their bytes are part of the data step's cache key.
        field_data: field dataset files (absolute paths: ``[data] field`` resolved against the
            project folder, then any ``edgeops build --field-data``); see
            :mod:`edgeops_core.fielddata`.
        field_reference: ``field`` (the drift reference comes from the labelled field rows,
            when there are enough) or ``training`` (always from the training split).
        training, quantization, checks: the tables of the same names (``training`` is
            ``None`` when the project brings a trained model).
        preprocessing: ``standardize`` or ``none``.
        ttl_days: bundle lifetime in days.
        self_test_vectors: how many held-out windows go into the self-test.
        task: the ``[task]`` table (classification when absent).
    """

    root: Path
    name: str
    version: str
    description: str
    model_entry: str | None
    model_params: Mapping[str, Any]
    data_entry: str | None
    data_params: Mapping[str, Any]
    training: Training | None
    preprocessing: str
    quantization: Quantization
    checks: Checks
    ttl_days: int
    self_test_vectors: int
    data_files: tuple[str, ...] = ()
    field_data: tuple[Path, ...] = ()
    field_reference: str = "field"
    model_file: Path | None = None
    model_kind: str | None = None
    data_npz: Path | None = None
    task: TaskConfig = TaskConfig()

    @property
    def seed(self) -> int:
        """The seed of everything random in a build besides training (the calibration sample)."""
        return self.training.seed if self.training is not None else 0

    def model_field(self) -> str:
        """The ``[model]`` key that names the trained model file (``model.weights``...)."""
        return f"model.{self.model_kind}"

    def data_npz_digest(self) -> str | None:
        """``sha256:<hex>`` of the ``[data] npz`` file's bytes, or ``None`` without one.

        Raises:
            ProjectError: the file cannot be read.
        """
        if self.data_npz is None:
            return None
        try:
            return "sha256:" + hashlib.sha256(self.data_npz.read_bytes()).hexdigest()
        except OSError as exc:
            raise ProjectError(f"{self.root / PROJECT_FILE}: data.npz: cannot read {self.data_npz}: {exc}") from exc

    def with_field_data(self, paths: Sequence[Path]) -> Project:
        """This project with ``paths`` (relative to the working directory) added to :attr:`field_data`.

        Raises:
            ProjectError: the project brings its own trained model, which edgeops does not retrain,
                or is not a classifier (field data is labelled with classes).
        """
        if paths and self.model_kind is not None:
            raise ProjectError(_no_field_data(self.root / PROJECT_FILE, self.model_kind, "--field-data"))
        if paths and self.task.kind != "classification":
            raise ProjectError(_no_field_data_task(self.root / PROJECT_FILE, self.task.kind, "--field-data"))
        return dataclasses.replace(self, field_data=(*self.field_data, *(Path(p).absolute() for p in paths)))

    def hyperparameters(self) -> dict[str, Any]:
        """The settings behind the model, for the manifest's lineage: what shapes the trained weights
        and, for an anomaly model, its ``target_fpr`` (which shapes only its threshold)."""
        data: dict[str, Any] = (
            {"npz": self.data_npz.relative_to(self.root).as_posix()}
            if self.data_npz is not None
            else {"entry": self.data_entry, **dict(self.data_params)}
        )
        if self.field_data:
            data["field_reference"] = self.field_reference
        model: dict[str, Any] = {"entry": self.model_entry, **dict(self.model_params)} if self.model_entry else {}
        if self.model_file is not None:
            model[str(self.model_kind)] = self.model_file.relative_to(self.root).as_posix()
        out: dict[str, Any] = {"model": model, "data": data}
        if self.training is not None:
            out["train"] = vars(self.training).copy()
        out["preprocessing"] = self.preprocessing
        out["quantization"] = vars(self.quantization).copy()
        if self.task.kind != "classification":  # a classifier's lineage is as before tasks existed
            out["task"] = self.task.digest_fields()
        return out

    def source_digest(self) -> str:
        """sha256 over every ``.py`` file under the project folder (not the project file).

        The cache keys use this rather than :meth:`code_digest`, so that changing one
        hyperparameter in ``edgeops.toml`` re-runs only the steps that read it.
        """
        return python_sources_digest(self.root)

    def data_files_digest(self) -> str:
        """sha256 over the files ``data.files`` matches (names and bytes).

        Raises:
            ProjectError: a pattern matches no file (most likely a typo).
        """
        files: set[Path] = set()
        for pattern in self.data_files:
            matched = [p for p in self.root.glob(pattern) if p.is_file()]
            if not matched:
                raise ProjectError(f"{self.root / PROJECT_FILE}: data.files pattern {pattern!r} matches no file")
            files.update(matched)
        return _digest_files(self.root, sorted(files))

    def code_digest(self) -> str:
        """sha256 over the project file and every ``.py`` file under the project folder."""
        return _digest_files(self.root, [self.root / PROJECT_FILE, *_python_files(self.root)])


def python_sources_digest(root: Path) -> str:
    """sha256 over every ``.py`` file under ``root`` (relative names and bytes), byte-code caches left out."""
    return _digest_files(root, _python_files(root))


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.relative_to(root).parts)


def _digest_files(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


_TABLES: Mapping[str, set[str]] = MappingProxyType(
    {
        "project": {"name", "version", "description"},
        "model": {"entry", "params", *MODEL_FILE_KEYS},
        "data": {"entry", "params", "files", "field", "field_reference", "npz"},
        "train": {"epochs", "batch_size", "learning_rate", "weight_decay", "seed"},
        "preprocessing": {"kind"},
        "quantization": {"calibration_samples"},
        "checks": {"max_duplicate_fraction", "min_class_fraction", "max_abs_value"},
        "bundle": {"ttl_days", "self_test_vectors"},
        "task": {"kind", "normal_label", "target_fpr", "score", "max_fpr", "min_detection_rate", "max_mae"},
    }
)


def load_project(root: Path) -> Project:
    """Load and validate ``root/edgeops.toml``.

    Raises:
        ProjectError: the folder or file is missing, the TOML is malformed (the message has
            the line), or a field is missing, unknown or invalid (the message names it).
    """
    path = root / PROJECT_FILE
    data = load_toml(path, ProjectError, "project file")
    r = FieldReader(ProjectError, str(path))
    r.only(data, set(_TABLES), "")
    t = {name: r.mapping(data.get(name, {}), name) for name in _TABLES}
    for name, keys in _TABLES.items():
        r.only(t[name], keys, name)
    model_kind, model_file = _model_file(r, root, t["model"])
    if model_kind is not None and "train" in data:
        raise ProjectError(f"{path}: [train] is not used when model.{model_kind} gives a trained model; remove the [train] table")
    if model_kind is not None and "field" in t["data"]:
        raise ProjectError(_no_field_data(path, model_kind, "field 'data.field'"))
    data_npz = _data_npz(r, root, t["data"])
    task = _task(r, t["task"], model_kind)
    if task.kind != "classification" and "field" in t["data"]:
        raise ProjectError(_no_field_data_task(path, task.kind, "field 'data.field'"))

    def entry(table: str) -> str:
        value = r.string(t[table], "entry", table)
        if not _ENTRY.match(value):
            raise r.fail(f"{table}.entry", "of the form module:function", value)
        return value

    name = r.string(t["project"], "name", "project")
    if not _NAME.match(name):
        raise r.fail("project.name", "lowercase letters, digits, '.', '_' or '-'", name)
    version = r.string(t["project"], "version", "project")
    if not _SEMVER.match(version):
        raise r.fail("project.version", "a semantic version like 1.2.0", version)
    train, quant, checks, bundle = t["train"], t["quantization"], t["checks"], t["bundle"]
    preprocessing = t["preprocessing"].get("kind", "standardize")
    if preprocessing not in ("standardize", "none"):
        raise r.fail("preprocessing.kind", "'standardize' or 'none'", preprocessing)
    return Project(
        root=root.resolve(),
        name=name,
        version=version,
        description=str(t["project"].get("description", "")),
        model_entry=entry("model") if model_kind in (None, "weights") else None,
        model_params=MappingProxyType(dict(r.mapping(t["model"].get("params", {}), "model.params"))),
        data_entry=entry("data") if data_npz is None else None,
        data_params=MappingProxyType(dict(r.mapping(t["data"].get("params", {}), "data.params"))),
        training=None
        if model_kind is not None
        else Training(
            epochs=r.integer(train, "epochs", "train", minimum=1),
            batch_size=r.integer(train, "batch_size", "train", minimum=1),
            learning_rate=r.number(train, "learning_rate", "train", minimum=0, exclusive_minimum=True),
            weight_decay=r.number(train, "weight_decay", "train", minimum=0) if "weight_decay" in train else 0.0,
            seed=r.integer(train, "seed", "train", minimum=0) if "seed" in train else 0,
        ),
        preprocessing=preprocessing,
        quantization=Quantization(
            calibration_samples=r.integer(quant, "calibration_samples", "quantization", minimum=1)
            if "calibration_samples" in quant
            else 512
        ),
        checks=Checks(
            max_duplicate_fraction=_opt(r, checks, "max_duplicate_fraction", 0.0, maximum=1.0),
            min_class_fraction=_opt(r, checks, "min_class_fraction", 0.0, maximum=1.0),
            max_abs_value=_opt(r, checks, "max_abs_value", 1.0e6, maximum=None),
        ),
        ttl_days=r.integer(bundle, "ttl_days", "bundle", minimum=1) if "ttl_days" in bundle else 365,
        self_test_vectors=r.integer(bundle, "self_test_vectors", "bundle", minimum=1) if "self_test_vectors" in bundle else 10,
        data_files=_patterns(r, t["data"]),
        field_data=tuple(root.resolve() / rel for rel in _relative_paths(r, t["data"], "field")),
        field_reference=_choice(r, t["data"], "field_reference", FIELD_REFERENCES),
        model_file=model_file,
        model_kind=model_kind,
        data_npz=data_npz,
        task=task,
    )


def _task(r: FieldReader, table: Mapping[str, Any], model_kind: str | None) -> TaskConfig:
    """The ``[task]`` table; the anomaly keys are refused for other tasks (they would do nothing)."""
    kind = table.get("kind", "classification")
    if kind not in TASKS:
        raise r.fail("task.kind", "one of " + ", ".join(repr(k) for k in TASKS), kind)
    if kind != "anomaly":
        allowed = {"kind", "max_mae"} if kind == "regression" else {"kind"}
        extra = sorted(set(table) - allowed)
        if extra:
            what = "a regression setting" if extra[0] == "max_mae" else "an anomaly setting"
            raise r.fail(f"task.{extra[0]}", f"absent for task.kind = {kind!r} (it is {what})", table[extra[0]])
        max_mae = r.number(table, "max_mae", "task", minimum=0, exclusive_minimum=True) if "max_mae" in table else None
        return TaskConfig(kind=str(kind), max_mae=max_mae)
    if "max_mae" in table:
        raise r.fail("task.max_mae", "absent for task.kind = 'anomaly' (it is a regression setting)", table["max_mae"])
    normal = r.string(table, "normal_label", "task") if "normal_label" in table else "normal"
    fpr = r.number(table, "target_fpr", "task", minimum=0, exclusive_minimum=True) if "target_fpr" in table else 0.01
    if not fpr < 0.5:
        raise r.fail("task.target_fpr", "a false-positive rate in (0, 0.5)", fpr)
    # A trained model is an autoencoder; a brought one gives its score (see the checks below).
    score = table.get("score", "reconstruction" if model_kind is None else "output")
    if score not in ANOMALY_SCORES:
        raise r.fail("task.score", " or ".join(repr(c) for c in ANOMALY_SCORES), score)
    if score == "output" and model_kind is None:
        raise r.fail(
            "task.score",
            "'reconstruction' when edgeops trains the model (it trains an autoencoder to reconstruct normal rows); "
            "'output' needs a brought model file (model.weights, model.program or model.onnx) that returns the score",
            score,
        )
    if score == "reconstruction" and model_kind is not None:
        # Why: a brought model is exported as it is; wrapping it in the reconstruction error
        # would need the pretrained loader to build the wrapper, which it does not (yet).
        raise r.fail(
            "task.score",
            f"'output' when model.{model_kind} gives a trained model (a brought anomaly model must return its score, "
            "[rows, 1], higher = more anomalous)",
            score,
        )
    max_fpr = r.number(table, "max_fpr", "task", minimum=0, exclusive_minimum=True) if "max_fpr" in table else None
    if max_fpr is not None and not fpr <= max_fpr < 1:
        raise r.fail("task.max_fpr", f"a false-positive rate in [task.target_fpr = {fpr:g}, 1)", max_fpr)
    min_detection = r.number(table, "min_detection_rate", "task", minimum=0) if "min_detection_rate" in table else 0.0
    if not min_detection <= 1:
        raise r.fail("task.min_detection_rate", "a share in [0, 1]", min_detection)
    return TaskConfig(
        kind="anomaly",
        normal_label=normal,
        target_fpr=fpr,
        score=str(score),
        max_fpr=max_fpr,
        min_detection_rate=min_detection,
    )


def _no_field_data_task(path: Path, kind: str, what: str) -> str:
    # Why: field datasets carry class labels (edgeops_core.fielddata); a regression or an
    # anomaly project has nothing to learn from them or to measure with them.
    return f"{path}: {what} is not accepted for task.kind = {kind!r}: field datasets hold classification labels"


def _no_field_data(path: Path, model_kind: str, what: str) -> str:
    # Why: field rows only reach a model through training; with a brought model they would
    # re-fit the preprocessing statistics under unchanged weights and pass for a retrain.
    return (
        f"{path}: {what} is not accepted when model.{model_kind} gives a trained model: a brought model is not "
        "retrained by edgeops (retrain it yourself on the field data and bring the new file)"
    )


def _project_file(r: FieldReader, root: Path, table: Mapping[str, Any], field: str) -> Path:
    """The file ``table[key]`` names: a relative path inside the project folder that exists."""
    key = field.split(".")[1]
    value = table[key]
    if not isinstance(value, str) or not value or value.startswith("/") or ".." in Path(value).parts:
        raise r.fail(field, "a file path relative to the project folder, inside it", value)
    found = root.resolve() / value
    if not found.is_file():
        what = MODEL_FILE_KEYS.get(key, "the dataset as arrays")
        raise ProjectError(f"{r.source}: field '{field}': file {value!r} does not exist in {root.resolve()} (expected {what})")
    # Why: a symbolic link would let the project read (and digest into its lineage) a file
    # from anywhere on the build host, though the file must be inside the project folder.
    if not found.resolve().is_relative_to(root.resolve()):
        raise ProjectError(
            f"{r.source}: field '{field}': file {value!r} is a symbolic link to {found.resolve()}, outside the project "
            f"folder {root.resolve()}; copy the file into the project"
        )
    if key in MODEL_FILE_KEYS and found.stat().st_size > MODEL_FILE_MAX_BYTES:
        raise ProjectError(
            f"{r.source}: field '{field}': file {value!r} is {found.stat().st_size} bytes, more than the "
            f"{MODEL_FILE_MAX_BYTES} bytes ({MODEL_FILE_MAX_BYTES / 1024**2:g} MiB) edgeops reads as a trained model"
        )
    return found


def _model_file(r: FieldReader, root: Path, table: Mapping[str, Any]) -> tuple[str | None, Path | None]:
    """Which trained model file ``[model]`` names (kind, path), or ``(None, None)`` to train."""
    given = [k for k in MODEL_FILE_KEYS if k in table]
    if len(given) > 1:
        raise r.fail("model", "at most one of weights, program or onnx", ", ".join(given))
    if not given:
        return None, None
    kind = given[0]
    if kind == "weights" and "entry" not in table:
        raise r.fail("model.entry", "the module:function whose module model.weights holds the state_dict of", "nothing")
    if kind != "weights":
        # A program or an ONNX file is the whole model: an entry point would never be called.
        extra = [k for k in ("entry", "params") if k in table]
        if extra:
            raise r.fail(f"model.{extra[0]}", f"absent when model.{kind} gives the whole model", table[extra[0]])
    return kind, _project_file(r, root, table, f"model.{kind}")


def _data_npz(r: FieldReader, root: Path, table: Mapping[str, Any]) -> Path | None:
    """The ``[data] npz`` file, which replaces the entry point (and its params and files)."""
    if "npz" not in table:
        return None
    extra = [k for k in ("entry", "params", "files") if k in table]
    if extra:
        raise r.fail(f"data.{extra[0]}", "absent when data.npz gives the dataset", table[extra[0]])
    return _project_file(r, root, table, "data.npz")


def _patterns(r: FieldReader, table: Mapping[str, Any]) -> tuple[str, ...]:
    value = table.get("files", [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and not v.startswith("/") for v in value):
        raise r.fail("data.files", "a list of relative glob patterns", value)
    if any(".." in Path(v).parts for v in value):
        raise r.fail("data.files", "patterns inside the project folder (no '..')", value)
    return tuple(value)


def _relative_paths(r: FieldReader, table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and not v.startswith("/") for v in value):
        raise r.fail(f"data.{key}", "a list of file paths relative to the project folder", value)
    if any(".." in Path(v).parts for v in value):
        raise r.fail(f"data.{key}", "paths inside the project folder (no '..')", value)
    return tuple(value)


def _choice(r: FieldReader, table: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise r.fail(f"data.{key}", " or ".join(repr(c) for c in choices), value)
    return str(value)


def _opt(r: FieldReader, table: Mapping[str, Any], key: str, default: float, *, maximum: float | None) -> float:
    return r.number(table, key, "checks", minimum=0, maximum=maximum) if key in table else default


def load_entry(project: Project, entry: str) -> Callable[..., Any]:
    """Import ``module:function`` from the project folder and return the function.

    The module is imported under a name unique to the project folder, so two projects with a
    ``model.py`` each do not collide; the folder is on ``sys.path`` only during the import
    (so the project's own modules can import each other).

    Raises:
        ProjectError: the module file is missing, raises on import, or lacks the function.
    """
    module_name, func_name = entry.split(":")
    path = project.root / f"{module_name}.py"
    if not path.is_file():
        raise ProjectError(f"entry point {entry!r}: {path} does not exist")
    unique = f"_edgeops_project_{hashlib.sha256(str(project.root).encode()).hexdigest()[:12]}_{module_name}"
    module = sys.modules.get(unique)
    if module is None:
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
            raise ProjectError(f"entry point {entry!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        # dataclasses and pickling look the module up while it executes.
        sys.modules[unique] = module
        sys.path.insert(0, str(project.root))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the project's code may raise anything on import
            del sys.modules[unique]
            raise ProjectError(f"entry point {entry!r}: importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(project.root))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ProjectError(f"entry point {entry!r}: {path.name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]
