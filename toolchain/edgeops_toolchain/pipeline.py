"""The build pipeline: data checks → train → export → quantize → validate → package → sign → report.

Each :class:`Step` declares the inputs its output depends on (``inputs``), which is what
the lineage records and what the step cache keys on (:mod:`edgeops_toolchain.cache`). All
keys are computed before anything runs; a step whose entry is in the cache is skipped, and
its outputs are loaded only if a step that must run needs them. ``package`` is the one step
whose output is not a function of its inputs alone (it stamps the time and takes the next
release number), so whenever it runs, every step after it runs too.

Invariants:

* nothing is written to the output folder until the signed bundle has been verified with
  :mod:`edgeops_core` (the device's own code) and its report rendered; both then appear by
  atomic renames, so a failed or interrupted build leaves no bundle and no partial file;
* every budget is measured before any is enforced, so one run reports all failures;
* the release is recorded in the registry only once the signed bundle has verified, just
  before it is written; a failed build never consumes a release number;
* a rebuild with nothing changed reuses the signed bundle (same release) only while it is
  the newest release in the registry and has at least half of its lifetime left; otherwise
  it is packaged and signed again under the next release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeops_core import (
    DriftReference,
    EdgeopsError,
    FeatureReference,
    FieldDataset,
    Lineage,
    Manifest,
    Preprocessing,
    QuantParams,
    SelfTest,
    SelfTestVector,
    TargetProfile,
    Task,
    TensorSpec,
    TrustedKey,
    apply_preprocessing,
    format_time,
    pack_bundle,
    parse_time,
    verify_bundle,
    write_atomically,
)
from edgeops_core.bundle import MAX_MANIFEST_BYTES
from edgeops_toolchain import __version__
from edgeops_toolchain.cache import CacheEntryCorrupted, StepCache, digest_json
from edgeops_toolchain.data import (
    DataReport,
    Dataset,
    FieldRows,
    check_data,
    check_threshold_rows,
    compact_float,
    data_source,
    load_dataset,
    load_field_data,
    reference_rows,
)
from edgeops_toolchain.errors import BudgetExceededError, BuildError, ProjectError, UnsupportedTargetError
from edgeops_toolchain.keyring import check_signing_key
from edgeops_toolchain.project import Project, python_sources_digest
from edgeops_toolchain.registry import BuildRecord, Registry, now_text
from edgeops_toolchain.signing import dev_key, load_signing_key, sign_members
from edgeops_toolchain.tasks import (
    anomaly_calibration,
    anomaly_metrics,
    output_count,
    output_labels,
    output_reference,
    regression_metrics,
    task_checks,
)
from edgeops_toolchain.validate import (
    BudgetCheck,
    Evaluator,
    budget_checks,
    measure_peak_memory,
    minimum_tflm_arena,
    operator_check,
)

if TYPE_CHECKING:
    from edgeops_toolchain.train import TrainResult

#: Runtimes this toolchain exports and validates for.
_RUNTIMES = ("onnxruntime", "litert", "tflite-micro")

__all__ = [
    "STEPS",
    "BuildProgress",
    "BuildResult",
    "BuildState",
    "CacheOptions",
    "Step",
    "environment_fingerprint",
    "run_build",
    "step_keys",
]


class BuildProgress(Protocol):
    """Receives progress of a build (the CLI draws it; tests may record it)."""

    def step_started(self, step: Step) -> None:
        """``step`` begins."""

    def step_advanced(self, step: Step, done: int, total: int) -> None:
        """``step`` has done ``done`` of ``total`` units (epochs, measurements)."""

    def step_finished(self, step: Step, seconds: float) -> None:
        """``step`` ended after ``seconds``."""

    def step_cached(self, step: Step) -> None:
        """``step`` did not run: its outputs are in the cache."""

    def cache_corrupted(self, step: Step, reason: str) -> None:
        """``step``'s cache entry failed its digest check; it was deleted and the step runs."""


class _Silent:
    def step_started(self, step: Step) -> None:
        pass

    def step_advanced(self, step: Step, done: int, total: int) -> None:
        pass

    def step_finished(self, step: Step, seconds: float) -> None:
        pass

    def step_cached(self, step: Step) -> None:
        pass

    def cache_corrupted(self, step: Step, reason: str) -> None:
        pass


@dataclass
class BuildState:
    """Everything a build knows, filled in step by step."""

    project: Project
    profile: TargetProfile
    out_dir: Path
    key: Path
    trusted: TrustedKey
    progress: BuildProgress
    dataset: Dataset | None = None
    report: DataReport | None = None
    trained: TrainResult | None = None
    fp32_model: bytes | None = None
    model: bytes | None = None
    io_quant: tuple[QuantParams | None, QuantParams | None] | None = None
    io_dtypes: tuple[str, str] | None = None
    test_logits: np.ndarray | None = None
    metrics: dict[str, float] | None = None
    checks: list[BudgetCheck] | None = None
    self_test: SelfTest | None = None
    prediction_fractions: tuple[float, ...] | None = None
    #: Drift statistics of a regression's or an anomaly model's outputs (empty for a classifier).
    output_reference: tuple[FeatureReference, ...] | None = None
    #: The manifest's ``task`` (an anomaly model's with its fitted threshold).
    manifest_task: Task | None = None
    manifest: Manifest | None = None
    members: dict[str, bytes] | None = None
    latency_samples: np.ndarray | None = None
    bundle: bytes | None = None
    report_html: bytes | None = None
    bundle_path: Path | None = None
    registry: Registry | None = None
    release_above: int = 0
    #: The host's release-key list, embedded in the manifest (``None`` without a root of trust).
    release_keys: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    current: Step | None = None
    loaded_field_data: tuple[tuple[Path, FieldDataset], ...] | None = None
    brought_model: bytes | None = None

    def model_file(self) -> bytes:
        """The bytes of the project's trained model file, read once per build.

        The train step's cache key, the loaded model, its cache entry and the lineage's
        ``model_digest`` all come from these bytes, so a file edited during a build cannot
        give a bundle whose digest names another model.

        Raises:
            ProjectError: the project gives no model file, or it cannot be read.
        """
        if self.brought_model is None:
            path = self.project.model_file
            if path is None:  # a step asked for a file the project does not give: a bug
                raise ProjectError(f"internal: project {self.project.name!r} gives no trained model file")
            try:
                self.brought_model = path.read_bytes()
            except OSError as exc:
                where = self.project.root / "edgeops.toml"
                raise ProjectError(f"{where}: {self.project.model_field()}: cannot read {path}: {exc}") from exc
        return self.brought_model

    def model_digest(self) -> str | None:
        """``sha256:<hex>`` of :meth:`model_file`, or ``None`` when the build trains its model."""
        if self.project.model_file is None:
            return None
        return "sha256:" + hashlib.sha256(self.model_file()).hexdigest()

    def field_data(self) -> tuple[tuple[Path, FieldDataset], ...]:
        """The project's field datasets, loaded (and digest-checked) once per build.

        The data step's cache key needs their digests before anything runs, and the data
        step needs their rows; both get the same objects.

        Raises:
            FieldDataError: a file cannot be read or is refused.
        """
        if self.loaded_field_data is None:
            self.loaded_field_data = load_field_data(self.project.field_data)
        return self.loaded_field_data

    def advance(self, done: int, total: int) -> None:
        """Report progress inside the running step."""
        if self.current is not None:
            self.progress.step_advanced(self.current, done, total)

    def need(self, name: str) -> Any:
        """The value a previous step stored under ``name``."""
        value = getattr(self, name)
        if value is None:  # a step ran out of order: a bug, not user input
            raise BuildError(f"internal: build step needs {name!r}, which no earlier step produced")
        return value


@dataclass(frozen=True)
class Step:
    """One unit of the pipeline.

    Attributes:
        name: short identifier (``train``).
        title: what the progress line shows.
        inputs: what the step's outputs depend on: :class:`BuildState` fields produced by
            earlier steps, or outside inputs named ``project.*``, ``target.*``, ``key`` or ``key.*``.
        outputs: the :class:`BuildState` fields the step sets (checked after it runs).
        run: the work; reads from and writes to the :class:`BuildState`.
        deterministic: the outputs are a function of the inputs (``package`` is not: it
            stamps the time and the next release), so a cached entry can stand in for a run.
    """

    name: str
    title: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: Callable[[BuildState], None]
    deterministic: bool = True


#: Share of the manifest's size limit the self-test vectors may take (the rest holds the
#: drift reference, the metrics and the release-key list).
_SELF_TEST_SHARE = 0.5
#: Upper bound of the JSON characters one float32 value takes: Python's shortest repr of a
#: float32 has at most 9 significant digits, a sign, a point, an exponent (``e-38``) and a
#: comma (``-1.2345678e-05,``), and a value in [1e15, 1e16) is written in full (``-9876544000000000.0,``: 20).
_CHARS_PER_VALUE = 24


def _check_self_test_size(project: Project, ds: Dataset) -> None:
    """Refuse, before anything is trained, self-test vectors that could not fit the manifest.

    Each vector holds one raw sample; ``[bundle] self_test_vectors`` images of a few hundred
    kilobytes each would pass every step and then make a manifest the device refuses.
    """
    # Each vector holds a raw sample and the model's outputs for it.
    values = math.prod(ds.sample_shape) + output_count(project.task, ds.label_names)
    limit = int(MAX_MANIFEST_BYTES * _SELF_TEST_SHARE)
    estimate = project.self_test_vectors * values * _CHARS_PER_VALUE
    if estimate > limit:
        fits = limit // (values * _CHARS_PER_VALUE)
        hint = f"set [bundle] self_test_vectors to at most {fits}" if fits else "a sample this large cannot be a self-test vector"
        raise ProjectError(
            f"{project.root / 'edgeops.toml'}: bundle.self_test_vectors: {project.self_test_vectors} raw samples of shape "
            f"{list(ds.sample_shape)} ({values} values each, outputs included) take up to {estimate / 2**20:.1f} MiB "
            f"of the manifest, over the {limit / 2**20:.0f} MiB the self-test may use "
            f"({MAX_MANIFEST_BYTES / 2**20:.0f} MiB manifest limit): {hint}"
        )


def _check_cached_data(project: Project, ds: Dataset) -> None:
    """What the data step checks against settings its cache key leaves out: the self-test's
    size, and an anomaly project's normal x_val rows for its ``target_fpr`` (validate's).

    Raises:
        BuildError: too few rows for the self-test vectors.
        DataError: too few normal rows in x_val to fit the threshold.
    """
    _check_self_test_size(project, ds)
    task = project.task
    if task.kind == "anomaly":
        check_threshold_rows(ds.y_val, ds.label_names, task.normal_label, task.target_fpr, data_source(project))


def _normal_label(project: Project) -> str | None:
    """An anomaly project's ``task.normal_label`` (its references describe normal rows), else ``None``."""
    return project.task.normal_label if project.task.kind == "anomaly" else None


def _step_data(s: BuildState) -> None:
    s.dataset = load_dataset(s.project, field_data=s.field_data())
    _check_self_test_size(s.project, s.dataset)
    s.report = check_data(
        s.dataset,
        s.project.checks,
        s.project.preprocessing,
        field_reference=s.project.field_reference,
        task=s.project.task.kind,
        normal_label=_normal_label(s.project),
    )


def _step_train(s: BuildState) -> None:
    _check_cached_data(s.project, s.need("dataset"))  # before training, also when the data step was cached
    if s.project.model_file is not None:
        # A brought model: load (and check) it instead of training; cached like a trained one.
        s.trained = _load_pretrained(s, s.model_file())
        return
    from edgeops_toolchain.train import train_model

    s.trained = train_model(s.project, s.need("dataset"), s.need("report").preprocessing, on_epoch=s.advance)


def _load_pretrained(s: BuildState, data: bytes) -> TrainResult:
    from edgeops_toolchain.pretrained import load_pretrained

    return load_pretrained(s.project, data, s.need("dataset"), s.need("report").preprocessing)


def _step_export(s: BuildState) -> None:
    ds = s.need("dataset")
    sample_shape, n_classes = ds.sample_shape, output_count(s.project.task, ds.label_names)
    trained = s.need("trained")
    if trained.onnx is not None:
        # A brought ONNX model, already normalized and checked: it is the fp32 model.
        s.fp32_model = trained.onnx
    elif s.profile.format == "onnx":
        from edgeops_toolchain.onnx_export import export_onnx

        s.fp32_model = export_onnx(trained.torch_model(), sample_shape, n_classes)
    else:
        from edgeops_toolchain.tflite_export import export_tflite

        s.fp32_model = export_tflite(trained.torch_model(), sample_shape, n_classes)


def _step_quantize(s: BuildState) -> None:
    fp32 = s.need("fp32_model")
    if s.profile.precision == "fp32":
        s.model, s.io_quant, s.io_dtypes = fp32, (None, None), ("float32", "float32")
        return
    ds, pre = s.need("dataset"), s.need("report").preprocessing
    n = min(s.project.quantization.calibration_samples, ds.x_train.shape[0])
    # Calibrate on a seeded, class-mixed sample of training rows, never on test rows.
    rows = np.random.default_rng(s.project.seed).choice(ds.x_train.shape[0], size=n, replace=False)
    calibration = apply_preprocessing(pre, ds.x_train[np.sort(rows)], ds.sample_ndim)
    if s.project.task.kind == "anomaly":
        calibration = anomaly_calibration(calibration, s.project.seed)
    if s.profile.format == "onnx":
        from edgeops_toolchain.onnx_export import io_quantization, quantize_int8

        s.model = quantize_int8(fp32, calibration)
        s.io_quant, s.io_dtypes = io_quantization(s.model), ("float32", "float32")
    else:
        from edgeops_toolchain.tflite_export import quantize_tflite, tflite_io

        s.model = quantize_tflite(s.need("trained").torch_model(), calibration, output_count(s.project.task, ds.label_names))
        (d_in, q_in), (d_out, q_out) = tflite_io(s.model)
        s.io_quant, s.io_dtypes = (q_in, q_out), (d_in, d_out)


def _step_validate(s: BuildState) -> None:
    ds, report, trained = s.need("dataset"), s.need("report"), s.need("trained")
    _check_cached_data(s.project, ds)  # again: the data step may come from the cache
    task = s.project.task
    fp32, model, profile = s.need("fp32_model"), s.need("model"), s.profile
    if profile.format == "onnx":
        from edgeops_toolchain.onnx_export import mac_count, op_types

        ops, macs, float_runtime = op_types(model), mac_count(fp32), "onnxruntime"
    else:
        from edgeops_toolchain.tflite_export import tflite_mac_count, tflite_ops

        ops, macs, float_runtime = tflite_ops(model), tflite_mac_count(model), "litert"
    unsupported = sorted(ops - profile.supported_ops)
    if unsupported and profile.runtime == "tflite-micro":
        # TFLite Micro's op resolver would refuse the model: nothing more can be measured.
        raise BudgetExceededError([operator_check(unsupported)])
    x_test = apply_preprocessing(report.preprocessing, ds.x_test, ds.sample_ndim)
    # A brought ONNX model has no torch model to compare with: its parity row is left out.
    torch_logits = trained.logits(x_test) if trained.model is not None else None
    floating = Evaluator(float_runtime, fp32, profile.threads)
    float_logits = floating.predict(x_test)
    s.advance(1, 5)
    deployed = Evaluator(profile.runtime, model, profile.threads)
    logits = deployed.predict(x_test)
    pred_float, pred = float_logits.argmax(axis=1), logits.argmax(axis=1)
    s.latency_samples = deployed.latency_ms(x_test, budget_ms=profile.budgets.latency_ms)
    p50, p99 = float(np.percentile(s.latency_samples, 50)), float(np.percentile(s.latency_samples, 99))
    s.advance(2, 5)
    extra: dict[str, float] = {}
    if profile.format == "tflite" and profile.precision == "int8":
        extra.update(_runtime_agreement(profile, model, deployed, x_test))
    s.advance(3, 5)
    if deployed.arena_bytes is not None:
        peak = minimum_tflm_arena(model, deployed.arena_bytes)
        extra["arena_bytes"] = float(peak)
        extra["arena_recorded_bytes"] = float(deployed.arena_bytes)
    else:
        peak = measure_peak_memory(model, profile.threads, ds.sample_shape, runtime=profile.runtime, dtype=deployed.spec[0].dtype)
    if ds.field is not None:
        extra.update(_field_metrics(ds.field, report.preprocessing, deployed, floating))
    s.advance(4, 5)
    x_val = apply_preprocessing(report.preprocessing, ds.x_val, ds.sample_ndim)
    val_outputs = deployed.predict(x_val) if task.kind != "classification" else None
    if task.kind == "classification":
        acc_float = float((pred_float == ds.y_test).mean())
        acc = float((pred == ds.y_test).mean())
        task_metrics = {
            "accuracy_float": acc_float,
            "accuracy_deployed": acc,
            "accuracy_drop_points": round((acc_float - acc) * 100, 6),
            "top1_agreement": float((pred_float == pred).mean()),
        }
    elif task.kind == "regression":
        task_metrics = regression_metrics(ds.label_names, ds.y_test, float_logits, logits)
    else:
        task_metrics = anomaly_metrics(
            task,
            ds.label_names,
            y_val=ds.y_val,
            y_test=ds.y_test,
            val_float=floating.predict(x_val),
            val_deployed=deployed.predict(x_val) if val_outputs is None else val_outputs,
            test_float=float_logits,
            test_deployed=logits,
        )
    metrics = {
        **task_metrics,
        **({"parity_max_abs_diff": float(np.abs(torch_logits - float_logits).max())} if torch_logits is not None else {}),
        "model_bytes": float(len(model)),
        "fp32_model_bytes": float(len(fp32)),
        "size_ratio": len(model) / len(fp32),
        "peak_memory_bytes": float(peak),
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "mac_count": float(macs),
        "latency_estimate_ms": macs / profile.budgets.macs_per_second * 1000.0,
        "parameters": float(trained.parameters),
        "test_samples": float(ds.x_test.shape[0]),
        "threads": float(profile.threads),
        **extra,
    }
    checks = budget_checks(profile, metrics, unsupported)
    # A task's own rows take the place of the accuracy rows (which apply to classifiers only).
    at = next((i + 1 for i, c in enumerate(checks) if c.name.startswith("latency estimate")), len(checks))
    checks[at:at] = task_checks(task, profile, metrics, s.need("io_quant")[1])
    s.metrics, s.checks = metrics, checks
    threshold = metrics.get("anomaly_threshold")
    s.manifest_task = Task(kind=task.kind, threshold=threshold, target_fpr=task.target_fpr if threshold is not None else None)
    if val_outputs is None:
        # The prediction reference comes from the rows the feature reference describes when
        # those are field rows (ADR 0016); from the validation split otherwise.
        predicted = reference_rows(ds, report.reference_source) if report.reference_source == "field" else ds.x_val
        s.prediction_fractions = _fractions(
            deployed.predict(apply_preprocessing(report.preprocessing, predicted, ds.sample_ndim)), len(ds.label_names)
        )
        s.output_reference = ()
    else:
        # Regression outputs and anomaly scores: the deployed model's on the validation split,
        # the rows a classifier's prediction fractions come from (no field data for these tasks);
        # an anomaly model's on the normal rows only, as its input reference (reference_rows).
        if task.kind == "anomaly":
            val_outputs = val_outputs[ds.y_val == ds.label_names.index(task.normal_label)]
        s.prediction_fractions = ()
        s.output_reference = output_reference(val_outputs, output_labels(task, ds.label_names))
    s.test_logits = logits
    s.self_test = _self_test(ds, logits, s.project.self_test_vectors, s.need("io_quant")[1], task=s.manifest_task)
    s.advance(5, 5)
    if any(not c.passed for c in checks):
        raise BudgetExceededError(checks)


def _field_metrics(rows: FieldRows, pre: Preprocessing, deployed: Evaluator, floating: Evaluator) -> dict[str, float]:
    """Accuracy of the deployed and the float model on the held-out labelled field rows.

    With no held-out row there is no accuracy to report (metrics must be finite numbers):
    only the row counts are recorded.
    """
    metrics = {"field_train_rows": float(rows.train_rows), "field_holdout_rows": float(rows.holdout_x.shape[0])}
    if rows.holdout_x.shape[0]:
        x = apply_preprocessing(pre, rows.holdout_x)
        metrics["field_holdout_accuracy"] = float((deployed.predict(x).argmax(axis=1) == rows.holdout_y).mean())
        metrics["field_holdout_accuracy_float"] = float((floating.predict(x).argmax(axis=1) == rows.holdout_y).mean())
    return metrics


def _runtime_agreement(profile: TargetProfile, model: bytes, deployed: Evaluator, x: np.ndarray) -> dict[str, float]:
    """Largest int8 output difference between TFLite Micro and LiteRT on the test rows, in LSB.

    A mobile model may use operators TFLite Micro lacks; then there is nothing to compare
    and no row is added (its operator set is LiteRT's, checked separately).
    """
    other = "litert" if profile.runtime == "tflite-micro" else "tflite-micro"
    try:
        reference = Evaluator(other, model, profile.threads)
    except BuildError:
        if profile.runtime == "tflite-micro":
            raise
        return {}
    diff = np.abs(deployed.raw(x).astype(np.int32) - reference.raw(x).astype(np.int32))
    return {"runtime_max_lsb": float(diff.max()), "runtime_mean_lsb": round(float(diff.mean()), 6)}


def _fractions(logits: np.ndarray, n: int) -> tuple[float, ...]:
    counts = np.bincount(logits.argmax(axis=1), minlength=n)
    return tuple(round(float(c), 6) for c in counts / counts.sum())


def _self_test(ds: Dataset, logits: np.ndarray, count: int, out_quant: QuantParams | None, *, task: Task) -> SelfTest:
    """Held-out rows, at least one per class when possible, with the deployed model's output.

    The label is the top class (classification), the verdict (anomaly: 1 when the score is
    above the threshold, else 0; a row of each class is picked, so normal and fault rows are
    both there) or 0 (regression, whose rows have no class: the first test rows).
    """
    classes = range(len(ds.label_names)) if task.kind != "regression" else range(0)
    first = [int(np.argmax(ds.y_test == c)) for c in classes if (ds.y_test == c).any()]
    chosen = set(first)
    order = first + [i for i in range(ds.x_test.shape[0]) if i not in chosen]
    picks = order[: min(count, len(order))]
    # int8 outputs move in steps of the output scale; allow two steps for a different CPU's
    # rounding. Float models get a small absolute tolerance.
    atol = 2.0 * out_quant.scale if out_quant is not None else 1e-3
    vectors = tuple(
        SelfTestVector(
            input=tuple(compact_float(v) for v in ds.x_test[i].reshape(-1)),  # an N-d sample row-major
            expected=tuple(compact_float(v) for v in logits[i]),
            label=_self_test_label(task, logits[i]),
        )
        for i in picks
    )
    return SelfTest(atol=atol, vectors=vectors)


def _self_test_label(task: Task, outputs: np.ndarray) -> int:
    if task.kind == "anomaly" and task.threshold is not None:
        return int(float(outputs[0]) > task.threshold)
    return 0 if task.kind == "regression" else int(outputs.argmax())


#: The manifest's name for the output tensor, per task.
_OUTPUT_NAMES = {"classification": "logits", "regression": "values", "anomaly": "score"}


def _step_package(s: BuildState) -> None:
    ds, report = s.need("dataset"), s.need("report")
    created = datetime.now(UTC).replace(microsecond=0)
    # The fleet may run a release this registry never recorded (built on another machine):
    # the new one must still be higher, or the devices would refuse it (anti-rollback).
    last = max(s.registry.last_release(s.project.name, s.profile.name) if s.registry else 0, s.release_above)
    q_in, q_out = s.need("io_quant")
    d_in, d_out = s.need("io_dtypes")
    labels = output_labels(s.project.task, ds.label_names)
    s.manifest = Manifest(
        name=s.project.name,
        version=s.project.version,
        release=last + 1,
        target=s.profile.name,
        runtime=s.profile.runtime,
        model_file=s.profile.model_file,
        precision=s.profile.precision,
        inputs=(TensorSpec("features", d_in, (1, *ds.sample_shape), q_in),),
        outputs=(TensorSpec(_OUTPUT_NAMES[s.project.task.kind], d_out, (1, len(labels)), q_out),),
        feature_names=ds.feature_names,
        labels=labels,
        preprocessing=report.preprocessing,
        drift_reference=DriftReference(
            sample_count=int(reference_rows(ds, report.reference_source, _normal_label(s.project)).shape[0]),
            features=report.features,
            prediction_fractions=s.need("prediction_fractions"),
            outputs=s.need("output_reference"),
        ),
        self_test=s.need("self_test"),
        metrics=s.need("metrics"),
        lineage=Lineage(
            dataset_digest=ds.digest(),
            code_digest=s.project.code_digest(),
            hyperparameters=s.project.hyperparameters(),
            toolchain_version=__version__,
            parent_release=last or None,
            runtime_version=_runtime_version(s.profile.runtime),
            field_datasets=ds.field.digests if ds.field is not None else (),
            model_digest=s.model_digest(),
        ),
        created=format_time(created),
        expires=format_time(created + timedelta(days=s.project.ttl_days)),
        release_keys=s.release_keys,
        task=s.need("manifest_task"),
    )
    s.members = {"manifest.json": s.manifest.to_json(), s.profile.model_file: s.need("model")}


def _runtime_version(runtime: str) -> str | None:
    """Version of the runtime package the validate step ran the model on (recorded in the lineage).

    TFLite Micro's own ``__version__`` carries the source commit (``0.dev…-g<commit>``), which
    firmware needs to build the same TFLite Micro (``edgeops export --format c``).
    """
    if runtime == "tflite-micro":
        try:
            import tflite_micro

            return str(tflite_micro.__version__)
        except ImportError:  # pragma: no cover - validate has already run it
            pass
    dist = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert", "tflite-micro": "tflite-micro"}[runtime]
    version = environment_fingerprint().get(dist, "absent")
    return None if version == "absent" else version


def _step_sign(s: BuildState) -> None:
    manifest = s.need("manifest")
    stem = manifest.bundle_filename().removesuffix(".edgeops")
    members = s.need("members")
    signature = sign_members(members, s.key, subject=stem)
    data = pack_bundle({**members, "model.sig": signature}, mtime=int(parse_time(manifest.created).timestamp()))
    # Verify with the device's code before anything leaves the build.
    verify_bundle(data, [s.trusted])
    s.bundle = data


def _step_report(s: BuildState) -> None:
    from edgeops_toolchain.report import ReportInputs, render_report

    ds = s.need("dataset")
    s.report_html = render_report(
        ReportInputs(
            manifest=s.need("manifest"),
            checks=s.need("checks"),
            y_test=ds.y_test,
            test_logits=s.need("test_logits"),
            latency_ms=s.need("latency_samples"),
            x_train=ds.x_train,
            bundle_sha256=hashlib.sha256(s.need("bundle")).hexdigest(),
            signer=s.trusted.fingerprint,
            class_names=ds.label_names,
            normal_label=s.project.task.normal_label,
        )
    )


# How outputs that are not plain data go into and come out of the cache.
def _save_trained(s: BuildState) -> bytes:
    import torch

    if s.project.model_file is not None:
        # A brought model is its file: the entry keeps those bytes and loading re-reads them,
        # so the cached model is the one the key was computed over.
        return s.model_file()
    t = s.need("trained")
    buf = io.BytesIO()
    torch.save({"state": t.model.state_dict(), "parameters": t.parameters, "loss": t.loss_per_epoch, "val": t.val_accuracy}, buf)
    return buf.getvalue()


def _load_trained(s: BuildState, data: bytes) -> Any:
    import torch

    from edgeops_toolchain.train import TrainResult, build_model, task_model

    if s.project.model_file is not None:
        return _load_pretrained(s, data)
    saved = torch.load(io.BytesIO(data), weights_only=True)
    ds = s.need("dataset")
    n_outputs = output_count(s.project.task, ds.label_names)
    model = task_model(s.project, build_model(s.project, ds.sample_shape, n_outputs), ds.sample_shape)
    model.load_state_dict(saved["state"])
    model.eval()
    return TrainResult(model=model, parameters=saved["parameters"], loss_per_epoch=saved["loss"], val_accuracy=saved["val"])


def _load_manifest(s: BuildState, data: bytes) -> Any:
    return Manifest.from_json(data)


def _save_manifest(s: BuildState) -> bytes:
    return bytes(s.need("manifest").to_json())


_CODECS: Mapping[str, tuple[Callable[[BuildState], bytes], Callable[[BuildState, bytes], Any]]] = {
    "trained": (_save_trained, _load_trained),
    "manifest": (_save_manifest, _load_manifest),
}


STEPS: tuple[Step, ...] = (
    Step(
        "data",
        "Check data",
        inputs=("project.data", "project.code", "project.checks", "project.preprocessing"),
        outputs=("dataset", "report"),
        run=_step_data,
    ),
    Step(
        "train",
        "Train",
        inputs=("dataset", "report", "project.code", "project.model", "project.train"),
        outputs=("trained",),
        run=_step_train,
    ),
    Step(
        "export",
        "Export",
        inputs=("trained", "dataset", "target.format"),
        outputs=("fp32_model",),
        run=_step_export,
    ),
    Step(
        "quantize",
        "Quantize int8",
        inputs=("fp32_model", "trained", "dataset", "report", "project.quantization", "target.format", "target.precision"),
        outputs=("model", "io_quant", "io_dtypes"),
        run=_step_quantize,
    ),
    Step(
        "validate",
        "Validate budgets",
        inputs=("model", "fp32_model", "trained", "dataset", "report", "io_quant", "target", "project.bundle"),
        outputs=(
            "metrics",
            "checks",
            "self_test",
            "prediction_fractions",
            "output_reference",
            "manifest_task",
            "test_logits",
            "latency_samples",
        ),
        run=_step_validate,
    ),
    Step(
        "package",
        "Package",
        inputs=(
            "model",
            "metrics",
            "self_test",
            "prediction_fractions",
            "output_reference",
            "manifest_task",
            "io_quant",
            "io_dtypes",
            "dataset",
            "report",
            "project",
            "target",
            "key",
            "key.release_keys",
        ),
        outputs=("manifest", "members"),
        run=_step_package,
        deterministic=False,
    ),
    Step("sign", "Sign", inputs=("manifest", "members", "key"), outputs=("bundle",), run=_step_sign),
    Step(
        "report",
        "Report",
        inputs=("manifest", "checks", "test_logits", "latency_samples", "dataset", "bundle", "key"),
        outputs=("report_html",),
        run=_step_report,
    ),
)

#: What the end of a build needs, whatever was cached.
_FINAL = ("manifest", "bundle", "report_html", "checks")


@dataclass(frozen=True)
class BuildResult:
    """What a successful build produced.

    Attributes:
        public_key: the public key that verifies the bundle, when the build knows its file
            (the development key); ``None`` when the user signed with ``--key``.
        cached: the steps whose outputs came from the cache.
        reused: the signed bundle itself came from the cache (no new release).
        corrupted: cache entries that failed their digest check and were rebuilt.
    """

    bundle_path: Path
    report_path: Path
    manifest: Manifest
    checks: Sequence[BudgetCheck]
    timings: dict[str, float]
    signer: str
    public_key: Path | None
    dev_key_created: bool
    cached: tuple[str, ...] = ()
    reused: bool = False
    corrupted: tuple[CacheEntryCorrupted, ...] = ()


@dataclass(frozen=True)
class CacheOptions:
    """How a build uses the step cache.

    Attributes:
        root: the cache folder (``None``: no cache at all).
        read: use existing entries; ``False`` (``--no-cache``) runs every step and
            refreshes the entries with the new results.
    """

    root: Path | None
    read: bool = True


@lru_cache(maxsize=1)
def environment_fingerprint() -> dict[str, str]:
    """Versions of edgeops and of every library that shapes a built model (part of every key).

    edgeops' own code is keyed by its bytes, not only its version: an install from a
    checkout between releases (or a developer's edit) must not reuse steps the old code made.
    """
    import importlib.metadata as md
    import sys

    import edgeops_agent
    import edgeops_core
    import edgeops_toolchain

    names = ("torch", "onnx", "onnxscript", "onnxruntime", "litert-torch", "ai-edge-litert", "tflite-micro", "numpy", "torchao")
    packages = [Path(str(m.__file__)).parent for m in (edgeops_core, edgeops_toolchain, edgeops_agent)]
    code = digest_json({p.name: python_sources_digest(p) for p in packages})
    versions = {"edgeops": __version__, "edgeops_code": code, "python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _external(name: str, s: BuildState) -> object:
    """The value of an outside input (``project.*``, ``target*``, ``key``) for the cache key."""
    p, prof = s.project, s.profile
    values: dict[str, Callable[[], object]] = {
        "project.data": lambda: {
            "entry": p.data_entry,
            # The npz by its bytes (absent otherwise, so other projects keep their keys).
            **({"npz": p.data_npz_digest()} if p.data_npz is not None else {}),
            "params": dict(p.data_params),
            "files": p.data_files_digest(),
            # Field datasets by content digest: a new dataset re-runs data and everything
            # after it, the same one under another file name hits the cache.
            **({"field": [d.digest for _, d in s.field_data()], "field_reference": p.field_reference} if p.field_data else {}),
            # The task shapes the data checks and everything after (absent for a classifier,
            # so its keys stay as they were).
            # (target_fpr is validate's: see budget_fields.)
            **({"task": p.task.data_fields()} if p.task.kind != "classification" else {}),
        },
        "project.code": p.source_digest,
        "project.checks": lambda: dataclasses.asdict(p.checks),
        "project.preprocessing": lambda: p.preprocessing,
        # A brought model by its bytes: a changed file re-runs train (load) and what follows.
        "project.model": lambda: {
            "entry": p.model_entry,
            "params": dict(p.model_params),
            **({p.model_field(): s.model_digest()} if p.model_file is not None else {}),
        },
        "project.train": lambda: dataclasses.asdict(p.training) if p.training is not None else None,
        "project.quantization": lambda: dataclasses.asdict(p.quantization),
        "project.bundle": lambda: {
            "self_test_vectors": p.self_test_vectors,
            "ttl_days": p.ttl_days,
            # A task's quality floors (absent for a classifier, so its keys stay as they were).
            **({"task": p.task.budget_fields()} if p.task.budget_fields() else {}),
        },
        "project": lambda: {"name": p.name, "version": p.version, "description": p.description, "code": p.code_digest()},
        "target": lambda: {k: v for k, v in dataclasses.asdict(prof).items() if k != "source"},
        "target.format": lambda: prof.format,
        "target.precision": lambda: prof.precision,
        "key": lambda: s.trusted.fingerprint,
        # The list the manifest embeds: a new list makes a new release, the same one reuses it.
        "key.release_keys": lambda: None if s.release_keys is None else digest_json(s.release_keys),
    }
    if name not in values:  # a step declared an input nobody knows: a bug
        raise BuildError(f"internal: unknown step input {name!r}")
    return values[name]()


def step_keys(s: BuildState, steps: Sequence[Step] = STEPS) -> dict[str, str]:
    """Each step's cache key, computed from declared inputs before anything runs."""
    producer = {out: st.name for st in steps for out in st.outputs}
    keys: dict[str, str] = {}
    for st in steps:
        inputs = {i: ("step:" + keys[producer[i]]) if i in producer else _external(i, s) for i in st.inputs}
        keys[st.name] = digest_json({"step": st.name, "env": environment_fingerprint(), "inputs": inputs})
    return keys


def _encode(step: Step, s: BuildState) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in step.outputs:
        if name in _CODECS:
            files[name] = _CODECS[name][0](s)
        else:
            value = getattr(s, name)
            files[name] = value if isinstance(value, bytes) else pickle.dumps(value, protocol=5)
    return files


def _decode(step: Step, s: BuildState, files: Mapping[str, bytes]) -> None:
    for name in step.outputs:
        data = files[name]
        if name in _CODECS:
            setattr(s, name, _CODECS[name][1](s, data))
        elif name in _BYTES_FIELDS:
            setattr(s, name, data)
        else:
            setattr(s, name, pickle.loads(data))  # noqa: S301  our own entry, digest-checked


_BYTES_FIELDS = frozenset({"fp32_model", "model", "bundle", "report_html"})


def _reusable_release(s: BuildState, entries: Mapping[str, Mapping[str, bytes]]) -> bool:
    """Whether a cached package+sign may be handed out again (see the module docstring)."""
    if "package" not in entries or "sign" not in entries or s.registry is None:
        return False
    try:
        manifest = Manifest.from_json(entries["package"]["manifest"])
    except EdgeopsError:
        return False
    latest = s.registry.latest(manifest.name, manifest.target)
    if latest is None or latest.release != manifest.release or manifest.release <= s.release_above:
        return False
    if latest.bundle_sha256 != hashlib.sha256(entries["sign"]["bundle"]).hexdigest():
        return False
    created, expires = parse_time(manifest.created), parse_time(manifest.expires)
    return datetime.now(UTC) < created + (expires - created) / 2


def run_build(
    project: Project,
    profile: TargetProfile,
    out_dir: Path,
    *,
    key: Path | None = None,
    progress: BuildProgress | None = None,
    cache: CacheOptions | None = None,
    registry: Path | None = None,
    release_above: int = 0,
) -> BuildResult:
    """Build, validate, package and sign ``project`` for ``profile`` into ``out_dir``.

    Args:
        key: private signing key; ``None`` uses (and on first use creates) the dev key.
        progress: receives step progress.
        cache: the step cache to use (default: none).
        registry: the registry file (default ``$EDGEOPS_HOME/registry.sqlite``).
        release_above: the new release is higher than this too (a release the devices run that
            this registry does not know, e.g. built on another machine); it is the parent.

    Raises:
        InputError: bad project, data, model or key (a subclass says which).
        BudgetExceededError: the model breaks a budget; ``checks`` holds every row.
        UnsupportedTargetError: the target's runtime has no exporter.
        BuildError: anything else that stops the build.
    """
    started = time.perf_counter()
    if profile.runtime not in _RUNTIMES:
        raise UnsupportedTargetError(
            f"target {profile.name!r} runs {profile.runtime}; this toolchain builds for {', '.join(_RUNTIMES)}"
        )
    if project.model_kind == "onnx" and profile.format != "onnx":
        raise ProjectError(
            f"{project.root / 'edgeops.toml'}: model.onnx cannot be built for target {profile.name!r}, which runs "
            f"{profile.runtime} ({profile.format}): edgeops converts PyTorch models to TFLite (model.entry + model.weights, "
            "or model.program), not ONNX models; give the PyTorch model, or build for an onnxruntime target"
        )
    public: Path | None = None
    created = False
    if key is None:
        pair, created = dev_key()
        key, public = pair.private, pair.public
    trusted = load_signing_key(key)  # fail before an expensive build, not after it
    release_keys = check_signing_key(trusted, source=str(key))  # a key devices would refuse fails now, too
    cache = cache or CacheOptions(root=None)
    store = StepCache(cache.root) if cache.root is not None else None
    with Registry(registry) as reg:
        state = BuildState(
            project=project,
            profile=profile,
            out_dir=out_dir,
            key=key,
            trusted=trusted,
            progress=progress or _Silent(),
            registry=reg,
            release_above=release_above,
            release_keys=release_keys,
        )
        keys = step_keys(state)
        entries, corrupted = _lookup(state, store, keys, read=cache.read)
        run, load = _plan(entries)
        for declared in STEPS:
            # A brought model is loaded, not trained: the progress line says so.
            brought = declared.name == "train" and project.model_file is not None
            step = dataclasses.replace(declared, title="Load model") if brought else declared
            state.current = step
            if step.name not in run:
                if step.name in load:
                    _decode(step, state, entries[step.name])
                state.progress.step_cached(step)
                continue
            state.progress.step_started(step)
            begin = time.perf_counter()
            step.run(state)
            missing = [name for name in step.outputs if getattr(state, name) is None]
            if missing:  # a step that does not keep its declaration is a bug
                raise BuildError(f"internal: step {step.name!r} did not produce {', '.join(missing)}")
            if store is not None:
                store.store(step.name, keys[step.name], _encode(step, state))
            state.timings[step.name] = time.perf_counter() - begin
            state.progress.step_finished(step, state.timings[step.name])
        reused = "package" not in run
        bundle_path, report_path = _publish(state, reused=reused)
        manifest = state.need("manifest")
        cached = tuple(st.name for st in STEPS if st.name not in run)
        reg.record_build(
            BuildRecord(
                name=manifest.name,
                target=manifest.target,
                release=manifest.release,
                bundle_sha256=hashlib.sha256(state.need("bundle")).hexdigest(),
                finished=now_text(),
                seconds=round(time.perf_counter() - started, 4),
                reused=reused,
                cached_steps=cached,
                path=str(bundle_path),
            )
        )
    return BuildResult(
        bundle_path=bundle_path,
        report_path=report_path,
        manifest=manifest,
        checks=state.need("checks"),
        timings=state.timings,
        signer=trusted.fingerprint,
        public_key=public,
        dev_key_created=created,
        cached=cached,
        reused=reused,
        corrupted=tuple(corrupted),
    )


def _lookup(
    s: BuildState, store: StepCache | None, keys: Mapping[str, str], *, read: bool
) -> tuple[dict[str, dict[str, bytes]], list[CacheEntryCorrupted]]:
    """Digest-checked cache entries per step, and the corrupted ones (already deleted)."""
    entries: dict[str, dict[str, bytes]] = {}
    corrupted: list[CacheEntryCorrupted] = []
    if store is None or not read:
        return entries, corrupted
    for step in STEPS:
        found = store.load(step.name, keys[step.name])
        if isinstance(found, CacheEntryCorrupted):
            corrupted.append(found)
            s.progress.cache_corrupted(step, found.reason)
        elif found is not None and set(step.outputs) <= set(found):
            entries[step.name] = found
    if not _reusable_release(s, entries):
        entries.pop("package", None)
    return entries, corrupted


def _plan(entries: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Which steps run and which cached steps must be loaded.

    A step runs when it has no entry, or when it consumes new bytes: the output of a step
    that runs and is not deterministic (``package``), or of a step that ran because of one.
    A cached step is loaded only when a step that runs, or the end of the build, needs it.
    """
    producer = {out: st for st in STEPS for out in st.outputs}
    run: set[str] = set()
    fresh: set[str] = set()  # steps that run and whose outputs differ from any cached entry
    for st in STEPS:
        upstream = {producer[i].name for i in st.inputs if i in producer}
        if st.name not in entries or upstream & fresh:
            run.add(st.name)
            if not st.deterministic or upstream & fresh:
                fresh.add(st.name)
    needed = set(_FINAL)
    for st in reversed(STEPS):
        if st.name in run:
            needed |= {i for i in st.inputs if i in producer}
    load = {st.name for st in STEPS if st.name not in run and needed & set(st.outputs)}
    return run, load


def _publish(s: BuildState, *, reused: bool) -> tuple[Path, Path]:
    """Record the release and write the bundle and its report into the output folder."""
    manifest = s.need("manifest")
    data, report = s.need("bundle"), s.need("report_html")
    path = s.out_dir / manifest.bundle_filename()
    report_path = s.out_dir / (manifest.bundle_filename().removesuffix(".edgeops") + ".report.html")
    registry = s.registry
    if registry is not None:
        # The registry records absolute paths: a later `release revert` or `registry show`
        # may run from another working directory.
        where, report_where = path.absolute(), report_path.absolute()
        if reused:
            registry.update_location(manifest.name, manifest.target, manifest.release, where, report_where)
        else:
            # Record before writing: if the write then fails the number is skipped, which
            # devices tolerate; handing the same number out twice they would not.
            registry.record_release(
                manifest,
                bundle_sha256=hashlib.sha256(data).hexdigest(),
                path=where,
                report_path=report_where,
                signer=s.trusted.fingerprint,
            )
    try:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        for target, content in ((report_path, report), (path, data)):
            if not (target.is_file() and target.read_bytes() == content):
                write_atomically(target, content)
    except OSError as exc:
        raise BuildError(f"{s.out_dir}: cannot write the bundle: {exc.strerror or exc}") from exc
    s.bundle_path = path
    return path, report_path
