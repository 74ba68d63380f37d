"""Tasks: what a model's outputs mean, and how a build measures them (``[task]``, docs/projects.md).

* ``classification``: one logit per class; accuracy (the pipeline's own rows).
* ``regression``: one value per output (the data's ``label_names`` name the outputs); the
  mean absolute error of the float and the deployed model on the test split, and its increase
  from quantization in percent of the float MAE (budget ``max_mae_increase_percent``).
* ``anomaly``: one score, higher = more anomalous. Each model (float and deployed) gets its own
  threshold, the score quantile at ``1 - target_fpr`` of its scores on the normal rows of
  x_val (:func:`fit_threshold`); the false-positive rate is measured on the normal rows of
  x_test and the detection rate on its other (fault) rows, overall and per fault class
  (budget ``max_detection_drop_points``). The deployed model's threshold goes into the
  manifest (``task.threshold``).

A regression's and an anomaly model's drift reference describes their outputs
(:func:`output_reference`), with the decile method of the input features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgeops_core import FeatureReference, QuantParams, TargetProfile
from edgeops_toolchain.data import feature_reference
from edgeops_toolchain.errors import BuildError
from edgeops_toolchain.project import TaskConfig
from edgeops_toolchain.validate import BudgetCheck, format_value

__all__ = [
    "ANOMALY_CALIBRATION_EXTRA",
    "ANOMALY_SCORE_NAME",
    "anomaly_calibration",
    "anomaly_metrics",
    "fit_threshold",
    "int8_ceiling",
    "min_normal_rows",
    "output_count",
    "output_labels",
    "output_reference",
    "regression_metrics",
    "task_checks",
    "validation_metric",
]

#: The manifest's one label of an anomaly model: the name of its score output.
ANOMALY_SCORE_NAME = "anomaly_score"
#: Largest value of an int8 tensor.
_INT8_MAX = 127


def output_count(task: TaskConfig, label_names: Sequence[str]) -> int:
    """How many numbers the model returns per sample: classes, regression outputs, or 1 (the score)."""
    return 1 if task.kind == "anomaly" else len(label_names)


def output_labels(task: TaskConfig, label_names: Sequence[str]) -> tuple[str, ...]:
    """The manifest's ``labels``: class names, output names, or ``("anomaly_score",)``."""
    return (ANOMALY_SCORE_NAME,) if task.kind == "anomaly" else tuple(label_names)


def validation_metric(task: TaskConfig, outputs: np.ndarray, y: np.ndarray, label_names: Sequence[str]) -> float:
    """The training curve's validation number: accuracy, MAE, or the mean score of the normal rows."""
    if task.kind == "regression":
        return float(np.abs(outputs - y).mean())
    if task.kind == "anomaly":
        normal = y == list(label_names).index(task.normal_label)
        return float(outputs[normal].mean()) if normal.any() else 0.0
    return float((outputs.argmax(axis=1) == y).mean())


def min_normal_rows(target_fpr: float) -> int:
    """Normal validation rows needed to fit a threshold at ``target_fpr``: ``ceil(1 / target_fpr)``."""
    return math.ceil(1.0 / target_fpr - 1e-9)


def fit_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The score above which at most ``target_fpr`` of ``scores`` (normal rows) lie.

    It is the empirical quantile at ``1 - target_fpr`` taken as one of the scores (the
    ``n - 1 - floor(n * target_fpr)``-th smallest), so on these rows the share strictly above
    it is at most ``target_fpr``, also when scores tie (int8 scores take few values).

    Raises:
        BuildError: fewer than :func:`min_normal_rows` scores (the data step checks this
            first, naming the split; reaching it here is a bug).
    """
    n = int(scores.shape[0])
    if n < min_normal_rows(target_fpr):
        raise BuildError(
            f"internal: {n} normal validation rows cannot fit an anomaly threshold at target_fpr {target_fpr:g} "
            f"(need {min_normal_rows(target_fpr)})"
        )
    allowed = math.floor(n * target_fpr + 1e-9)
    return float(np.sort(scores.astype(np.float64).reshape(-1))[n - 1 - allowed])


def int8_ceiling(out_quant: QuantParams | None) -> float | None:
    """The largest score an int8 output can represent (where a saturated score sits), or ``None``."""
    if out_quant is None:
        return None
    return out_quant.scale * (_INT8_MAX - out_quant.zero_point)


def regression_metrics(names: Sequence[str], y: np.ndarray, floating: np.ndarray, deployed: np.ndarray) -> dict[str, float]:
    """MAE of the float and the deployed model on ``y`` ``[rows, outputs]``, overall and per output.

    Keys: ``mae_float``, ``mae_deployed``, ``mae_increase_percent`` (of the float MAE),
    ``mae_float.<output>``, ``mae_deployed.<output>`` and ``output_max_abs_diff`` (float vs
    deployed).
    """
    err_f, err_d = np.abs(floating.astype(np.float64) - y), np.abs(deployed.astype(np.float64) - y)
    mae_f, mae_d = float(err_f.mean()), float(err_d.mean())
    metrics = {"mae_float": mae_f, "mae_deployed": mae_d}
    increases = []
    for j, name in enumerate(names):
        f, d = float(err_f[:, j].mean()), float(err_d[:, j].mean())
        metrics[f"mae_float.{name}"], metrics[f"mae_deployed.{name}"] = f, d
        # Per output, each against its own float MAE: one int8 output scale serves every output,
        # so a small-valued output can be ruined while the pooled MAE barely moves.
        metrics[f"mae_increase_percent.{name}"] = round(_increase(f, d), 6)
        increases.append(metrics[f"mae_increase_percent.{name}"])
    metrics["mae_increase_percent"] = max(increases)
    metrics["output_max_abs_diff"] = float(np.abs(floating.astype(np.float64) - deployed).max())
    return metrics


def _increase(mae_float: float, mae_deployed: float) -> float:
    """``mae_deployed`` over ``mae_float`` in percent; a float model with no error at all makes
    any deployed error an unbounded increase, kept finite."""
    if mae_float > 0:
        return (mae_deployed - mae_float) / mae_float * 100.0
    return 0.0 if mae_deployed == 0 else 1e9


def anomaly_metrics(
    task: TaskConfig,
    label_names: Sequence[str],
    *,
    y_val: np.ndarray,
    y_test: np.ndarray,
    val_float: np.ndarray,
    val_deployed: np.ndarray,
    test_float: np.ndarray,
    test_deployed: np.ndarray,
) -> dict[str, float]:
    """Thresholds, FPR and detection rates of the float and the deployed model (module docstring).

    Keys (plain ``str -> float``): ``anomaly_threshold`` (the deployed model's, the manifest's
    ``task.threshold``), ``anomaly_threshold_float``, ``anomaly_target_fpr``,
    ``anomaly_fpr_{float,deployed}``, ``anomaly_detection_rate_{float,deployed}``,
    ``anomaly_detection_rate_{float,deployed}.<fault label>``, ``anomaly_verdict_agreement``
    (share of test rows both models judge alike) and the row counts.
    """
    normal = list(label_names).index(task.normal_label)
    val_normal = y_val == normal
    test_normal, test_fault = y_test == normal, y_test != normal
    metrics: dict[str, float] = {"anomaly_target_fpr": task.target_fpr}
    verdicts = {}
    for which, val, test in (("float", val_float, test_float), ("deployed", val_deployed, test_deployed)):
        threshold = fit_threshold(val[val_normal, 0], task.target_fpr)
        flagged = test[:, 0] > threshold
        verdicts[which] = flagged
        # Kept exact (a float32 score, as a double), never rounded to fewer digits: the device
        # compares its float32 score with it as a double, and a threshold rounded below the
        # score level it was fitted at would flag every row tied at that level (int8 scores tie).
        metrics["anomaly_threshold" if which == "deployed" else "anomaly_threshold_float"] = threshold
        metrics[f"anomaly_fpr_{which}"] = float(flagged[test_normal].mean())
        metrics[f"anomaly_detection_rate_{which}"] = float(flagged[test_fault].mean())
        for c, name in enumerate(label_names):
            if c != normal and (y_test == c).any():
                metrics[f"anomaly_detection_rate_{which}.{name}"] = float(flagged[y_test == c].mean())
    metrics["anomaly_detection_drop_points"] = round(
        (metrics["anomaly_detection_rate_float"] - metrics["anomaly_detection_rate_deployed"]) * 100, 6
    )
    metrics["anomaly_verdict_agreement"] = float((verdicts["float"] == verdicts["deployed"]).mean())
    metrics["anomaly_normal_val_rows"] = float(val_normal.sum())
    metrics["anomaly_normal_test_rows"] = float(test_normal.sum())
    metrics["anomaly_fault_test_rows"] = float(test_fault.sum())
    return metrics


#: Share of an anomaly model's calibration rows that are decorrelated normal rows (see
#: :func:`anomaly_calibration`).
ANOMALY_CALIBRATION_EXTRA = 0.125


def anomaly_calibration(rows: np.ndarray, seed: int) -> np.ndarray:
    """An anomaly model's int8 calibration rows: ``rows`` plus decorrelated copies of them.

    Why: int8 activations keep the range they see during calibration. Calibrated on normal
    rows alone (an anomaly project's training split is often nothing else), the score output
    tops out at about the largest normal training score, which lies near or even below the
    threshold fitted on held-out normal rows; every fault would then saturate at a value that
    is not above the threshold, and nothing would be detected. The extra rows take each
    value of a sample from a different random row: every input value stays within its
    calibrated range, but the joint structure the model learned is gone, so they score like
    strong anomalies and stretch the score's range (and the reconstruction's) well above the
    threshold. A fault that still saturates then reads as a score above the threshold; the
    ``score headroom`` row checks that this holds. ``rows`` themselves are kept first.
    """
    rng = np.random.default_rng(seed)
    n = max(1, round(rows.shape[0] * ANOMALY_CALIBRATION_EXTRA))
    flat = rows.reshape(rows.shape[0], -1)
    picks = rng.integers(0, rows.shape[0], size=(n, flat.shape[1]))
    extra = np.take_along_axis(flat, picks, axis=0).reshape((n, *rows.shape[1:]))
    return np.concatenate([rows, extra]).astype(np.float32)


def output_reference(outputs: np.ndarray, names: Sequence[str]) -> tuple[FeatureReference, ...]:
    """Drift statistics of each model output (``drift_reference.outputs``), like the input features'."""
    return feature_reference(outputs.astype(np.float32), tuple(names))


def task_checks(
    task: TaskConfig, profile: TargetProfile, metrics: dict[str, float], out_quant: QuantParams | None
) -> list[BudgetCheck]:
    """The closing-table rows of a regression or an anomaly model (none for a classifier).

    Every row that can fail names the task, so a failed build says which task's budget broke.
    """
    b, precision = profile.budgets, profile.precision
    if task.kind == "regression":
        limit = b.max_mae_increase_percent
        worst = max(
            (k.removeprefix("mae_increase_percent.") for k in metrics if k.startswith("mae_increase_percent.")),
            key=lambda name: metrics[f"mae_increase_percent.{name}"],
            default="",
        )
        mae_rows = [
            BudgetCheck("MAE (float)", metrics["mae_float"], None, "", "info", detail=f"{metrics['mae_float']:.4g}"),
            BudgetCheck(f"MAE ({precision})", metrics["mae_deployed"], None, "", "info", detail=f"{metrics['mae_deployed']:.4g}"),
        ]
        if task.max_mae is not None:
            mae_rows.append(
                BudgetCheck(
                    "MAE (regression)",
                    metrics["mae_deployed"],
                    task.max_mae,
                    "",
                    "max",
                    detail=f"{metrics['mae_deployed']:.4g}",
                    limit_detail=f"<= {task.max_mae:g} (task.max_mae)",
                )
            )
        mae_rows.append(
            BudgetCheck(
                "MAE increase (regression)",
                metrics["mae_increase_percent"],
                limit,
                "",
                "max",
                detail=f"{metrics['mae_increase_percent']:.2f} % of float MAE" + (f" ({worst}, worst output)" if worst else ""),
                limit_detail=f"<= {limit:g} %",
            )
        )
        return mae_rows
    if task.kind != "anomaly":
        return []
    rows = [
        BudgetCheck(
            "anomaly threshold",
            metrics["anomaly_threshold"],
            None,
            "",
            "info",
            detail=f"{metrics['anomaly_threshold']:.4g} (float {metrics['anomaly_threshold_float']:.4g}), "
            f"fitted to FPR {task.target_fpr:.2%}",
        )
    ]
    for which, name in (("float", "float"), ("deployed", precision)):
        rate, fpr = metrics[f"anomaly_detection_rate_{which}"], metrics[f"anomaly_fpr_{which}"]
        rows.append(
            BudgetCheck(
                f"detection @ FPR ({name})",
                rate,
                None,
                "%",
                "info",
                detail=f"{format_value(rate, '%')} at FPR {format_value(fpr, '%')}",
            )
        )
    fpr, limit = metrics["anomaly_fpr_deployed"], task.fpr_limit
    rows.append(
        BudgetCheck(
            "false positives (anomaly)",
            fpr,
            limit,
            "%",
            "max",
            detail=f"{format_value(fpr, '%')} of held-out normal rows",
            limit_detail=f"<= {format_value(limit, '%')} (task.max_fpr)",
        )
    )
    if task.min_detection_rate > 0:
        rate = metrics["anomaly_detection_rate_deployed"]
        rows.append(
            BudgetCheck(
                "detection rate (anomaly)",
                rate,
                task.min_detection_rate,
                "%",
                "min",
                limit_detail=f">= {format_value(task.min_detection_rate, '%')} (task.min_detection_rate)",
            )
        )
    rows.append(
        BudgetCheck(
            "detection drop (anomaly)", metrics["anomaly_detection_drop_points"], b.max_detection_drop_points, "pt", "max"
        )
    )
    ceiling = int8_ceiling(out_quant)
    if ceiling is not None and out_quant is not None:
        # A fault whose score saturates the int8 output reads as the ceiling: it is flagged only
        # while the ceiling is above the threshold, by at least one output step.
        rows.append(
            BudgetCheck(
                "score headroom (anomaly)",
                metrics["anomaly_threshold"],
                ceiling - 0.5 * out_quant.scale,
                "",
                "max",
                detail=f"threshold {metrics['anomaly_threshold']:.4g}",
                limit_detail=f"< int8 ceiling {ceiling:.4g}",
            )
        )
    return rows
