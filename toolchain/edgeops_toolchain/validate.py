"""Validation: measure the deployable model and hold it to the target's budgets.

Everything is measured on the real runtime with the profile's thread count:

* accuracy of the float and the deployed model on the held-out test split, their top-1
  agreement, and torch-vs-ONNX parity of the float export;
* size of the model file (and of the float model, for the compression ratio);
* peak memory: a fresh interpreter loads the runtime, resets its high-water mark
  (``/proc/self/clear_refs``), creates the session and runs it; the growth of ``VmHWM`` is
  what the model costs in RAM on top of the process;
* latency p50/p99 of single-sample inference, and an estimate from the MAC count at the
  profile's assumed throughput;
* the operator set against the profile's list.

:func:`budget_checks` turns the measurements into pass/fail rows; the build fails if any
fails, after all are measured, so the user sees every problem at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeops_core import TargetProfile
from edgeops_toolchain.errors import BuildError

__all__ = ["PARITY_ATOL", "BudgetCheck", "OnnxEvaluator", "budget_checks", "format_value", "measure_peak_memory"]

#: Largest accepted |torch - ONNX| logit difference of the float export.
PARITY_ATOL = 1e-3
LATENCY_WARMUP = 30
LATENCY_RUNS = 300


@dataclass(frozen=True)
class BudgetCheck:
    """One row of the closing table.

    ``kind`` is ``max`` (measured must be <= limit), ``min`` (>= limit) or ``info`` (shown,
    never fails).
    """

    name: str
    measured: float
    limit: float | None
    unit: str
    kind: str
    detail: str = ""
    limit_detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the measured value is within the limit (info rows always pass)."""
        if self.kind == "info" or self.limit is None:
            return True
        return self.measured <= self.limit if self.kind == "max" else self.measured >= self.limit

    @property
    def measured_text(self) -> str:
        """The measured value as shown in the table."""
        return self.detail or format_value(self.measured, self.unit)

    @property
    def limit_text(self) -> str:
        """The limit as shown in the table (``-`` for info rows)."""
        if self.limit_detail:
            return self.limit_detail
        if self.limit is None:
            return "-"
        return ("<= " if self.kind == "max" else ">= ") + format_value(self.limit, self.unit)

    def to_dict(self) -> dict[str, object]:
        """The row as JSON-ready data (``--json`` output)."""
        return {
            "name": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "kind": self.kind,
            "passed": self.passed,
            "measured_text": self.measured_text,
            "limit_text": self.limit_text,
        }


def format_value(value: float, unit: str) -> str:
    """Human form of a measured value in ``unit`` (bytes, %, ms, x, pt, ops)."""
    if unit == "bytes":
        return f"{value / 1024:.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:.2f} MiB"
    if unit == "%":
        return f"{value * 100:.2f} %"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "x":
        return f"{value:.3f} x"
    if unit == "pt":
        return f"{value:.2f} pt"
    if unit == "ops":
        return f"{int(value)}"
    return f"{value:.3g} {unit}".strip()


class OnnxEvaluator:
    """Runs an ONNX model in onnxruntime the way the device will (threads, batch 1)."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BuildError(f"onnxruntime cannot load the model: {exc}") from exc
        self._input = self._session.get_inputs()[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs for preprocessed rows ``[n, features]``, one inference per row."""
        rows = [self._session.run(None, {self._input: x[i : i + 1]})[0] for i in range(x.shape[0])]
        return np.concatenate(rows, axis=0).astype(np.float32)

    def latency_ms(self, x: np.ndarray) -> tuple[float, float]:
        """``(p50, p99)`` of single-row latency in milliseconds."""
        row = x[:1]
        for _ in range(LATENCY_WARMUP):
            self._session.run(None, {self._input: row})
        samples = []
        for i in range(LATENCY_RUNS):
            row = x[i % x.shape[0] : i % x.shape[0] + 1]
            start = time.perf_counter_ns()
            self._session.run(None, {self._input: row})
            samples.append((time.perf_counter_ns() - start) / 1e6)
        return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


_PROBE = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status():
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.zeros((1, n), dtype=np.float32)
before = status()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS
with open(path, "rb") as fh:
    model = fh.read()  # the model's bytes count too
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for _ in range(50):
    session.run(None, {name: x})
after = status()
# File-backed pages (the runtime's shared-library code) depend on what the page cache
# holds, not on the model; count the growth of everything else at its peak.
file_growth = after["RssFile"] - before["RssFile"]
print(json.dumps({"peak_bytes": after["VmHWM"] - before["VmRSS"] - file_growth, "file_bytes": file_growth}))
"""


def measure_peak_memory(model: bytes, threads: int, n_features: int) -> int:
    """Peak RAM (bytes) that loading and running ``model`` in onnxruntime adds to a process.

    Anonymous memory only (heap, arena, tensors, the model's bytes): the runtime library's
    file-backed code pages are excluded, since how many of them a process maps depends on
    the page cache, not on the model.

    Raises:
        BuildError: the probe process failed (the message carries its stderr).
    """
    with tempfile.TemporaryDirectory(prefix="edgeops-mem-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(threads), str(n_features)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BuildError(f"peak-memory probe failed: {tail[0]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def budget_checks(profile: TargetProfile, metrics: Mapping[str, float], unsupported_ops: Sequence[str]) -> list[BudgetCheck]:
    """The closing-table rows for ``metrics`` against ``profile``'s budgets."""
    b = profile.budgets
    return [
        BudgetCheck("model size", metrics["model_bytes"], b.model_bytes, "bytes", "max"),
        BudgetCheck("size vs fp32", metrics["size_ratio"], None, "x", "info"),
        BudgetCheck("peak RAM", metrics["peak_memory_bytes"], b.ram_bytes, "bytes", "max"),
        BudgetCheck(f"latency p50 (host, {profile.threads} thr)", metrics["latency_p50_ms"], None, "ms", "info"),
        BudgetCheck(f"latency p99 (host, {profile.threads} thr)", metrics["latency_p99_ms"], b.latency_ms, "ms", "max"),
        BudgetCheck(
            "latency estimate (MACs)",
            metrics["latency_estimate_ms"],
            b.latency_ms,
            "ms",
            "max",
            detail=f"{metrics['latency_estimate_ms']:.3f} ms ({int(metrics['mac_count'])} MACs)",
        ),
        BudgetCheck("accuracy (float)", metrics["accuracy_float"], None, "%", "info"),
        BudgetCheck(f"accuracy ({profile.precision})", metrics["accuracy_deployed"], b.min_accuracy, "%", "min"),
        BudgetCheck("accuracy drop", metrics["accuracy_drop_points"], b.max_accuracy_drop_points, "pt", "max"),
        BudgetCheck("top-1 agreement", metrics["top1_agreement"], None, "%", "info"),
        BudgetCheck(
            "torch/ONNX parity",
            metrics["parity_max_abs_diff"],
            PARITY_ATOL,
            "",
            "max",
            detail=f"max |diff| {metrics['parity_max_abs_diff']:.2e}",
        ),
        BudgetCheck(
            "operator set",
            float(len(unsupported_ops)),
            0,
            "ops",
            "max",
            detail="all supported" if not unsupported_ops else "unsupported: " + ", ".join(sorted(unsupported_ops)),
            limit_detail="profile's list",
        ),
    ]
