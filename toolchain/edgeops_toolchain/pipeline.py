"""The build pipeline: data checks → train → export → quantize → validate → package → sign.

Each :class:`Step` declares the inputs its output depends on (``inputs``), which is what
the lineage records and what a step cache keys on. Steps run in order over one
:class:`BuildState`; a step reads what earlier steps stored and stores its own results.

Invariants:

* nothing is written to the output folder until the signed bundle has been verified with
  :mod:`edgeops_core` (the device's own code); it then appears by an atomic rename, so a
  failed or interrupted build leaves no bundle and no partial file behind;
* every budget is measured before any is enforced, so one run reports all failures;
* the release counter is committed only once the signed bundle has verified, just before
  it is written; a failed build never consumes a release number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeops_core import (
    DriftReference,
    Lineage,
    Manifest,
    QuantParams,
    SelfTest,
    SelfTestVector,
    TargetProfile,
    TensorSpec,
    TrustedKey,
    apply_preprocessing,
    format_time,
    pack_bundle,
    verify_bundle,
    write_atomically,
)
from edgeops_toolchain import __version__
from edgeops_toolchain.data import DataReport, Dataset, check_data, compact_float, load_dataset
from edgeops_toolchain.errors import BudgetExceededError, BuildError, UnsupportedTargetError
from edgeops_toolchain.project import Project
from edgeops_toolchain.releases import ReleaseCounter
from edgeops_toolchain.signing import dev_key, load_signing_key, sign_members
from edgeops_toolchain.validate import BudgetCheck, Evaluator, budget_checks, measure_peak_memory

if TYPE_CHECKING:
    from edgeops_toolchain.train import TrainResult

#: Runtimes this toolchain exports and validates for.
_RUNTIMES = ("onnxruntime", "litert", "tflite-micro")

__all__ = ["STEPS", "BuildProgress", "BuildResult", "BuildState", "Step", "run_build"]


class BuildProgress(Protocol):
    """Receives progress of a build (the CLI draws it; tests may record it)."""

    def step_started(self, step: Step) -> None:
        """``step`` begins."""

    def step_advanced(self, step: Step, done: int, total: int) -> None:
        """``step`` has done ``done`` of ``total`` units (epochs, measurements)."""

    def step_finished(self, step: Step, seconds: float) -> None:
        """``step`` ended after ``seconds``."""


class _Silent:
    def step_started(self, step: Step) -> None:
        pass

    def step_advanced(self, step: Step, done: int, total: int) -> None:
        pass

    def step_finished(self, step: Step, seconds: float) -> None:
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
    manifest: Manifest | None = None
    members: dict[str, bytes] | None = None
    bundle_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    current: Step | None = None

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
            earlier steps, or outside inputs named ``project.*``, ``target.*`` or ``key``.
        outputs: the :class:`BuildState` fields the step sets (checked after it runs).
        run: the work; reads from and writes to the :class:`BuildState`.
    """

    name: str
    title: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: Callable[[BuildState], None]


def _step_data(s: BuildState) -> None:
    s.dataset = load_dataset(s.project)
    s.report = check_data(s.dataset, s.project.checks, s.project.preprocessing)


def _step_train(s: BuildState) -> None:
    from edgeops_toolchain.train import train_model

    s.trained = train_model(s.project, s.need("dataset"), s.need("report").preprocessing, on_epoch=s.advance)


def _step_export(s: BuildState) -> None:
    ds = s.need("dataset")
    n_features, n_classes = len(ds.feature_names), len(ds.label_names)
    if s.profile.format == "onnx":
        from edgeops_toolchain.onnx_export import export_onnx

        s.fp32_model = export_onnx(s.need("trained").model, n_features, n_classes)
    else:
        from edgeops_toolchain.tflite_export import export_tflite

        s.fp32_model = export_tflite(s.need("trained").model, n_features, n_classes)


def _step_quantize(s: BuildState) -> None:
    fp32 = s.need("fp32_model")
    if s.profile.precision == "fp32":
        s.model, s.io_quant, s.io_dtypes = fp32, (None, None), ("float32", "float32")
        return
    ds, pre = s.need("dataset"), s.need("report").preprocessing
    n = min(s.project.quantization.calibration_samples, ds.x_train.shape[0])
    # Calibrate on a seeded, class-mixed sample of training rows, never on test rows.
    rows = np.random.default_rng(s.project.training.seed).choice(ds.x_train.shape[0], size=n, replace=False)
    calibration = apply_preprocessing(pre, ds.x_train[np.sort(rows)])
    if s.profile.format == "onnx":
        from edgeops_toolchain.onnx_export import io_quantization, quantize_int8

        s.model = quantize_int8(fp32, calibration)
        s.io_quant, s.io_dtypes = io_quantization(s.model), ("float32", "float32")
    else:
        from edgeops_toolchain.tflite_export import quantize_tflite, tflite_io

        s.model = quantize_tflite(s.need("trained").model, calibration, len(ds.label_names))
        (d_in, q_in), (d_out, q_out) = tflite_io(s.model)
        s.io_quant, s.io_dtypes = (q_in, q_out), (d_in, d_out)


def _step_validate(s: BuildState) -> None:
    import torch

    ds, report, trained = s.need("dataset"), s.need("report"), s.need("trained")
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
        raise BudgetExceededError([c for c in budget_checks(profile, _UNMEASURED, unsupported) if c.name == "operator set"])
    x_test = apply_preprocessing(report.preprocessing, ds.x_test)
    with torch.no_grad():
        torch_logits = trained.model(torch.from_numpy(x_test)).numpy()
    float_logits = Evaluator(float_runtime, fp32, profile.threads).predict(x_test)
    s.advance(1, 5)
    deployed = Evaluator(profile.runtime, model, profile.threads)
    logits = deployed.predict(x_test)
    pred_float, pred = float_logits.argmax(axis=1), logits.argmax(axis=1)
    p50, p99 = deployed.latency_ms(x_test)
    s.advance(2, 5)
    extra: dict[str, float] = {}
    if profile.format == "tflite" and profile.precision == "int8":
        extra.update(_runtime_agreement(profile, model, deployed, x_test))
    s.advance(3, 5)
    if deployed.arena_bytes is not None:
        peak = deployed.arena_bytes
        extra["arena_bytes"] = float(peak)
    else:
        peak = measure_peak_memory(model, profile.threads, x_test.shape[1], runtime=profile.runtime, dtype=deployed.spec[0].dtype)
    s.advance(4, 5)
    acc_float = float((pred_float == ds.y_test).mean())
    acc = float((pred == ds.y_test).mean())
    metrics = {
        "accuracy_float": acc_float,
        "accuracy_deployed": acc,
        "accuracy_drop_points": round((acc_float - acc) * 100, 6),
        "top1_agreement": float((pred_float == pred).mean()),
        "parity_max_abs_diff": float(np.abs(torch_logits - float_logits).max()),
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
    s.metrics, s.checks = metrics, checks
    s.prediction_fractions = _fractions(
        deployed.predict(apply_preprocessing(report.preprocessing, ds.x_val)), len(ds.label_names)
    )
    s.test_logits = logits
    s.self_test = _self_test(ds, logits, s.project.self_test_vectors, s.need("io_quant")[1])
    s.advance(5, 5)
    if any(not c.passed for c in checks):
        raise BudgetExceededError(checks)


#: Placeholder metrics for the operator-set row alone (nothing else was measured).
_UNMEASURED: dict[str, float] = dict.fromkeys(
    (
        "model_bytes", "size_ratio", "peak_memory_bytes", "latency_p50_ms", "latency_p99_ms", "latency_estimate_ms",
        "mac_count", "accuracy_float", "accuracy_deployed", "accuracy_drop_points", "top1_agreement", "parity_max_abs_diff",
    ),
    0.0,
)


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


def _self_test(ds: Dataset, logits: np.ndarray, count: int, out_quant: QuantParams | None) -> SelfTest:
    """Held-out rows, at least one per class when possible, with the deployed model's output."""
    first = [int(np.argmax(ds.y_test == c)) for c in range(len(ds.label_names)) if (ds.y_test == c).any()]
    chosen = set(first)
    order = first + [i for i in range(ds.x_test.shape[0]) if i not in chosen]
    picks = order[: min(count, len(order))]
    # int8 outputs move in steps of the output scale; allow two steps for a different CPU's
    # rounding. Float models get a small absolute tolerance.
    atol = 2.0 * out_quant.scale if out_quant is not None else 1e-3
    vectors = tuple(
        SelfTestVector(
            input=tuple(compact_float(v) for v in ds.x_test[i]),
            expected=tuple(compact_float(v) for v in logits[i]),
            label=int(logits[i].argmax()),
        )
        for i in picks
    )
    return SelfTest(atol=atol, vectors=vectors)


def _step_package(s: BuildState) -> None:
    ds, report = s.need("dataset"), s.need("report")
    created = datetime.now(UTC).replace(microsecond=0)
    counter = ReleaseCounter()
    parent = counter.last(s.project.name, s.profile.name)
    q_in, q_out = s.need("io_quant")
    d_in, d_out = s.need("io_dtypes")
    s.manifest = Manifest(
        name=s.project.name,
        version=s.project.version,
        release=(parent or 0) + 1,
        target=s.profile.name,
        runtime=s.profile.runtime,
        model_file=s.profile.model_file,
        precision=s.profile.precision,
        inputs=(TensorSpec("features", d_in, (1, len(ds.feature_names)), q_in),),
        outputs=(TensorSpec("logits", d_out, (1, len(ds.label_names)), q_out),),
        feature_names=ds.feature_names,
        labels=ds.label_names,
        preprocessing=report.preprocessing,
        drift_reference=DriftReference(
            sample_count=int(ds.x_train.shape[0]), features=report.features, prediction_fractions=s.need("prediction_fractions")
        ),
        self_test=s.need("self_test"),
        metrics=s.need("metrics"),
        lineage=Lineage(
            dataset_digest=ds.digest(),
            code_digest=s.project.code_digest(),
            hyperparameters=s.project.hyperparameters(),
            toolchain_version=__version__,
            parent_release=parent,
        ),
        created=format_time(created),
        expires=format_time(created + timedelta(days=s.project.ttl_days)),
    )
    s.members = {"manifest.json": s.manifest.to_json(), s.profile.model_file: s.need("model")}


def _step_sign(s: BuildState) -> None:
    manifest = s.need("manifest")
    stem = manifest.bundle_filename().removesuffix(".edgeops")
    members = s.need("members")
    signature = sign_members(members, s.key, subject=stem)
    data = pack_bundle({**members, "model.sig": signature}, mtime=int(datetime.now(UTC).timestamp()))
    # Verify with the device's code before anything leaves the build.
    verify_bundle(data, [s.trusted])
    # Commit the release before writing: if the write then fails the number is skipped,
    # which devices tolerate; handing the same number out twice they would not.
    ReleaseCounter().commit(manifest.name, manifest.target, manifest.release)
    try:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        path = s.out_dir / manifest.bundle_filename()
        write_atomically(path, data)
    except OSError as exc:
        raise BuildError(f"{s.out_dir}: cannot write the bundle: {exc.strerror or exc}") from exc
    s.bundle_path = path


STEPS: tuple[Step, ...] = (
    Step(
        "data",
        "Check data",
        inputs=("project.data", "project.checks", "project.preprocessing"),
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
        outputs=("metrics", "checks", "self_test", "prediction_fractions", "test_logits"),
        run=_step_validate,
    ),
    Step(
        "package",
        "Package",
        inputs=("model", "metrics", "self_test", "prediction_fractions", "io_quant", "dataset", "report", "project", "target"),
        outputs=("manifest", "members"),
        run=_step_package,
    ),
    Step("sign", "Sign", inputs=("manifest", "members", "key"), outputs=("bundle_path",), run=_step_sign),
)


@dataclass(frozen=True)
class BuildResult:
    """What a successful build produced.

    Attributes:
        public_key: the public key that verifies the bundle, when the build knows its file
            (the development key); ``None`` when the user signed with ``--key``.
    """

    bundle_path: Path
    manifest: Manifest
    checks: Sequence[BudgetCheck]
    timings: dict[str, float]
    signer: str
    public_key: Path | None
    dev_key_created: bool


def run_build(
    project: Project,
    profile: TargetProfile,
    out_dir: Path,
    *,
    key: Path | None = None,
    progress: BuildProgress | None = None,
) -> BuildResult:
    """Build, validate, package and sign ``project`` for ``profile`` into ``out_dir``.

    Args:
        key: private signing key; ``None`` uses (and on first use creates) the dev key.
        progress: receives step progress.

    Raises:
        InputError: bad project, data, model or key (a subclass says which).
        BudgetExceededError: the model breaks a budget; ``checks`` holds every row.
        UnsupportedTargetError: the target's format has no exporter yet.
        BuildError: anything else that stops the build.
    """
    if profile.runtime not in _RUNTIMES:
        raise UnsupportedTargetError(
            f"target {profile.name!r} runs {profile.runtime}; this toolchain builds for {', '.join(_RUNTIMES)}"
        )
    public: Path | None = None
    created = False
    if key is None:
        pair, created = dev_key()
        key, public = pair.private, pair.public
    trusted = load_signing_key(key)  # fail before an expensive build, not after it
    state = BuildState(
        project=project, profile=profile, out_dir=out_dir, key=key, trusted=trusted, progress=progress or _Silent()
    )
    for step in STEPS:
        state.current = step
        state.progress.step_started(step)
        start = time.perf_counter()
        step.run(state)
        missing = [name for name in step.outputs if getattr(state, name) is None]
        if missing:  # a step that does not keep its declaration is a bug
            raise BuildError(f"internal: step {step.name!r} did not produce {', '.join(missing)}")
        state.timings[step.name] = time.perf_counter() - start
        state.progress.step_finished(step, state.timings[step.name])
    return BuildResult(
        bundle_path=state.need("bundle_path"),
        manifest=state.need("manifest"),
        checks=state.need("checks"),
        timings=state.timings,
        signer=trusted.fingerprint,
        public_key=public,
        dev_key_created=created,
    )
