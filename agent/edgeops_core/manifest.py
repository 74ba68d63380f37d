"""The bundle manifest (``manifest.json``), schema version 1.

Invariants, checked by :meth:`Manifest.from_json` and by the constructor alike:

* there is exactly one input tensor of shape ``[1, *sample_shape]`` (``sample_shape`` of
  rank 1 to 4; its first axis is the channel axis: a flat vector's features are its
  channels, an image ``[1, 28, 28]`` has one channel, a spectrogram ``[40, 49]`` forty) and
  one output tensor of shape ``[1, n_labels]``; ``feature_names`` (one name per channel),
  the preprocessing statistics and the drift reference's ``features`` have
  ``sample_shape[0]`` entries; every self-test input holds ``prod(sample_shape)`` numbers
  (the sample flattened in row-major order); ``labels`` (class names, regression output
  names, or the one anomaly score's name) and every self-test expectation have ``n_labels``
  entries;
* ``task`` is ``classification`` (the default, not written), ``regression`` or ``anomaly``.
  A classifier's drift reference has ``prediction_fractions`` (one per label) and no
  ``outputs``; a regression's and an anomaly model's have ``outputs`` (statistics of each
  output value, the anomaly score included) and no ``prediction_fractions``. An anomaly
  model has one output, the score (higher is more anomalous), and ``task.threshold``: a
  score above it is an anomaly;
* ``release`` is a positive integer and ``expires`` is later than ``created``;
* ``runtime`` is ``onnxruntime``, ``litert`` or ``tflite-micro`` and ``model_file`` is the
  format that runtime executes; ``precision`` is ``int8``, ``fp16`` or ``fp32``;
* every number anywhere in it (metrics and hyperparameters included) is finite, and
  ``hyperparameters`` nests at most 32 levels;
* ``release_keys``, when present, is a structurally valid release-key list document
  (:func:`edgeops_core.trust.parse_release_keys`); its signatures are the device's business.

The field-by-field reference is ``docs/bundle-format.md``; keep the two in step.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgeops_core._json import MAX_JSON_DEPTH, load_untrusted_json
from edgeops_core.errors import ManifestError, TrustError
from edgeops_core.fields import FieldReader
from edgeops_core.profile import FORMATS_BY_RUNTIME
from edgeops_core.trust import parse_release_keys

__all__ = [
    "MAX_SAMPLE_RANK",
    "SCHEMA_VERSION",
    "TASKS",
    "DriftReference",
    "FeatureReference",
    "Lineage",
    "Manifest",
    "Preprocessing",
    "QuantParams",
    "SelfTest",
    "SelfTestVector",
    "Task",
    "TensorSpec",
    "format_time",
    "parse_time",
]

SCHEMA_VERSION = 1
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DTYPES = ("float32", "int8", "uint8", "int32")
_PREPROCESSING = ("standardize", "none")
_PRECISIONS = ("int8", "fp16", "fp32")
#: What a model does: pick a class, estimate numbers, or score how unusual an input is.
TASKS = ("classification", "regression", "anomaly")
#: The most axes a sample (the input without its batch axis) may have: ``[C, H, W, D]``.
MAX_SAMPLE_RANK = 4
_FIELD_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Fractions are stored rounded to 6 decimals, so their sum may be off by a few 1e-6.
_SUM_TOL = 1e-4


def format_time(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with a ``Z`` suffix, to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse the RFC 3339 UTC form written by :func:`format_time`.

    Raises:
        ValueError: the text is not of the form ``YYYY-MM-DDTHH:MM:SSZ``.
    """
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the runtime sees it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    quantization: QuantParams | None = None


@dataclass(frozen=True)
class Preprocessing:
    """What the device applies to a raw sample before the model.

    ``standardize``: ``x' = (x - mean[c]) / std[c]`` per channel ``c`` (the first axis of the
    sample; for a flat feature vector, per feature); ``none``: the raw sample.
    """

    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class FeatureReference:
    """Training-data statistics of one input channel (a flat vector's feature) or one model
    output, the baseline for drift detection. A channel's statistics pool every value of the
    channel over all positions of the sample (ADR 0021).

    ``bin_edges`` are the interior quantile edges (deciles by default) and
    ``bin_fractions`` the share of reference samples in each of the ``len(bin_edges) + 1``
    bins, so PSI can be computed on device without the training data.
    """

    name: str
    mean: float
    std: float
    min: float
    max: float
    bin_edges: tuple[float, ...]
    bin_fractions: tuple[float, ...]


@dataclass(frozen=True)
class DriftReference:
    """Reference statistics for every input channel and for the model's answers.

    A classifier's answers are described by ``prediction_fractions`` (the share of each
    predicted class); a regression's outputs and an anomaly score by ``outputs`` (one
    :class:`FeatureReference` per output, named after its label).
    """

    sample_count: int
    features: tuple[FeatureReference, ...]
    prediction_fractions: tuple[float, ...]
    outputs: tuple[FeatureReference, ...] = ()


@dataclass(frozen=True)
class Task:
    """What the model's output means.

    Attributes:
        kind: ``classification`` (one logit per label, the answer is the top one),
            ``regression`` (one number per label, the answer is the numbers) or ``anomaly``
            (one score; the answer is whether it is above ``threshold``).
        threshold: anomaly only: the score above which an input is an anomaly, fitted on
            held-out normal data to ``target_fpr``.
        target_fpr: anomaly only: the false-positive rate on normal data ``threshold`` was
            fitted to, in (0, 0.5).
    """

    kind: str = "classification"
    threshold: float | None = None
    target_fpr: float | None = None


@dataclass(frozen=True)
class SelfTestVector:
    """One raw input (before preprocessing, flattened row-major) and the model output expected for it.

    ``label`` is the expected top class of a classifier, ``1`` (anomaly) or ``0`` (normal)
    for an anomaly model, and ``0`` for a regression.
    """

    input: tuple[float, ...]
    expected: tuple[float, ...]
    label: int


@dataclass(frozen=True)
class SelfTest:
    """Vectors the device must reproduce within ``atol`` to go live.

    A classifier must also give the same top-1 class; an anomaly model the same verdict
    whenever the expected score is more than ``atol`` away from the threshold.
    """

    atol: float
    vectors: tuple[SelfTestVector, ...]


@dataclass(frozen=True)
class Lineage:
    """Where the model came from.

    ``runtime_version`` is the version of the runtime (``Manifest.runtime``) the build
    validated the model with; ``None`` in bundles built before it was recorded.
    ``reverted_to`` is set only on a release made by ``edgeops release revert``: the earlier
    release whose model this one ships again, byte for byte (``None`` for a build).
    ``field_datasets`` are the digests (``sha256:<hex>``, sorted) of the field datasets
    (:mod:`edgeops_core.fielddata`) the build trained on and measured with; ``()`` when none.
    ``model_digest`` (``sha256:<hex>``) is the digest of the trained model file the project
    brought (``[model] weights``, ``program`` or ``onnx``); ``None`` when the build trained it.
    """

    dataset_digest: str
    code_digest: str
    hyperparameters: Mapping[str, Any]
    toolchain_version: str
    parent_release: int | None
    runtime_version: str | None = None
    reverted_to: int | None = None
    field_datasets: tuple[str, ...] = ()
    model_digest: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Construct it directly (host) or with :meth:`from_json` (device).

    Raises:
        ManifestError: on construction, when a cross-field invariant does not hold.
    """

    name: str
    version: str
    release: int
    target: str
    runtime: str
    model_file: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feature_names: tuple[str, ...]
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    drift_reference: DriftReference
    self_test: SelfTest
    metrics: Mapping[str, float]
    lineage: Lineage
    created: str
    expires: str
    schema_version: int = field(default=SCHEMA_VERSION)
    #: The host's release-key list when the bundle was signed (the whole signed document), or
    #: ``None``. A device applies it before checking the signature if it is newer and its root
    #: signed it (docs/security.md); it changes nothing else.
    release_keys: Mapping[str, Any] | None = None
    #: What the output means; a classifier unless said otherwise.
    task: Task = field(default_factory=Task)

    def __post_init__(self) -> None:
        _check_invariants(self)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The input's shape without its batch axis: ``(n_features,)`` for a flat vector."""
        return self.inputs[0].shape[1:]

    @property
    def expires_at(self) -> datetime:
        """``expires`` as an aware datetime."""
        return parse_time(self.expires)

    def bundle_filename(self) -> str:
        """``<name>-<version>-<target>.edgeops``."""
        return f"{self.name}-{self.version}-{self.target}.edgeops"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in the documented field order."""

        def tensor(t: TensorSpec) -> dict[str, Any]:
            q = None if t.quantization is None else {"scale": t.quantization.scale, "zero_point": t.quantization.zero_point}
            return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "quantization": q}

        d = self.drift_reference
        lineage: dict[str, Any] = {
            "dataset_digest": self.lineage.dataset_digest,
            "code_digest": self.lineage.code_digest,
            "hyperparameters": dict(self.lineage.hyperparameters),
            "toolchain_version": self.lineage.toolchain_version,
            "parent_release": self.lineage.parent_release,
            "runtime_version": self.lineage.runtime_version,
        }
        # Written only when set, so every build's manifest stays byte-identical to before.
        if self.lineage.reverted_to is not None:
            lineage["reverted_to"] = self.lineage.reverted_to
        if self.lineage.field_datasets:
            lineage["field_datasets"] = list(self.lineage.field_datasets)
        if self.lineage.model_digest is not None:
            lineage["model_digest"] = self.lineage.model_digest
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "target": self.target,
            "runtime": self.runtime,
            "model_file": self.model_file,
            "precision": self.precision,
            # Written only for other tasks, so a classifier's manifest is unchanged.
            **({"task": _task_dict(self.task)} if self.task.kind != "classification" else {}),
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "feature_names": list(self.feature_names),
            "labels": list(self.labels),
            "preprocessing": {
                "kind": self.preprocessing.kind,
                "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std),
            },
            "drift_reference": {
                "sample_count": d.sample_count,
                "features": [_reference_dict(f) for f in d.features],
                "prediction_fractions": list(d.prediction_fractions),
                **({"outputs": [_reference_dict(f) for f in d.outputs]} if d.outputs else {}),
            },
            "self_test": {
                "atol": self.self_test.atol,
                "vectors": [
                    {"input": list(v.input), "expected": list(v.expected), "label": v.label} for v in self.self_test.vectors
                ],
            },
            "metrics": dict(self.metrics),
            "lineage": lineage,
            "created": self.created,
            "expires": self.expires,
            # Written only when set, so a bundle built without a root of trust is unchanged.
            **({"release_keys": dict(self.release_keys)} if self.release_keys is not None else {}),
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON in the documented field order, with a trailing newline.

        Compact because it travels to devices; ``python -m json.tool`` makes it readable.
        """
        return (json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Raises:
            ManifestError: not UTF-8 JSON, an unsupported ``schema_version``, or any field
                missing, of the wrong type, or inconsistent with another.
        """
        try:
            raw = load_untrusted_json(data)
        except ValueError as exc:  # also UnicodeDecodeError, and nesting or number bounds
            raise ManifestError(f"manifest.json: not valid JSON: {exc}", member="manifest.json") from exc
        try:
            return _from_dict(raw)
        except ManifestError as exc:
            exc.member = "manifest.json"
            raise


_R = FieldReader(ManifestError, "manifest.json")


def _task_dict(task: Task) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": task.kind}
    if task.threshold is not None:
        out["threshold"] = task.threshold
    if task.target_fpr is not None:
        out["target_fpr"] = task.target_fpr
    return out


def _reference_dict(f: FeatureReference) -> dict[str, Any]:
    return {
        "name": f.name,
        "mean": f.mean,
        "std": f.std,
        "min": f.min,
        "max": f.max,
        "bin_edges": list(f.bin_edges),
        "bin_fractions": list(f.bin_fractions),
    }


def _reference(raw: object, p: str) -> FeatureReference:
    f = _R.mapping(raw, p)
    return FeatureReference(
        name=_R.string(f, "name", p),
        mean=_R.number(f, "mean", p),
        std=_R.number(f, "std", p, minimum=0),
        min=_R.number(f, "min", p),
        max=_R.number(f, "max", p),
        bin_edges=_R.numbers(f, "bin_edges", p),
        bin_fractions=_R.numbers(f, "bin_fractions", p),
    )


def _task(raw: object) -> Task:
    if raw is None:
        return Task()
    t = _R.mapping(raw, "task")
    unknown = sorted(set(t) - {"kind", "threshold", "target_fpr"})
    if unknown:
        raise ManifestError(f"manifest.json: field 'task.{unknown[0]}' is not a task setting (kind, threshold, target_fpr)")
    kind = _R.string(t, "kind", "task")
    if kind not in TASKS:
        raise _R.fail("task.kind", f"one of {', '.join(TASKS)}", kind)
    threshold = None if t.get("threshold") is None else _R.number(t, "threshold", "task")
    fpr = None if t.get("target_fpr") is None else _R.number(t, "target_fpr", "task")
    return Task(kind=kind, threshold=threshold, target_fpr=fpr)


def _tensor(raw: object, path: str) -> TensorSpec:
    t = _R.mapping(raw, path)
    dtype = _R.string(t, "dtype", path)
    if dtype not in _DTYPES:
        raise _R.fail(f"{path}.dtype", f"one of {', '.join(_DTYPES)}", dtype)
    shape = tuple(_R.as_int(v, f"{path}.shape[{i}]", minimum=1) for i, v in enumerate(_R.sequence(t, "shape", path)))
    q_raw = _R.get(t, "quantization", path)
    quant = None
    if q_raw is not None:
        q = _R.mapping(q_raw, f"{path}.quantization")
        quant = QuantParams(
            scale=_R.number(q, "scale", f"{path}.quantization", minimum=0, exclusive_minimum=True),
            zero_point=_R.integer(q, "zero_point", f"{path}.quantization"),
        )
    return TensorSpec(name=_R.string(t, "name", path), dtype=dtype, shape=shape, quantization=quant)


def _from_dict(raw: object) -> Manifest:
    m = _R.mapping(raw, "")
    schema = _R.integer(m, "schema_version")
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"manifest.json: schema_version {schema} is not supported (this edgeops reads {SCHEMA_VERSION})")
    pre = _R.mapping(_R.get(m, "preprocessing", ""), "preprocessing")
    drift = _R.mapping(_R.get(m, "drift_reference", ""), "drift_reference")
    feats = [
        _reference(f, f"drift_reference.features[{i}]") for i, f in enumerate(_R.sequence(drift, "features", "drift_reference"))
    ]
    outs = (
        [_reference(f, f"drift_reference.outputs[{i}]") for i, f in enumerate(_R.sequence(drift, "outputs", "drift_reference"))]
        if "outputs" in drift
        else []
    )
    st = _R.mapping(_R.get(m, "self_test", ""), "self_test")
    vectors = []
    for i, v_raw in enumerate(_R.sequence(st, "vectors", "self_test")):
        p = f"self_test.vectors[{i}]"
        v = _R.mapping(v_raw, p)
        vectors.append(
            SelfTestVector(
                input=_R.numbers(v, "input", p), expected=_R.numbers(v, "expected", p), label=_R.integer(v, "label", p, minimum=0)
            )
        )
    metrics_raw = _R.mapping(_R.get(m, "metrics", ""), "metrics")
    metrics = {str(k): _R.as_number(v, f"metrics.{k}") for k, v in metrics_raw.items()}
    lin = _R.mapping(_R.get(m, "lineage", ""), "lineage")
    parent = _R.get(lin, "parent_release", "lineage")
    reverted = lin.get("reverted_to")
    field_datasets = _R.strings(lin, "field_datasets", "lineage") if "field_datasets" in lin else ()
    return Manifest(
        schema_version=schema,
        name=_R.string(m, "name"),
        version=_R.string(m, "version"),
        release=_R.integer(m, "release", minimum=1),
        target=_R.string(m, "target"),
        runtime=_R.string(m, "runtime"),
        model_file=_R.string(m, "model_file"),
        precision=_R.string(m, "precision"),
        inputs=tuple(_tensor(t, f"inputs[{i}]") for i, t in enumerate(_R.sequence(m, "inputs"))),
        outputs=tuple(_tensor(t, f"outputs[{i}]") for i, t in enumerate(_R.sequence(m, "outputs"))),
        feature_names=_R.strings(m, "feature_names"),
        labels=_R.strings(m, "labels"),
        preprocessing=Preprocessing(
            kind=_R.string(pre, "kind", "preprocessing"),
            mean=_R.numbers(pre, "mean", "preprocessing"),
            std=_R.numbers(pre, "std", "preprocessing"),
        ),
        drift_reference=DriftReference(
            sample_count=_R.integer(drift, "sample_count", "drift_reference", minimum=1),
            features=tuple(feats),
            prediction_fractions=_R.numbers(drift, "prediction_fractions", "drift_reference"),
            outputs=tuple(outs),
        ),
        self_test=SelfTest(atol=_R.number(st, "atol", "self_test", minimum=0, exclusive_minimum=True), vectors=tuple(vectors)),
        metrics=metrics,
        lineage=Lineage(
            dataset_digest=_R.string(lin, "dataset_digest", "lineage"),
            code_digest=_R.string(lin, "code_digest", "lineage"),
            hyperparameters=dict(_R.mapping(_R.get(lin, "hyperparameters", "lineage"), "lineage.hyperparameters")),
            toolchain_version=_R.string(lin, "toolchain_version", "lineage"),
            parent_release=None if parent is None else _R.as_int(parent, "lineage.parent_release", minimum=1),
            runtime_version=None if lin.get("runtime_version") is None else _R.string(lin, "runtime_version", "lineage"),
            reverted_to=None if reverted is None else _R.as_int(reverted, "lineage.reverted_to", minimum=1),
            field_datasets=field_datasets,
            model_digest=None if lin.get("model_digest") is None else _R.string(lin, "model_digest", "lineage"),
        ),
        created=_R.string(m, "created"),
        expires=_R.string(m, "expires"),
        release_keys=None if m.get("release_keys") is None else dict(_R.mapping(m["release_keys"], "release_keys")),
        task=_task(m.get("task")),
    )


def _fail(message: str) -> ManifestError:
    return ManifestError(f"manifest.json: {message}", member="manifest.json")


def _check_numbers(m: Manifest) -> None:
    """Every number in the manifest is finite (NaN compares false and would slip past the
    range checks below), and nothing nests so deep that ``to_json`` could recurse too far."""
    stack: list[tuple[object, str, int]] = [(m.to_dict(), "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _fail(f"field '{path}' is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, Mapping):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise _fail(f"field '{path}' must be a finite number, got {value}")
    for key, number in m.metrics.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _fail(f"field 'metrics.{key}' must be a number, got {type(number).__name__}")


def _check_invariants(m: Manifest) -> None:  # noqa: C901 - one flat list of schema rules
    if not _NAME.match(m.name):
        raise _fail(f"name {m.name!r} must be lowercase letters, digits, '.', '_' or '-' (at most 64)")
    if not _SEMVER.match(m.version):
        raise _fail(f"version {m.version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    if not _NAME.match(m.target):
        raise _fail(f"target {m.target!r} is not a valid target name")
    if m.runtime not in FORMATS_BY_RUNTIME:
        raise _fail(f"runtime must be one of {', '.join(FORMATS_BY_RUNTIME)}, got {m.runtime!r}")
    if m.model_file != f"model.{FORMATS_BY_RUNTIME[m.runtime]}":
        raise _fail(f"runtime {m.runtime!r} runs model.{FORMATS_BY_RUNTIME[m.runtime]}, but model_file is {m.model_file!r}")
    if m.precision not in _PRECISIONS:
        raise _fail(f"precision must be one of {', '.join(_PRECISIONS)}, got {m.precision!r}")
    _check_numbers(m)
    if m.release_keys is not None:
        try:
            parse_release_keys(m.release_keys)
        except TrustError as exc:
            raise _fail(f"field 'release_keys': {exc}") from exc
    if len(m.inputs) != 1 or len(m.outputs) != 1:
        raise _fail(f"expected exactly 1 input and 1 output tensor, got {len(m.inputs)} and {len(m.outputs)}")
    n_features, n_labels = len(m.feature_names), len(m.labels)
    for what, names in (("feature_names", m.feature_names), ("labels", m.labels)):
        if len(set(names)) != len(names):
            # Answers and drift are reported by name: a repeated one would hide the other.
            raise _fail(f"{what} must not repeat a name, got {list(names)}")
    shape = m.inputs[0].shape
    if not 2 <= len(shape) <= MAX_SAMPLE_RANK + 1 or shape[0] != 1 or shape[1] != n_features:
        raise _fail(
            f"inputs[0].shape must be [1, {n_features}, ...] (batch 1, then one channel per feature name, "
            f"at most {MAX_SAMPLE_RANK} sample axes), got {list(shape)}"
        )
    n_values = math.prod(shape[1:])
    if m.outputs[0].shape != (1, n_labels):
        raise _fail(f"outputs[0].shape must be [1, {n_labels}] (one per label), got {list(m.outputs[0].shape)}")
    _check_task(m)
    pre = m.preprocessing
    if pre.kind not in _PREPROCESSING:
        raise _fail(f"preprocessing.kind must be one of {', '.join(_PREPROCESSING)}, got {pre.kind!r}")
    if pre.kind == "standardize":
        if len(pre.mean) != n_features or len(pre.std) != n_features:
            raise _fail(f"preprocessing.mean/std need {n_features} entries, got {len(pre.mean)} and {len(pre.std)}")
        if any(s <= 0 for s in pre.std):
            raise _fail("preprocessing.std entries must all be > 0")
    d = m.drift_reference
    if len(d.features) != n_features:
        raise _fail(f"drift_reference.features needs {n_features} entries, got {len(d.features)}")
    for i, f in enumerate(d.features):
        if f.name != m.feature_names[i]:
            raise _fail(f"drift_reference.features[{i}].name is {f.name!r}, expected {m.feature_names[i]!r}")
        if len(f.bin_fractions) != len(f.bin_edges) + 1:
            raise _fail(f"drift_reference.features[{i}] needs len(bin_edges) + 1 bin_fractions")
        if list(f.bin_edges) != sorted(f.bin_edges):
            raise _fail(f"drift_reference.features[{i}].bin_edges must be ascending")
        if not math.isclose(sum(f.bin_fractions), 1.0, abs_tol=_SUM_TOL):
            raise _fail(f"drift_reference.features[{i}].bin_fractions must sum to 1")
    for i, f in enumerate(d.outputs):
        if f.name != m.labels[i]:
            raise _fail(f"drift_reference.outputs[{i}].name is {f.name!r}, expected {m.labels[i]!r}")
        if len(f.bin_fractions) != len(f.bin_edges) + 1 or list(f.bin_edges) != sorted(f.bin_edges):
            raise _fail(f"drift_reference.outputs[{i}] needs ascending bin_edges and len(bin_edges) + 1 bin_fractions")
        if not math.isclose(sum(f.bin_fractions), 1.0, abs_tol=_SUM_TOL):
            raise _fail(f"drift_reference.outputs[{i}].bin_fractions must sum to 1")
    if m.task.kind == "classification":
        if len(d.prediction_fractions) != n_labels or not math.isclose(sum(d.prediction_fractions), 1.0, abs_tol=_SUM_TOL):
            raise _fail(f"drift_reference.prediction_fractions needs {n_labels} entries summing to 1")
        if d.outputs:
            raise _fail("drift_reference.outputs is for regression and anomaly models; a classifier has prediction_fractions")
    else:
        if d.prediction_fractions:
            raise _fail(f"drift_reference.prediction_fractions must be empty for a {m.task.kind} model (it has outputs)")
        if len(d.outputs) != n_labels:
            raise _fail(f"drift_reference.outputs needs {n_labels} entries (one per output), got {len(d.outputs)}")
    if not m.self_test.vectors:
        raise _fail("self_test.vectors must hold at least one vector")
    max_label = {"classification": n_labels, "anomaly": 2, "regression": 1}[m.task.kind]
    for i, v in enumerate(m.self_test.vectors):
        if len(v.input) != n_values or len(v.expected) != n_labels or v.label >= max_label:
            raise _fail(
                f"self_test.vectors[{i}] must have {n_values} inputs (the sample {list(shape[1:])} flattened), "
                f"{n_labels} expected outputs and a label < {max_label}"
            )
    try:
        created, expires = parse_time(m.created), parse_time(m.expires)
    except ValueError as exc:
        raise _fail(f"created/expires must be UTC timestamps like 2026-01-31T12:00:00Z: {exc}") from exc
    if expires <= created:
        raise _fail(f"expires {m.expires} is not after created {m.created}")
    if m.lineage.reverted_to is not None and m.lineage.reverted_to >= m.release:
        raise _fail(f"lineage.reverted_to {m.lineage.reverted_to} must be an earlier release than release {m.release}")
    digests = m.lineage.field_datasets
    if not isinstance(digests, tuple) or not all(isinstance(d, str) and _FIELD_DIGEST.fullmatch(d) for d in digests):
        raise _fail("lineage.field_datasets must be a list of 'sha256:' + 64 hex digit digests")
    if list(digests) != sorted(set(digests)):
        raise _fail("lineage.field_datasets must be sorted and without repeats")
    if m.lineage.model_digest is not None and not _FIELD_DIGEST.fullmatch(m.lineage.model_digest):
        raise _fail("lineage.model_digest must be 'sha256:' + 64 hex digits")


def _check_task(m: Manifest) -> None:
    t = m.task
    if t.kind not in TASKS:
        raise _fail(f"task.kind must be one of {', '.join(TASKS)}, got {t.kind!r}")
    if t.kind == "anomaly":
        if len(m.labels) != 1:
            raise _fail(f"an anomaly model has exactly one output, its score (one label), got {len(m.labels)} labels")
        if t.threshold is None:
            raise _fail("task.threshold is required for an anomaly model")
        if t.target_fpr is None or not 0 < t.target_fpr < 0.5:
            raise _fail(f"task.target_fpr must be in (0, 0.5) for an anomaly model, got {t.target_fpr}")
    elif t.threshold is not None or t.target_fpr is not None:
        raise _fail(f"task.threshold and task.target_fpr are for anomaly models, not {t.kind}")
