"""The build report: one self-contained ``report.html`` beside each bundle.

Self-contained means it opens from a USB stick on an air-gapped laptop: plots are PNGs
embedded as ``data:`` URIs, the style sheet is inline, and there is no script and no
network reference. Plots are made with matplotlib's non-interactive Agg backend.

Sections: the bundle's identity; every budget measured vs limit; the task's quality on the
held-out split (a classifier: float vs deployed accuracy, per-class accuracy and the
confusion matrix; a regression: the MAE of each output, float and deployed, and the error
histogram; an anomaly model: threshold, false-positive rate, the detection rate of each fault
class, float and deployed, and the score histogram); the latency histogram of single-row
inference; and the training distribution of every input feature with the reference bin
edges the device's drift detector uses.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeops_core import Manifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from edgeops_toolchain.validate import BudgetCheck

__all__ = ["MAX_FEATURE_PLOTS", "ReportInputs", "render_report"]

#: Feature histograms drawn at most (the table lists every feature).
MAX_FEATURE_PLOTS = 128


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows, gathered by the pipeline."""

    manifest: Manifest
    checks: Sequence[BudgetCheck]
    y_test: np.ndarray
    test_logits: np.ndarray
    latency_ms: np.ndarray
    x_train: np.ndarray
    bundle_sha256: str
    signer: str
    #: The data's class names (an anomaly model's manifest labels only its score); empty: the manifest's labels.
    class_names: tuple[str, ...] = ()
    #: An anomaly project's ``task.normal_label``.
    normal_label: str = "normal"


def render_report(r: ReportInputs) -> bytes:
    """The report as UTF-8 HTML bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    m = r.manifest
    parts = [
        _HEAD.format(title=html.escape(f"{m.name} {m.version} release {m.release} → {m.target}")),
        f"<h1>{html.escape(m.name)} {html.escape(m.version)} <small>release {m.release} → {html.escape(m.target)}</small></h1>",
        _identity(r),
        "<h2>Budgets</h2>",
        _budgets(r.checks),
        *_quality(r),
        "<h2>Latency</h2>",
        f"<p>{r.latency_ms.size} single-row inferences on the build host at the profile's "
        f"{int(m.metrics.get('threads', 1))} thread(s), input conversion included. "
        f"p50 {np.percentile(r.latency_ms, 50):.3f} ms, p99 {np.percentile(r.latency_ms, 99):.3f} ms.</p>",
        f'<div class="plots"><img alt="latency histogram" src="{_png(_latency_plot(r.latency_ms))}"></div>',
        "<h2>Input features</h2>",
        _features_text(m, r.x_train),
        f'<div class="plots"><img alt="feature histograms" src="{_png(_feature_plot(m, r.x_train))}"></div>',
        _feature_table(m),
        "</body></html>\n",
    ]
    return "\n".join(parts).encode("utf-8")


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d1d1f; padding: 0 1em; }}
h1 small {{ color: #666; font-weight: normal; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.pass {{ color: #137333; }} .fail {{ color: #b00020; font-weight: bold; }} .info {{ color: #666; }}
.plots img {{ max-width: 100%; border: 1px solid #eee; }}
code {{ font-size: 12px; }}
</style></head><body>"""


def _identity(r: ReportInputs) -> str:
    m = r.manifest
    rows = [
        ("target", f"{m.target} ({m.runtime}, {m.precision})"),
        ("model file", f"{m.model_file}, {int(m.metrics.get('model_bytes', 0)):,} bytes"),
        ("bundle sha256", f"<code>{r.bundle_sha256}</code>"),
        ("signer", f"<code>{html.escape(r.signer)}</code>"),
        ("created / expires", f"{m.created} / {m.expires}"),
        ("dataset digest", f"<code>{m.lineage.dataset_digest}</code>"),
        ("code digest", f"<code>{m.lineage.code_digest}</code>"),
        ("parent release", str(m.lineage.parent_release) if m.lineage.parent_release is not None else "none"),
        ("toolchain", html.escape(m.lineage.toolchain_version)),
    ]
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _budgets(checks: Sequence[BudgetCheck]) -> str:
    rows = []
    for c in checks:
        cls, word = ("info", "info") if c.kind == "info" else (("pass", "pass") if c.passed else ("fail", "FAIL"))
        rows.append(
            f"<tr><td>{html.escape(c.name)}</td><td class=num>{html.escape(c.measured_text)}</td>"
            f"<td class=num>{html.escape(c.limit_text)}</td><td class={cls}>{word}</td></tr>"
        )
    return "<table><tr><th>budget</th><th>measured</th><th>limit</th><th>result</th></tr>" + "".join(rows) + "</table>"


def _quality(r: ReportInputs) -> list[str]:
    """The task's section: what the model's outputs are worth on the held-out split."""
    m = r.manifest
    if m.task.kind == "regression":
        return ["<h2>Error on the held-out split</h2>", _regression(m), _plot_div("absolute error", _error_plot(r))]
    if m.task.kind == "anomaly":
        return ["<h2>Anomaly detection on the held-out split</h2>", _anomaly(r), _plot_div("anomaly scores", _score_plot(r))]
    labels = list(m.labels)
    pred = r.test_logits.argmax(axis=1)
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (r.y_test.astype(np.int64), pred), 1)
    per_class = [
        (labels[c], int(confusion[c].sum()), float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else float("nan"))
        for c in range(n)
    ]
    return [
        "<h2>Accuracy on the held-out split</h2>",
        _accuracy(m, per_class),
        _plot_div("confusion matrix", _confusion_plot(confusion, labels)),
    ]


def _plot_div(alt: str, fig: Figure) -> str:
    return f'<div class="plots"><img alt="{alt}" src="{_png(fig)}"></div>'


def _regression(m: Manifest) -> str:
    mt = m.metrics
    head = (
        f"<p>Mean absolute error over every output: float {mt['mae_float']:.4g}, {html.escape(m.precision)} "
        f"{mt['mae_deployed']:.4g} (+{mt['mae_increase_percent']:.2f} % from quantization) on "
        f"{int(mt['test_samples'])} held-out samples.</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{mt[f'mae_float.{name}']:.4g}</td>"
        f"<td class=num>{mt[f'mae_deployed.{name}']:.4g}</td></tr>"
        for name in m.labels
    )
    return head + f"<table><tr><th>output</th><th>MAE (float)</th><th>MAE ({html.escape(m.precision)})</th></tr>{rows}</table>"


def _anomaly(r: ReportInputs) -> str:
    m, mt = r.manifest, r.manifest.metrics
    names = r.class_names or tuple(m.labels)
    head = (
        f"<p>Threshold {mt['anomaly_threshold']:.4g} ({html.escape(m.precision)}; float model "
        f"{mt['anomaly_threshold_float']:.4g}): each model's score quantile at 1 − {mt['anomaly_target_fpr']:g} on its "
        f"{int(mt['anomaly_normal_val_rows'])} normal validation rows ({html.escape(r.normal_label)!s}). "
        f"On {int(mt['anomaly_normal_test_rows'])} held-out normal rows the false-positive rate is "
        f"{mt['anomaly_fpr_float'] * 100:.2f} % (float) and {mt['anomaly_fpr_deployed'] * 100:.2f} % "
        f"({html.escape(m.precision)}); on {int(mt['anomaly_fault_test_rows'])} fault rows the detection rate is "
        f"{mt['anomaly_detection_rate_float'] * 100:.2f} % (float) and {mt['anomaly_detection_rate_deployed'] * 100:.2f} % "
        f"({html.escape(m.precision)}).</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{int((r.y_test == c).sum())}</td>"
        f"<td class=num>{mt[f'anomaly_detection_rate_float.{name}'] * 100:.2f} %</td>"
        f"<td class=num>{mt[f'anomaly_detection_rate_deployed.{name}'] * 100:.2f} %</td></tr>"
        for c, name in enumerate(names)
        if f"anomaly_detection_rate_deployed.{name}" in mt
    )
    return head + (
        f"<table><tr><th>fault class</th><th>samples</th><th>detected (float)</th><th>detected ({html.escape(m.precision)})"
        f"</th></tr>{rows}</table>"
    )


def _error_plot(r: ReportInputs) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    errors = np.abs(r.test_logits.astype(np.float64) - r.y_test.reshape(r.test_logits.shape))
    for j, name in enumerate(list(r.manifest.labels)[:8]):
        ax.hist(errors[:, j], bins=40, histtype="step", label=name)
    ax.set_xlabel(f"|deployed output − target| ({r.manifest.precision})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _score_plot(r: ReportInputs) -> Figure:
    import matplotlib.pyplot as plt

    names = r.class_names or tuple(r.manifest.labels)
    normal = names.index(r.normal_label) if r.normal_label in names else 0
    scores = r.test_logits[:, 0].astype(np.float64)
    fig, ax = plt.subplots(figsize=(7, 3))
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 60)
    for c, name in enumerate(names):
        if (r.y_test == c).any():
            ax.hist(scores[r.y_test == c], bins=list(bins), histtype="step", label=name, linewidth=2.0 if c == normal else 1.0)
    ax.axvline(r.manifest.task.threshold or 0.0, color="black", linestyle="--", label="threshold")
    ax.set_yscale("log")
    ax.set_xlabel(f"anomaly score ({r.manifest.precision}) on the held-out split")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _accuracy(m: Manifest, per_class: list[tuple[str, int, float]]) -> str:
    mt = m.metrics
    head = (
        f"<p>float {mt['accuracy_float'] * 100:.2f} %, {html.escape(m.precision)} {mt['accuracy_deployed'] * 100:.2f} % "
        f"(drop {mt['accuracy_drop_points']:.2f} points), top-1 agreement {mt['top1_agreement'] * 100:.2f} % "
        f"on {int(mt['test_samples'])} held-out samples.</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{count}</td><td class=num>{acc * 100:.2f} %</td></tr>"
        for name, count, acc in per_class
    )
    return head + f"<table><tr><th>class</th><th>samples</th><th>accuracy ({html.escape(m.precision)})</th></tr>{rows}</table>"


def _features_text(m: Manifest, x: np.ndarray) -> str:
    shown = min(len(m.feature_names), MAX_FEATURE_PLOTS)
    more = f" (the first {shown} of {len(m.feature_names)} are drawn)" if shown < len(m.feature_names) else ""
    return (
        f"<p>Distribution of each input feature over the {x.shape[0]} training samples{more}; the red lines are the "
        "reference bin edges that the device's drift detector compares live inputs against.</p>"
    )


def _feature_table(m: Manifest) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(f.name)}</td><td class=num>{f.mean:.4g}</td><td class=num>{f.std:.4g}</td>"
        f"<td class=num>{f.min:.4g}</td><td class=num>{f.max:.4g}</td></tr>"
        for f in m.drift_reference.features
    )
    return f"<table><tr><th>feature</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>{rows}</table>"


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _confusion_plot(confusion: np.ndarray, labels: list[str]) -> Figure:
    import matplotlib.pyplot as plt

    n = len(labels)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (deployed model)")
    top = confusion.max() or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", color="white" if confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def _latency_plot(samples: np.ndarray) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(samples, bins=40, color="#4a7ab7")
    for q, style in ((50, "-"), (99, "--")):
        ax.axvline(float(np.percentile(samples, q)), color="black", linestyle=style, label=f"p{q}")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("inferences")
    ax.legend()
    fig.tight_layout()
    return fig


def _feature_plot(m: Manifest, x: np.ndarray) -> Figure:
    """Small multiples of every feature's histogram, drawn in one Axes.

    One subplot per feature costs matplotlib about 70 ms each (ticks, layout); a grid of
    cells in a single Axes draws a hundred features in well under a second.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    feats = m.drift_reference.features[:MAX_FEATURE_PLOTS]
    cols = 8
    rows = (len(feats) + cols - 1) // cols
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.1))
    hist_lines, edge_lines = [], []
    for k, f in enumerate(feats):
        cx, cy = k % cols, rows - 1 - k // cols
        column = x[:, k]
        lo, hi = float(column.min()), float(column.max())
        span = hi - lo or 1.0
        counts, edges = np.histogram(column, bins=24, range=(lo, lo + span))
        h = counts / (counts.max() or 1) * 0.62
        xs = cx + 0.05 + (edges - lo) / span * 0.9
        step_x = np.repeat(xs, 2)[1:-1]
        step_y = cy + 0.08 + np.repeat(h, 2)
        hist_lines.append(np.column_stack([np.r_[step_x[0], step_x, step_x[-1]], np.r_[cy + 0.08, step_y, cy + 0.08]]))
        for edge in f.bin_edges:
            ex = cx + 0.05 + (edge - lo) / span * 0.9
            edge_lines.append([(ex, cy + 0.08), (ex, cy + 0.74)])
        ax.text(cx + 0.5, cy + 0.8, f.name, ha="center", va="bottom", fontsize=6)
    ax.add_collection(LineCollection(edge_lines, colors="#c0392b", linewidths=0.4))
    ax.add_collection(LineCollection(hist_lines, colors="#2c5d9e", linewidths=0.8))
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    return fig
