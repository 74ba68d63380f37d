"""``demo-report.html``: what ``edgeops demo`` saw, as one self-contained page (inline SVG, no scripts).

Three charts share one time axis (seconds since the devices started), with the demo's
moments drawn across all of them: the shift, the first drift alarm, the autopilot's trigger,
the build, each rollout wave, the recovery.

1. Accuracy against the simulator's ground truth, per cohort, in 5-second buckets.
2. The drift score (``max_psi`` of each device's detector), one line per device.
3. The release each device serves, one row per device (colour = release; a dot = alarm on).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

_W, _PAD_L, _PAD_R = 1000, 60, 20
_BUCKET_S = 5.0
_COHORT_COLOURS = {"line-a": "#5f6368", "line-b": "#d93025"}
_RELEASE_COLOURS = ("#9aa0a6", "#1a73e8", "#188038", "#e37400", "#a142f4", "#12b5cb")
_MARKS = (
    ("shift", "shift", "#d93025"),
    ("first_alarm", "first alarm", "#e37400"),
    ("triggered", "retrain triggered", "#a142f4"),
    ("built", "challenger built", "#1a73e8"),
    ("rollout", "rollout", "#188038"),
    ("recovered", "recovered", "#137333"),
)


def write_report(path: Path, summary: Mapping[str, Any], timeline: Any) -> Path:
    """Write the page to ``path``; its path."""
    rows: dict[str, list[dict[str, Any]]] = timeline.rows
    t0 = summary.get("t0") or 0.0
    end = max((float(r["t"]) for rs in rows.values() for r in rs), default=1.0)
    marks = _marks(summary, t0)
    body = [
        _HEAD,
        "<h1>edgeops demo <small>shift → drift alarm → field samples → retrain → staged rollout → recovery</small></h1>",
        _summary_table(summary),
        "<h2>Accuracy against ground truth (5 s buckets)</h2>",
        _accuracy_chart(rows, end, marks),
        "<h2>Drift score per device (max PSI of the detector's window)</h2>",
        _psi_chart(rows, end, marks),
        "<h2>Release per device (● drift alarm on)</h2>",
        _release_chart(rows, end, marks),
        _run_section(summary),
        "<h2>Raw</h2><details><summary>demo-summary.json</summary><pre>",
        html.escape(json.dumps({k: v for k, v in summary.items() if k != "marks_epoch"}, indent=2, default=str)),
        "</pre></details></body></html>",
    ]
    path.write_text("\n".join(body), encoding="utf-8")
    return path


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeops demo report</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1060px; color: #1d1d1f; padding: 0 1em; }
h1 small { color: #666; font-weight: normal; font-size: 60%; display: block; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; vertical-align: top; }
.ok { color: #137333; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
svg { background: #fff; border: 1px solid #eee; } svg text { font: 11px system-ui, sans-serif; }
pre { font-size: 12px; overflow-x: auto; }
</style></head><body>"""


def _marks(summary: Mapping[str, Any], t0: float) -> list[tuple[float, str, str]]:
    epoch = summary.get("marks_epoch") or {}
    out = [(float(epoch[k]) - t0, label, colour) for k, label, colour in _MARKS if k in epoch]
    for w in summary.get("waves") or []:
        out.append((float(w["started_at"]) - t0, f"wave {int(w['index']) + 1} ({w['devices']})", "#188038"))
    return sorted(out)


def _x(t: float, end: float) -> float:
    return _PAD_L + (_W - _PAD_L - _PAD_R) * max(0.0, min(t, end)) / max(end, 1e-9)


def _frame(
    height: int, end: float, marks: Sequence[tuple[float, str, str]], y_ticks: Sequence[tuple[float, str]], inner: str
) -> str:
    parts = [f'<svg width="{_W}" height="{height + 40}" viewBox="0 0 {_W} {height + 40}" xmlns="http://www.w3.org/2000/svg">']
    for y, label in y_ticks:
        parts.append(f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{_PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
    step = 30.0 if end <= 400 else 60.0
    t = 0.0
    while t <= end:
        parts.append(f'<text x="{_x(t, end):.1f}" y="{height + 16}" text-anchor="middle">{t:g}s</text>')
        t += step
    parts.append(inner)
    for i, (t, label, colour) in enumerate(marks):
        x = _x(t, end)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="10" y2="{height}" stroke="{colour}" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x + 3:.1f}" y="{20 + 12 * (i % 4)}" fill="{colour}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _cohort_of(rows: Sequence[Mapping[str, Any]]) -> str:
    return str(rows[-1].get("cohort")) if rows else "?"


def _accuracy_chart(rows: Mapping[str, list[dict[str, Any]]], end: float, marks: Sequence[tuple[float, str, str]]) -> str:
    height, lo = 260, 0.5

    def y(v: float) -> float:
        return 10 + (height - 10) * (1 - (max(lo, v) - lo) / (1 - lo))

    buckets: dict[str, dict[int, list[int]]] = {}
    for device_rows in rows.values():
        cohort = _cohort_of(device_rows)
        prev: Mapping[str, Any] | None = None
        for r in device_rows:
            if prev is not None and r.get("predictions", 0) >= prev.get("predictions", 0):
                k = int(float(r["t"]) // _BUCKET_S)
                acc = buckets.setdefault(cohort, {}).setdefault(k, [0, 0])
                acc[0] += r["correct"] - prev["correct"]
                acc[1] += r["predictions"] - prev["predictions"]
            prev = r
    inner = []
    for cohort, by in sorted(buckets.items()):
        pts = [(_x((k + 0.5) * _BUCKET_S, end), y(c / n)) for k, (c, n) in sorted(by.items()) if n]
        colour = _COHORT_COLOURS.get(cohort, "#1a73e8")
        inner.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>'
        )
        if pts:
            inner.append(
                f'<text x="{pts[-1][0] - 4:.1f}" y="{pts[-1][1] - 6:.1f}" text-anchor="end" '
                f'fill="{colour}">{html.escape(cohort)}</text>'
            )
    ticks = [(y(v), f"{v:.0%}") for v in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    return _frame(height, end, marks, ticks, "\n".join(inner))


def _psi_chart(rows: Mapping[str, list[dict[str, Any]]], end: float, marks: Sequence[tuple[float, str, str]]) -> str:
    height = 220
    values = [float(r["max_psi"]) for rs in rows.values() for r in rs if isinstance(r.get("max_psi"), int | float)]
    top = max(1.0, min(max(values, default=1.0), 20.0))

    def y(v: float) -> float:
        return 10 + (height - 10) * (1 - min(v, top) / top)

    inner = []
    for device_rows in rows.values():
        colour = _COHORT_COLOURS.get(_cohort_of(device_rows), "#1a73e8")
        pts = [(_x(float(r["t"]), end), y(float(r["max_psi"]))) for r in device_rows if isinstance(r.get("max_psi"), int | float)]
        inner.append(
            f'<polyline fill="none" stroke="{colour}" stroke-opacity=".55" stroke-width="1.2" '
            f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>'
        )
    ticks = [(y(top * f), f"{top * f:.2g}") for f in (0, 0.25, 0.5, 0.75, 1.0)]
    return _frame(height, end, marks, ticks, "\n".join(inner))


def _release_chart(rows: Mapping[str, list[dict[str, Any]]], end: float, marks: Sequence[tuple[float, str, str]]) -> str:
    devices = sorted(rows)
    lane = 12
    height = 10 + lane * len(devices)
    inner = []
    for i, d in enumerate(devices):
        top = 10 + i * lane
        device_rows = rows[d]
        for a, b in zip(device_rows, [*device_rows[1:], None], strict=True):
            x1 = _x(float(a["t"]), end)
            x2 = _x(float(b["t"]), end) if b is not None else x1 + 2
            release = a.get("release")
            colour = _RELEASE_COLOURS[int(release) % len(_RELEASE_COLOURS)] if isinstance(release, int) else "#fff"
            inner.append(f'<rect x="{x1:.1f}" y="{top}" width="{max(x2 - x1, 0.5):.1f}" height="{lane - 2}" fill="{colour}"/>')
            if a.get("drift_alarm"):
                inner.append(f'<circle cx="{(x1 + x2) / 2:.1f}" cy="{top + lane / 2 - 1:.1f}" r="1.6" fill="#b00020"/>')
        inner.append(f'<text x="{_PAD_L - 6}" y="{top + lane - 3}" text-anchor="end">{html.escape(d)}</text>')
    releases = sorted({int(r["release"]) for rs in rows.values() for r in rs if isinstance(r.get("release"), int)})
    legend = " ".join(f'<tspan fill="{_RELEASE_COLOURS[r % len(_RELEASE_COLOURS)]}">■ release {r}</tspan>' for r in releases)
    inner.append(f'<text x="{_W - _PAD_R}" y="{height + 32}" text-anchor="end">{legend}</text>')
    return _frame(height, end, marks, [], "\n".join(inner))


def _pct(v: object) -> str:
    return f"{float(v):.1%}" if isinstance(v, int | float) else "-"


def _summary_table(s: Mapping[str, Any]) -> str:
    acc = s["accuracy"]
    run = s.get("run") or {}
    m = run.get("metrics") or {}
    verdict = '<span class="ok">recovered</span>' if s.get("ok") else '<span class="bad">findings</span>'
    shift = s["shift"]
    recovery = f"{s['recovery_s']:g} s (goal ≤ 300 s)" if s.get("recovery_s") is not None else "not recovered"
    versus = f"{_pct(m.get('champion_accuracy'))} vs {_pct(m.get('challenger_accuracy'))} ({m.get('holdout_rows', '-')} rows)"
    rows = [
        ("result", verdict),
        ("shift", f"{shift['quantity']} → {shift['to']:g} on {shift['cohort']} at t = {shift['at_s']:g} s"),
        ("time from the shift to recovery", recovery),
        ("accuracy before the shift", _pct(acc["before_shift"])),
        ("accuracy after the shift (old model)", _pct(acc["after_shift"])),
        ("accuracy after recovery (new model)", _pct(acc["after_recovery"])),
        ("steady cohort (no shift), whole run", _pct(acc["steady_cohort"])),
        ("champion vs challenger on held-out field rows", versus),
        ("new release", str(run.get("release", "-"))),
        ("field dataset", "<code>" + html.escape(", ".join(run.get("datasets") or ["-"])) + "</code>"),
        ("drift alarms left on the shifted cohort", str(s.get("final_alarms"))),
        ("wall time of the whole demo", f"{s.get('wall_s')} s"),
    ]  # fmt: skip
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _run_section(s: Mapping[str, Any]) -> str:
    run = s.get("run")
    if not run:
        return "<h2>Autopilot</h2><p>The autopilot never ran.</p>"
    t0 = s.get("t0") or 0.0
    lines = [
        f"<h2>Autopilot run {html.escape(str(run['run_id']))}</h2><table><tr><th>t</th><th>state</th><th>what happened</th></tr>"
    ]
    for step in run.get("steps") or []:
        lines.append(
            f"<tr><td>{float(step['at']) - t0:.0f} s</td><td>{html.escape(str(step.get('state') or ''))}</td>"
            f"<td>{html.escape(str(step.get('note') or ''))}</td></tr>"
        )
    lines.append("</table>")
    for w in s.get("waves") or []:
        gate = "passed" if w.get("passed") else "not passed" if w.get("passed") is False else "open"
        start = float(w["started_at"]) - t0
        lines.append(f"<p>wave {int(w['index']) + 1}: {w['devices']} device(s) from t = {start:.0f} s, gate {gate}</p>")
    return "\n".join(lines)
