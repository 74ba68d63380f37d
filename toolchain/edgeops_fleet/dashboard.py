"""The console's web dashboard: server-rendered HTML pages for an operator.

Pages (mounted by the console's HTTP app at ``/``, beside the JSON API under ``/api``):

- ``/``                    the fleet table, summary counts, filter by ``?target=`` and ``?tag=k=v``
- ``/devices/{id}``        one device: its state, plots over time, recent events, seq gaps
- ``/rollouts``            every rollout, newest first
- ``/rollouts/{id}``       one rollout: its waves, their gate results and the device outcomes

Invariants:

- A page is one HTML document: Jinja2 templates (autoescape on: device ids, tags and error
  texts come off the wire), an inline style sheet and inline SVG plots drawn here in Python.
  No script, no external reference, nothing fetched from anywhere.
- Rendering is cheap for a few hundred devices: the fleet page reads the device rows in one
  query (plus the known releases, once); a device page reads one bounded window of history
  and draws at most :data:`MAX_PLOT_POINTS` points per line.
- Pages only read the store; nothing here changes the fleet or a rollout.

starlette and jinja2 are imported here at module level: :mod:`edgeops_fleet` does not import
this module eagerly (the console imports it when it serves HTTP).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, pass_context
from jinja2.runtime import Context
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Route

from edgeops_core import InputError
from edgeops_fleet.errors import StoreError
from edgeops_fleet.rollout import GATE_NAMES

if TYPE_CHECKING:
    from edgeops_fleet.rollout import RolloutEngine
    from edgeops_fleet.store import Store

__all__ = [
    "HISTORY_LIMIT",
    "MAX_PLOT_POINTS",
    "PLOT_WINDOWS",
    "PSI_ALARM",
    "PSI_WARN",
    "RECENT_EVENTS",
    "REFRESH_S",
    "Line",
    "downsample",
    "routes",
    "svg_plot",
]

#: Points drawn per line at most; longer histories are reduced (bucket min and max kept).
MAX_PLOT_POINTS = 300
#: Seconds between the browser's reloads of the fleet, device and running-rollout pages.
REFRESH_S = 5
#: The device page's time windows (query ``?window=``), in seconds.
PLOT_WINDOWS: Mapping[str, float] = {"15m": 900.0, "1h": 3600.0, "6h": 6 * 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
#: Telemetry rows read for a device page at most (the newest window is what is drawn).
HISTORY_LIMIT = 10_000
#: Recent events listed on a device page.
RECENT_EVENTS = 25
#: PSI from which a distribution is commonly read as shifted: drawn on the drift plot, and
#: the fleet table colours a drift score red from it.
PSI_ALARM = 0.25
#: PSI from which a distribution is read as moving: the fleet table colours it amber.
PSI_WARN = 0.1

_TEMPLATES = Path(__file__).with_name("templates")

# The status words the pages colour, by what an operator should feel about them (device
# health, online, OTA phases, and the rollout engine's rollout, wave and device states).
_GOOD = frozenset({"ok", "online", "passed", "pass", "committed"})
_WARN = frozenset({"drift", "degraded", "no_model", "paused", "held", "waiting", "missed", "inconclusive"})
_BAD = frozenset({"offline", "failed", "fail", "expired", "rolled_back", "aborted", "rejected", "timed_out"})
_INFO = frozenset({"running", "soaking", "installing", "offered", "committing", "rolling_back", "fetching", "verifying", "trial"})


def _tone(word: object) -> str:
    """The badge colour class for a status word: good, warn, bad, info or muted."""
    w = str(word).lower()
    if w in _GOOD:
        return "good"
    if w in _BAD:
        return "bad"
    if w in _WARN:
        return "warn"
    if w in _INFO:
        return "info"
    return "muted"


# ---------------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class Line:
    """One line of a plot: ``points`` are ``(epoch_s, value)`` in time order; ``None`` breaks the line."""

    label: str
    points: Sequence[tuple[float, float | None]]
    colour: str = "#2563eb"


def downsample(points: Sequence[tuple[float, float | None]], *, limit: int = MAX_PLOT_POINTS) -> list[tuple[float, float | None]]:
    """At most ``limit`` points that draw like ``points``.

    The series is cut into ``limit // 2`` runs of consecutive points; each run keeps its
    lowest and its highest point in time order, so a short spike or dip still shows (an
    average would hide exactly what an operator looks for). A run with no value keeps one
    ``None`` so the line still breaks there.

    Raises:
        InputError: ``limit`` is below 2.
    """
    if limit < 2:
        raise InputError(f"a plot needs at least 2 points, got limit={limit}")
    if len(points) <= limit:
        return list(points)
    buckets = limit // 2
    out: list[tuple[float, float | None]] = []
    n = len(points)
    for b in range(buckets):
        run = points[b * n // buckets : (b + 1) * n // buckets]
        valued = [(t, v) for t, v in run if v is not None and math.isfinite(v)]
        if not valued:
            out.append((run[len(run) // 2][0], None))
            continue
        lo = min(valued, key=lambda p: p[1])
        hi = max(valued, key=lambda p: p[1])
        out.extend(sorted({lo, hi}, key=lambda p: p[0]))
    return out


_W, _H = 1160, 150
_ML, _MR, _MT, _MB = 64, 16, 14, 26
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _measure(value: float | None, unit: str = "") -> str:
    """A measurement for a column of them: as many decimals as its size deserves (3.53, 18.3, 120)."""
    if value is None:
        return "—"
    v = float(value)
    text = f"{v:.2f}" if abs(v) < 10 else (f"{v:.1f}" if abs(v) < 100 else f"{v:,.0f}")
    return f"{text}{unit}"


def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def svg_plot(
    *,
    title: str,
    unit: str,
    lines: Sequence[Line],
    start: float,
    end: float,
    threshold: tuple[float, str] | None = None,
    markers: Sequence[tuple[float, str]] = (),
    gap_s: float | None = None,
) -> Markup:
    """An inline SVG time-series plot (UTC time axis, y from zero), safe to put in a page.

    Args:
        title: the plot's heading (escaped here).
        unit: the y unit, shown after the values.
        lines: the series; each is reduced with :func:`downsample`.
        start: the left edge of the time axis (epoch seconds).
        end: the right edge.
        threshold: a horizontal dashed line ``(value, label)``, e.g. the PSI alarm level.
        markers: vertical dashed lines ``(epoch_s, label)``, e.g. where the release changed.
        gap_s: break a line where two points are further apart than this (no data came).
    """
    end = max(end, start + 1.0)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    series = [(ln, _reduce(ln.points, start, end, gap_s)) for ln in lines]
    values = [v for _, segs in series for seg in segs for _, v in seg]
    top = max([*values, threshold[0] if threshold else 0.0, 0.0])
    step = _nice_step(top * 1.1 if top > 0 else 1.0, 4)
    ymax = step * max(1, math.ceil((top * 1.08) / step)) if top > 0 else step * 4

    def x(t: float) -> float:
        return _ML + (t - start) / (end - start) * pw

    def y(v: float) -> float:
        return _MT + ph - v / ymax * ph

    esc = html.escape
    parts = [
        f'<svg class="plot" viewBox="0 0 {_W} {_H}" width="100%" role="img" aria-label="{esc(title)}" '
        'font-family="system-ui, sans-serif" font-size="11">',
        f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="#fbfcfd" stroke="#d9dee5"/>',
    ]
    # y grid and labels
    k = 0
    while k * step <= ymax + 1e-12:
        yy = y(k * step)
        parts.append(f'<line x1="{_ML}" x2="{_ML + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e6e9ee"/>')
        parts.append(f'<text x="{_ML - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#5b6472">{esc(_fmt_num(k * step))}</text>')
        k += 1
    parts.append(
        f'<text x="12" y="{_MT + ph / 2:.1f}" fill="#5b6472" text-anchor="middle" '
        f'transform="rotate(-90 12 {_MT + ph / 2:.1f})">{esc(unit)}</text>'
    )
    # time ticks (UTC)
    tstep = next((s for s in _TIME_STEPS if (end - start) / s <= 8), 86400 * math.ceil((end - start) / 86400 / 8))
    t = math.ceil(start / tstep) * tstep
    fmt = "%H:%M:%S" if tstep < 60 else ("%H:%M" if tstep < 86400 else "%d %b")
    while t <= end:
        xx = x(t)
        label = datetime.fromtimestamp(t, UTC).strftime(fmt)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{_MT}" y2="{_MT + ph}" stroke="#eef0f3"/>')
        parts.append(f'<text x="{xx:.1f}" y="{_H - 8}" text-anchor="middle" fill="#5b6472">{label}</text>')
        t += tstep
    for when, label in markers:
        if start <= when <= end:
            xx = x(when)
            parts.append(
                f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{_MT}" y2="{_MT + ph}" stroke="#7c3aed" stroke-dasharray="4 3"/>'
                f'<text x="{xx + 3:.1f}" y="{_MT + 11}" fill="#7c3aed">{esc(label)}</text>'
            )
    if threshold is not None and threshold[0] <= ymax:
        ty = y(threshold[0])
        parts.append(
            f'<line x1="{_ML}" x2="{_ML + pw}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#dc2626" stroke-dasharray="6 4"/>'
            f'<text x="{_ML + pw - 4}" y="{ty - 4:.1f}" text-anchor="end" fill="#dc2626">{esc(threshold[1])}</text>'
        )
    drawn = 0
    for ln, segs in series:
        for seg in segs:
            coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in seg)
            drawn += len(seg)
            if len(seg) == 1:
                parts.append(f'<circle cx="{x(seg[0][0]):.1f}" cy="{y(seg[0][1]):.1f}" r="2.5" fill="{ln.colour}"/>')
            else:
                parts.append(f'<polyline fill="none" stroke="{ln.colour}" stroke-width="1.6" points="{coords}"/>')
    if not drawn:
        parts.append(
            f'<text x="{_ML + pw / 2:.1f}" y="{_MT + ph / 2:.1f}" text-anchor="middle" fill="#8a94a3" '
            'font-size="13">no data in this window</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  (every text above went through html.escape)


def _reduce(
    points: Sequence[tuple[float, float | None]], start: float, end: float, gap_s: float | None
) -> list[list[tuple[float, float]]]:
    """The drawable runs of a line inside the window, together at most :data:`MAX_PLOT_POINTS` points.

    Runs are cut on the full series (a gap is a gap between received records, not between
    the points left after reduction); then each run gets a share of the budget by length.
    """
    segs = _segments(points, start, end, gap_s)
    if len(segs) > MAX_PLOT_POINTS // 4:
        # So fragmented that gaps are below the plot's resolution: draw through them.
        segs = _segments(points, start, end, None)
    total = sum(len(seg) for seg in segs)
    if total <= MAX_PLOT_POINTS:
        return segs
    out: list[list[tuple[float, float]]] = []
    for seg in segs:
        share = MAX_PLOT_POINTS * len(seg) // total
        if share >= 2:
            out.append([(t, v) for t, v in downsample(seg, limit=share) if v is not None])
        else:  # a short run among long ones: its highest point stands for it
            out.append([max(seg, key=lambda p: p[1])])
    return out


def _segments(
    points: Sequence[tuple[float, float | None]], start: float, end: float, gap_s: float | None
) -> list[list[tuple[float, float]]]:
    """Runs of drawable points: split at ``None``, at a non-finite value and at a time gap."""
    segs: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    prev_t: float | None = None
    for t, v in points:
        if t < start or t > end:
            continue
        if v is None or not math.isfinite(v) or (gap_s is not None and prev_t is not None and t - prev_t > gap_s):
            if cur:
                segs.append(cur)
            cur = []
        if v is not None and math.isfinite(v):
            cur.append((t, v))
        prev_t = t
    if cur:
        segs.append(cur)
    return segs


# ---------------------------------------------------------------------------------------------
# Text helpers


def _absolute(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(epoch: float, now: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``; ``in 4 min`` for a time ahead."""
    delta = now - float(epoch)
    ahead = delta < -0.5
    d = abs(delta)
    if d < 90:
        text = f"{d:.0f} s"
    elif d < 90 * 60:
        text = f"{d / 60:.0f} min"
    elif d < 36 * 3600:
        text = f"{d / 3600:.0f} h"
    else:
        text = f"{d / 86400:.0f} d"
    return f"in {text}" if ahead else f"{text} ago"


@pass_context
def _ago(context: Context, epoch: float) -> str:
    """The ``ago`` filter: relative to the ``now`` the page is rendered at (one clock read per page)."""
    return _relative(epoch, float(context["now"]))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size and s % size == 0:
            return f"{s / size:.0f} {unit}"
        if s >= size * 2:
            return f"{s / size:.1f} {unit}"
    return f"{s:g} s"


def _parse_ts(text: object) -> float | None:
    """A message's UTC ``ts`` text as epoch seconds (``None`` when absent or malformed)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _obj(value: object) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (rows written by older code may lack a field)."""
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _detail_text(detail: object) -> str:
    """An event's ``detail`` as ``key=value`` pairs (escaped by the template)."""
    if not isinstance(detail, Mapping):
        return ""
    parts = []
    for k, v in detail.items():
        shown = _fmt_num(v) if isinstance(v, float) else v
        parts.append(f"{k}={shown}")
    return ", ".join(str(p) for p in parts)


_EVENT_TONES = {
    "install_activated": "good",
    "ota_committed": "good",
    "drift_cleared": "good",
    "command_done": "good",
    "install_started": "info",
    "ota_progress": "info",
    "install_rejected": "bad",
    "drift_alarm": "bad",
    "command_failed": "bad",
    "command_rejected": "bad",
    "ota_rolled_back": "bad",
    "ota_failed": "bad",
    "ota_blocks_refused": "warn",
    "commands_overloaded": "warn",
    "outbox_quarantined": "warn",
}


# ---------------------------------------------------------------------------------------------
# Gate results


# How each gate of the engine (``GATE_NAMES``) reads: its words, its values' unit, and which
# side of the limit passes.
_GATE_LOOK: Mapping[str, tuple[str, str, str]] = {
    "install": ("install success", "percent", "≥"),
    "inferences": ("inferences in the soak", "count", "≥"),
    "error_rate": ("error rate", "percent", "≤"),
    "latency_p99": ("p99 latency", "ms", "≤"),
    "psi": ("prediction PSI", "psi", "≤"),
    "anomaly_rate": ("anomaly rate", "percent", "≤"),
    "drift_alarms": ("devices with a drift alarm", "count", "≤"),
}
# The rollout's gate options (``Gates.to_dict()``), as the page lists them.
_LIMIT_LOOK: Mapping[str, tuple[str, str]] = {
    "install_success_min": ("install success ≥", "percent"),
    "error_rate_max": ("error rate ≤", "percent"),
    "latency_p99_ms": ("p99 latency ≤", "ms"),
    "latency_factor": ("× factor", "factor"),
    "psi_max": ("prediction PSI ≤", "psi"),
    "anomaly_rate_max": ("anomaly rate rise ≤", "percent"),
    "drift_alarms_max": ("drift alarms ≤", "count"),
    "min_inferences": ("inferences ≥", "count"),
    "install_timeout_s": ("install timeout", "seconds"),
}


def _unit_text(unit: str, value: object) -> str:
    v = _number(value)
    if v is None:
        return "—" if value is None else str(value)
    if unit == "percent":
        return f"{v * 100:.2f} %"
    if unit == "ms":
        return f"{v:.3g} ms"
    if unit == "psi":
        return f"{v:.3f}"
    if unit == "count":
        return f"{v:,.0f}"
    if unit == "factor":
        return f"× {v:g}"
    if unit == "seconds":
        return _duration(v)
    return _fmt_num(v)


def _gate_view(name: str, result: object) -> dict[str, Any]:
    """One gate's result for the table: measured value vs limit, formatted by what the gate measures."""
    r = _obj(result)
    words, unit, op = _GATE_LOOK.get(name, (name.replace("_", " "), "number", "≤"))
    passed = r.get("passed")
    detail = r.get("detail")
    return {
        "name": words,
        "value": _unit_text(unit, r.get("value")),
        "limit": _unit_text(unit, r.get("limit")),
        "op": op,
        "passed": passed,
        "verdict": "pass" if passed is True else ("fail" if passed is False else "inconclusive"),
        "detail": _detail_text(detail) if isinstance(detail, Mapping) else str(detail or ""),
    }


def _gate_order(gate: Mapping[str, Any]) -> list[str]:
    """The engine's gates in the order it judges them, then anything else it may add."""
    return [n for n in GATE_NAMES if n in gate] + sorted(n for n in gate if n not in GATE_NAMES)


# ---------------------------------------------------------------------------------------------
# Pages


_ROLLOUT_TERMINAL = ("passed", "failed", "aborted")
_OTA_MOVING = ("fetching", "verifying", "installing", "trial")


class _PageError(InputError):
    """A dashboard request that cannot be answered as asked (its status goes with it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Pages:
    """The page handlers; sync, so Starlette runs them (and their store reads) in its thread pool."""

    store: Store
    engine: RolloutEngine | None
    clock: Callable[[], float]
    env: Environment = field(init=False)

    def __post_init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # the templates ship with the package; no stat per page
        )
        self.env.globals["tone_of"] = _tone
        self.env.filters["num"] = _fmt_num
        self.env.filters["measure"] = _measure
        self.env.filters["absolute"] = _absolute
        self.env.filters["duration"] = _duration
        self.env.filters["ago"] = _ago

    # -- plumbing --

    def _render(self, request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        now = self.clock()
        base = str(request.scope.get("root_path", "")).rstrip("/")
        text = self.env.get_template(template).render(base=base, now=now, now_text=_absolute(now)[:-4], **context)
        return HTMLResponse(text, status_code=status, headers={"Cache-Control": "no-store"})

    def _error(self, request: Request, status: int, message: str, *, nav: str = "") -> HTMLResponse:
        titles = {400: "Bad request", 404: "Not found", 503: "Store unavailable"}
        # A store that is locked or unreachable may come back: keep trying like the live pages.
        refresh = REFRESH_S if status == 503 else None
        return self._render(
            request, "error.html", status=status, title=titles.get(status, "Error"), nav=nav, refresh=refresh, message=message
        )

    def _guard(self, request: Request, page: Callable[[Request], HTMLResponse], nav: str) -> HTMLResponse:
        try:
            return page(request)
        except _PageError as exc:
            return self._error(request, exc.status, str(exc), nav=nav)
        except StoreError as exc:
            return self._error(request, 503, str(exc), nav=nav)

    # -- routes --

    def fleet(self, request: Request) -> HTMLResponse:
        """``/``: the fleet table."""
        return self._guard(request, self._fleet, "fleet")

    def device(self, request: Request) -> HTMLResponse:
        """``/devices/{device_id}``: one device."""
        return self._guard(request, self._device, "fleet")

    def rollouts(self, request: Request) -> HTMLResponse:
        """``/rollouts``: every rollout."""
        return self._guard(request, self._rollouts, "rollouts")

    def rollout(self, request: Request) -> HTMLResponse:
        """``/rollouts/{rollout_id}``: one rollout."""
        return self._guard(request, self._rollout, "rollouts")

    def autopilot(self, request: Request) -> HTMLResponse:
        """``/autopilot``: every group's autopilot and the runs, newest first, step by step."""
        return self._guard(request, self._autopilot, "autopilot")

    # -- fleet --

    def _fleet(self, request: Request) -> HTMLResponse:
        target = request.query_params.get("target") or None
        tags: dict[str, str] = {}
        for text in request.query_params.getlist("tag"):
            if not text:
                continue
            k, sep, v = text.partition("=")
            if not sep or not k:
                raise _PageError(400, f"tag filter: expected KEY=VALUE, got {text!r}")
            tags[k] = v
        # One read of the whole fleet: the filter's choices and the counts come from it too.
        rows = self.store.devices()
        known: dict[str, set[int]] = {}
        for rel in self.store.releases():
            known.setdefault(str(rel["name"]), set()).add(int(rel["release"]))
        running = len(self.store.rollouts(states=["running"]))
        targets = sorted({str(r["target"]) for r in rows if r.get("target")})
        all_tags = sorted({f"{k}={v}" for r in rows for k, v in (r.get("tags") or {}).items()})
        shown = [
            r
            for r in rows
            if (target is None or r.get("target") == target) and all((r.get("tags") or {}).get(k) == v for k, v in tags.items())
        ]
        devices = [_fleet_row(r, known) for r in shown]
        counts = {
            "fleet": len(rows),
            "total": len(devices),
            "online": sum(1 for d in devices if d["online"] is True),
            "offline": sum(1 for d in devices if d["online"] is False),
            "unhealthy": sum(1 for d in devices if d["health"] not in (None, "ok")),
            "drift_alarms": sum(1 for d in devices if d["drift_alarm"]),
            "unknown_release": sum(1 for d in devices if d["known"] is False),
            "held": sum(1 for d in devices if d["held"]),
            "rollouts_running": running,
        }
        filters = ([f"target={target}"] if target else []) + [f"{k}={v}" for k, v in tags.items()]
        return self._render(
            request,
            "fleet.html",
            title="Fleet",
            nav="fleet",
            refresh=REFRESH_S,
            devices=devices,
            counts=counts,
            targets=targets,
            target=target,
            all_tags=all_tags,
            tag_texts=[f"{k}={v}" for k, v in tags.items()],
            filters=filters,
            error=None,
        )

    # -- device --

    def _device(self, request: Request) -> HTMLResponse:
        device_id = request.path_params["device_id"]
        window_name = request.query_params.get("window", "1h")
        if window_name not in PLOT_WINDOWS:
            raise _PageError(400, f"window: expected one of {', '.join(PLOT_WINDOWS)}, got {window_name!r}")
        row = self.store.device(device_id)
        if row is None:
            raise _PageError(404, f"No device {device_id!r} has reported to this console.")
        now = self.clock()
        start = now - PLOT_WINDOWS[window_name]
        telemetry = self.store.history(device_id, since=start, kinds=["telemetry"], limit=HISTORY_LIMIT)
        events = self.store.history(device_id, kinds=["event"], limit=RECENT_EVENTS)[::-1]
        gaps = self.store.gaps(device_id)
        known: dict[str, set[int]] = {}
        for rel in self.store.releases():
            known.setdefault(str(rel["name"]), set()).add(int(rel["release"]))
        return self._render(
            request,
            "device.html",
            title=f"Device {device_id}",
            nav="fleet",
            refresh=REFRESH_S,
            d=_fleet_row(row, known),
            row=row,
            plots=_device_plots(telemetry, start=start, end=now),
            samples=len(telemetry),
            truncated=len(telemetry) >= HISTORY_LIMIT,
            window=window_name,
            windows=list(PLOT_WINDOWS),
            events=[
                {
                    "at": e["received_at"],
                    "ts": e.get("ts"),
                    "seq": e.get("seq"),
                    "type": str((e.get("payload") or {}).get("type", "?")),
                    "tone": _EVENT_TONES.get(str((e.get("payload") or {}).get("type")), "muted"),
                    "detail": _detail_text((e.get("payload") or {}).get("detail")),
                }
                for e in events
            ],
            gaps=[{"first": a, "last": z, "missing": z - a + 1} for a, z in gaps],
            missing=sum(z - a + 1 for a, z in gaps),
        )

    # -- autopilot --

    def _autopilot(self, request: Request) -> HTMLResponse:
        autopilots = []
        for row in self.store.autopilots():
            c = row["config"] or {}
            triggers = [f"drift alarm held {c.get('drift_hold_s')} s on {c.get('drift_devices')} device(s)"]
            if c.get("schedule_s"):
                triggers.append(f"every {c['schedule_s']} s")
            if c.get("new_labels"):
                triggers.append(f"{c['new_labels']} new labels")
            autopilots.append(
                {"group_key": row["group_key"], "mode": c.get("mode"), "project": c.get("project"),
                 "triggers": "; ".join(triggers),
                 "margin": c.get("margin"), "waves": c.get("waves")}
            )  # fmt: skip
        runs = []
        for r in self.store.runs(limit=50):
            m = r.get("metrics") or {}

            def pct(v: object) -> str:
                return f"{v:.2%}" if isinstance(v, int | float) else "—"

            runs.append(
                {**r, "champion": pct(m.get("champion_accuracy")), "challenger": pct(m.get("challenger_accuracy")),
                 "holdout_rows": m.get("holdout_rows", "—"), "datasets": ", ".join(r.get("datasets") or []) or "—",
                 "triggers": r.get("triggers") or [], "steps": r.get("steps") or []}
            )  # fmt: skip
        active = any(r["state"] in ("queued", "collecting", "building", "evaluating", "rolling_out") for r in runs)
        return self._render(
            request, "autopilot.html", title="Autopilot", nav="autopilot", refresh=REFRESH_S if active else None,
            autopilots=autopilots, runs=runs,
        )  # fmt: skip

    # -- rollouts --

    def _rollouts(self, request: Request) -> HTMLResponse:
        rows = self.store.rollouts()
        items = [_rollout_summary(r) for r in rows]
        running = any(r["state"] == "running" for r in rows)
        return self._render(
            request, "rollouts.html", title="Rollouts", nav="rollouts", refresh=REFRESH_S if running else None, rollouts=items
        )

    def _rollout(self, request: Request) -> HTMLResponse:
        rollout_id = request.path_params["rollout_id"]
        row = self.store.rollout(rollout_id)
        if row is None:
            raise _PageError(404, f"No rollout {rollout_id!r} is known to this console.")
        waves = self.store.waves(rollout_id)
        devices = self.store.rollout_devices(rollout_id)
        now = self.clock()
        specs = list(row.get("waves") or [])
        # The engine keeps per-wave extras (the wave's spec, when its soak began, how often
        # an inconclusive soak was extended) in the rollout's detail.
        meta = _obj(row.get("detail")).get("waves")
        extras = [_obj(m) for m in meta] if isinstance(meta, list) else []
        by_wave: dict[int, list[dict[str, Any]]] = {}
        for d in devices:
            by_wave.setdefault(int(d["wave"]) if d.get("wave") is not None else -1, []).append(d)
        wave_views: list[dict[str, Any]] = []
        for w in waves:
            index = int(w["index"])
            extra = extras[index] if 0 <= index < len(extras) else {}
            started, until = _number(w.get("started_at")), _number(w.get("soak_until"))
            soak_from = _number(extra.get("soak_from"))
            soak = None
            if soak_from is not None and until is not None and until > soak_from and w.get("ended_at") is None:
                soak = max(0.0, min(1.0, (now - soak_from) / (until - soak_from)))
            gate = _obj(w.get("gate"))
            wave_views.append(
                {
                    "index": index,
                    "number": index + 1,
                    "spec": extra.get("spec") or (specs[index] if 0 <= index < len(specs) else None),
                    "state": w.get("state") or "?",
                    "passed": w.get("passed"),
                    "started_at": started,
                    "soak_until": until,
                    "extensions": int(extra.get("extensions") or 0),
                    "ended_at": _number(w.get("ended_at")),
                    "soak": soak,
                    "planned": list(w.get("devices") or []),
                    "gate": {name: _gate_view(name, gate[name]) for name in gate if gate[name] is not None},
                    "devices": by_wave.get(index, []),
                }
            )
        # One table for every wave's gates: a row per gate, a column per wave.
        names = _gate_order({n: None for w in wave_views for n in w["gate"]})
        gate_rows = []
        for name in names:
            cells = [w["gate"].get(name) for w in wave_views]
            limit = next((c["limit"] for c in cells if c is not None and c["limit"] != "—"), "—")
            words, _, op = _GATE_LOOK.get(name, (name.replace("_", " "), "", "≤"))
            gate_rows.append({"name": words, "op": op, "limit": limit, "cells": cells})
        limits = _obj(row.get("gates"))
        return self._render(
            request,
            "rollout.html",
            title=f"Rollout {rollout_id}",
            nav="rollouts",
            refresh=None if row.get("state") in _ROLLOUT_TERMINAL else REFRESH_S,
            r=_rollout_summary(row),
            row=row,
            waves=wave_views,
            gate_rows=gate_rows,
            limits=[
                (words, _unit_text(unit, limits[key]))
                for key, (words, unit) in _LIMIT_LOOK.items()
                if limits.get(key) is not None
            ],
            devices=devices,
        )


def _fleet_row(r: Mapping[str, Any], known: Mapping[str, set[int]]) -> dict[str, Any]:
    """One device row as the fleet table shows it (the latest telemetry flattened)."""
    tel = _obj(r.get("last_telemetry"))
    drift = _obj(tel.get("drift"))
    lat = _obj(tel.get("latency_ms"))
    inf = _obj(tel.get("inference"))
    interval, window = _number(tel.get("interval_s")), _number(inf.get("window_count"))
    psi = _number(drift.get("max_psi"))
    alarm = bool(drift.get("alarm"))
    model, release = r.get("model"), r.get("release")
    status: bool | None = None
    if model is not None and release is not None:
        status = int(release) in known.get(str(model), set())
    phase = r.get("ota_phase")
    tags = _obj(r.get("tags"))
    task = inf.get("task") if inf.get("task") in ("regression", "anomaly") else None
    anomaly_rate = _number(_obj(inf.get("anomaly")).get("rate")) if task == "anomaly" else None
    return {
        "id": r["device_id"],
        "online": r.get("online"),
        "target": r.get("target"),
        "tags": sorted((str(k), str(v)) for k, v in tags.items()),
        "model": model,
        "version": r.get("version"),
        "release": release,
        "known": status,
        "model_known": str(model) in known if model is not None else None,
        "health": r.get("health"),
        "held": phase == "held",
        "ota_active": phase in _OTA_MOVING,
        "ota_phase": phase,
        "ota_release": r.get("ota_release"),
        "drift": psi,
        "drift_alarm": alarm,
        "drift_tone": _psi_tone(psi, alarm),
        "p99": _number(lat.get("p99")),
        "rate": window / interval if window is not None and interval else None,
        # What the model does when it is not a classifier, and an anomaly model's share of
        # flagged inputs over its last telemetry interval.
        "task": task,
        "anomaly_rate": anomaly_rate,
        "last_seen": _number(r.get("last_seen")),
        "flag": status is False or alarm or r.get("online") is False,
    }


def _psi_tone(psi: float | None, alarm: bool) -> str:
    if alarm or (psi is not None and psi >= PSI_ALARM):
        return "bad"
    return "warn" if psi is not None and psi >= PSI_WARN else "good"


def _rollout_summary(r: Mapping[str, Any]) -> dict[str, Any]:
    waves = list(r.get("waves") or [])
    current = r.get("current_wave")
    group = _obj(r.get("group"))
    tags = _obj(group.get("tags"))
    return {
        "id": r["rollout_id"],
        "state": r.get("state") or "?",
        "name": r.get("name"),
        "version": r.get("version"),
        "release": r.get("release"),
        "target": r.get("target"),
        "group": r.get("group_key") or ", ".join([f"target={group.get('target')}", *(f"{k}={v}" for k, v in tags.items())]),
        "waves": waves,
        "wave_count": len(waves),
        "current": None if current is None else int(current) + 1,
        "soak_s": _number(r.get("soak_s")),
        "created_at": _number(r.get("created_at")),
        "updated_at": _number(r.get("updated_at")),
        "deadline_at": _number(r.get("deadline_at")),
        "message": r.get("message"),
        "sha256": r.get("sha256"),
    }


def _device_plots(rows: Sequence[Mapping[str, Any]], *, start: float, end: float) -> list[dict[str, Any]]:
    """The three plots of a device page from its telemetry rows (ascending)."""
    t: list[float] = []
    p99: list[float | None] = []
    p50: list[float | None] = []
    psi: list[float | None] = []
    ppsi: list[float | None] = []
    rate: list[float | None] = []
    err: list[float | None] = []
    flagged: list[float | None] = []  # an anomaly model's anomalies per second
    intervals: list[float] = []
    markers: list[tuple[float, str]] = []
    prev_release: object = None
    for row in rows:
        p = _obj(row.get("payload"))
        # The device's own clock places a sample; telemetry buffered through an outage still
        # lands where it was measured (received_at when the ts is unusable).
        when = _parse_ts(p.get("ts"))
        if when is None or abs(when - float(row["received_at"])) > 7 * 86400:
            when = float(row["received_at"])
        t.append(when)
        lat = _obj(p.get("latency_ms"))
        drift = _obj(p.get("drift"))
        inf = _obj(p.get("inference"))
        interval = _number(p.get("interval_s"))
        if interval:
            intervals.append(interval)
        p99.append(_number(lat.get("p99")))
        p50.append(_number(lat.get("p50")))
        psi.append(_number(drift.get("max_psi")))
        ppsi.append(_number(drift.get("prediction_psi")))
        n, e = _number(inf.get("window_count")), _number(inf.get("error_count"))
        rate.append(n / interval if n is not None and interval else None)
        err.append(e / interval if e is not None and interval else None)
        a = _number(_obj(inf.get("anomaly")).get("count"))
        flagged.append(a / interval if a is not None and interval else None)
        release = row.get("release")
        if release != prev_release and release is not None:
            if prev_release is not None:
                markers.append((when, f"release {release}"))
            prev_release = release
    intervals.sort()
    gap_s = max(5.0, 3 * intervals[len(intervals) // 2]) if intervals else None

    def last(values: Sequence[float | None]) -> float | None:
        return next((v for v in reversed(values) if v is not None), None)

    def plot(
        title: str, unit: str, shown: Callable[[float | None], str], lines: list[tuple[str, list[float | None], str]], **kw: Any
    ) -> dict[str, Any]:
        return {
            "title": title,
            "legend": [{"label": label, "colour": colour, "last": shown(last(vals))} for label, vals, colour in lines],
            "unit": unit,
            "svg": svg_plot(
                title=title,
                unit=unit,
                lines=[Line(label, list(zip(t, vals, strict=True)), colour) for label, vals, colour in lines],
                start=start,
                end=end,
                markers=markers,
                gap_s=gap_s,
                **kw,
            ),
        }

    return [
        plot("Latency", "ms", lambda v: _measure(v, " ms"), [("p99", p99, "#2563eb"), ("p50", p50, "#93c5fd")]),
        plot(
            "Drift score (PSI)",
            "PSI",
            lambda v: "—" if v is None else f"{v:.3f}",
            [("max input PSI", psi, "#d97706"), ("prediction PSI", ppsi, "#0d9488")],
            threshold=(PSI_ALARM, f"PSI {PSI_ALARM}"),
        ),
        plot(
            "Inference rate",
            "per second",
            lambda v: _measure(v, "/s"),
            [
                ("inferences", rate, "#16a34a"),
                ("errors", err, "#dc2626"),
                *([("anomalies", flagged, "#7c3aed")] if any(v is not None for v in flagged) else []),
            ],
        ),
    ]


def routes(store: Store, engine: RolloutEngine | None, *, clock: Callable[[], float] = time.time) -> list[BaseRoute]:
    """The dashboard's routes, to mount at ``/`` beside the JSON API.

    Args:
        store: the console's store (only read).
        engine: the rollout engine (pages read rollouts from the store it persists to; may be ``None``).
        clock: epoch seconds now (relative times and plot windows).
    """
    pages = _Pages(store, engine, clock)
    return [
        Route("/", pages.fleet, methods=["GET"], name="dashboard-fleet"),
        Route("/devices/{device_id}", pages.device, methods=["GET"], name="dashboard-device"),
        Route("/rollouts", pages.rollouts, methods=["GET"], name="dashboard-rollouts"),
        Route("/rollouts/{rollout_id}", pages.rollout, methods=["GET"], name="dashboard-rollout"),
        Route("/autopilot", pages.autopilot, methods=["GET"], name="dashboard-autopilot"),
    ]
