"""The console's dashboard: real pages over HTTP from a real SQLite store, read as a person would.

A store is filled with five devices (states, telemetry, events; one runs a release the
console does not know, one is offline, one holds an update for a rollout) and two rollouts
(written with ``put_rollout``/``put_wave``/``put_rollout_device`` as the engine would). The
dashboard's routes are served by uvicorn on a free loopback port; pages are fetched over HTTP
and parsed for their visible text, then rendered by Debian's headless Chromium: its DOM dump
must show the same, and its screenshots must show a page (colours, badges), not a blank.

``EDGEOPS_UPDATE_SCREENSHOTS=1`` also writes the screenshots to ``docs/img/dashboard-*.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import free_port
from edgeops_core import Event, Telemetry

uvicorn = pytest.importorskip("uvicorn")
from starlette.applications import Starlette  # noqa: E402

from edgeops_fleet.dashboard import MAX_PLOT_POINTS, downsample, routes  # noqa: E402
from edgeops_fleet.errors import StoreError  # noqa: E402
from edgeops_fleet.store import Incoming, Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICES = ("ecu-01", "ecu-02", "ecu-03", "ecu-04", "wear-01")
ROLLOUT = "r-20261201T090100-8e41c2"
HELD_ROLLOUT = "r-20261201T094500-5b07aa"
SHA = {7: "7a" * 32, 8: "8b" * 32, 9: "9c" * 32, 3: "3d" * 32, 42: "42" * 32}


# -- a fleet in a store -----------------------------------------------------------------------


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _state(
    device: str,
    seq: int,
    at: float,
    *,
    online: bool,
    target: str,
    tags: dict[str, str],
    model: tuple[str, str, int],
    health: str = "ok",
    ota: dict[str, Any] | None = None,
    last_error: str | None = None,
) -> Incoming:
    name, version, release = model
    payload = {
        "schema": 1,
        "device_id": device,
        "ts": _ts(at),
        "seq": seq,
        "online": online,
        "agent_version": "0.1.0",
        "target": target,
        "runtime": "onnxruntime" if target == "ecu" else "tflite-micro",
        "tags": tags,
        "bundle": {
            "name": name,
            "version": version,
            "release": release,
            "sha256": SHA[release],
            "slot": "b",
            "expires": "2027-12-01T00:00:00.000000Z",
            "expired": False,
        },
        "health": health,
        "last_error": last_error,
        "ota": ota,
    }
    return Incoming(device_id=device, kind="state", seq=seq, ts=_ts(at), received_at=at + 0.05, payload=payload, release=release)


def _telemetry(
    device: str,
    seq: int,
    at: float,
    *,
    model: tuple[str, int],
    p99: float,
    psi: float,
    rate: float,
    errors: int = 0,
    alarm: bool = False,
    interval: float = 10.0,
) -> Incoming:
    n = round(rate * interval)
    payload = Telemetry.from_dict(
        {
            "schema": 1,
            "device_id": device,
            "ts": _ts(at),
            "seq": seq,
            "interval_s": interval,
            "model": {"name": model[0], "release": model[1]},
            "inference": {
                "count": seq * n,
                "window_count": n,
                "errors": {"runtime": errors} if errors else {},
                "error_count": errors,
            },
            "latency_ms": {
                "p50": round(p99 * 0.45, 4),
                "p95": round(p99 * 0.8, 4),
                "p99": round(p99, 4),
                "max": round(p99 * 1.3, 4),
            },
            "drift": {
                "alarm": alarm,
                "samples": 512,
                "max_psi": round(psi, 4),
                "max_feature": "rms_x",
                "max_cusum": 1.5,
                "prediction_psi": round(psi * 0.6, 4),
            },
            "resources": {"rss_bytes": 48_000_000, "cpu_percent": 11.0},
            "outbox": {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
        }
    ).to_dict()
    return Incoming(
        device_id=device, kind="telemetry", seq=seq, ts=_ts(at), received_at=at + 0.05, payload=payload, release=model[1]
    )


def _event(device: str, seq: int, at: float, kind: str, **detail: Any) -> Incoming:
    payload = Event.from_dict(
        {"schema": 1, "device_id": device, "ts": _ts(at), "seq": seq, "type": kind, "detail": detail}
    ).to_dict()
    release = detail.get("release")
    return Incoming(device_id=device, kind="event", seq=seq, ts=_ts(at), received_at=at + 0.05, payload=payload, release=release)


def fill(store: Store, now: float) -> None:
    """Five devices, their last ~45 minutes, two rollouts; deterministic (seeded)."""
    rng = random.Random(9)
    for release in (7, 8, 9):
        store.put_release(
            name="vibration",
            target="ecu",
            release=release,
            version=f"1.{release - 5}.0",
            sha256=SHA[release],
            bundle_path=f"/srv/bundles/{SHA[release]}.edgeops",
        )
    store.put_release(name="gesture", target="wearable", release=3, version="0.3.0", sha256=SHA[3], bundle_path="/srv/g3.edgeops")
    batch: list[Incoming] = []
    switch = now - 1500  # ecu-01 went from release 7 to 8 in the first wave, 25 minutes ago

    # ecu-01: long, dense history (2 400 records at 1.2 s) so the page must downsample it.
    seq = 0
    for k in range(2400):
        at = now - 2900 + k * 1.2
        seq += 1
        release = 7 if at < switch else 8
        spike = 9.0 if 1200 <= k < 1206 else 0.0
        batch.append(
            _telemetry(
                "ecu-01",
                seq,
                at,
                model=("vibration", release),
                p99=3.1 + (0.6 if release == 8 else 0) + rng.gauss(0, 0.15) + spike,
                psi=0.03 + rng.random() * 0.02,
                rate=18 + rng.gauss(0, 0.8),
                interval=1.2,
            )
        )
    seq += 1
    batch.append(_event("ecu-01", seq, switch - 30, "install_started", deploy_id=f"{ROLLOUT}-w1", release=8))
    seq += 1
    batch.append(_event("ecu-01", seq, switch + 60, "ota_committed", deploy_id=f"{ROLLOUT}-w1", release=8))
    seq += 1
    batch.append(
        _state(
            "ecu-01",
            seq,
            now - 2,
            online=True,
            target="ecu",
            tags={"site": "a", "line": "3"},
            model=("vibration", "1.3.0", 8),
            ota={"deploy_id": f"{ROLLOUT}-w1", "release": 8, "phase": "committed", "blocks_received": 40, "blocks_total": 40},
        )
    )

    # ecu-02 and ecu-03: regular 10 s telemetry.
    for device, site in (("ecu-02", "a"), ("ecu-03", "b")):
        seq = 0
        for k in range(270):
            at = now - 2700 + k * 10 + rng.random()
            seq += 1
            batch.append(
                _telemetry(
                    device,
                    seq,
                    at,
                    model=("vibration", 7),
                    p99=3.0 + rng.gauss(0, 0.2),
                    psi=0.02 + rng.random() * 0.03,
                    rate=20 + rng.gauss(0, 1),
                    errors=1 if k % 97 == 5 else 0,
                )
            )
        seq += 1
        batch.append(_event(device, seq, now - 900, "install_started", deploy_id=f"{ROLLOUT}-w2", release=8))
        seq += 1
        batch.append(_event(device, seq, now - 840, "ota_progress", deploy_id=f"{ROLLOUT}-w2", release=8, phase="held"))
        seq += 1
        batch.append(
            _event(device, seq, now - 300, "ota_rolled_back", deploy_id=f"{ROLLOUT}-w2", release=8, reason="console_rollback")
        )
        seq += 1
        held = device == "ecu-03"
        batch.append(
            _state(
                device,
                seq,
                now - 4,
                online=True,
                target="ecu",
                tags={"site": site},
                model=("vibration", "1.2.0", 7),
                ota={"deploy_id": f"{HELD_ROLLOUT}-w1", "release": 9, "phase": "held", "blocks_received": 40, "blocks_total": 40}
                if held
                else None,
            )
        )

    # ecu-04: offline for 40 minutes, with a gap in its seqs (a dropped outbox stretch).
    seq = 0
    for k in range(60):
        at = now - 3000 + k * 10
        seq += 1 if k != 30 else 13
        batch.append(_telemetry("ecu-04", seq, at, model=("vibration", 7), p99=3.3 + rng.gauss(0, 0.2), psi=0.04, rate=15))
    batch.append(
        _state("ecu-04", seq + 1, now - 2395, online=False, target="ecu", tags={"site": "b"}, model=("vibration", "1.2.0", 7))
    )

    # wear-01: a release nobody registered, drifting.
    seq = 0
    for k in range(270):
        at = now - 2700 + k * 10
        seq += 1
        psi = 0.05 + max(0.0, (k - 150) / 120) * 0.3
        batch.append(
            _telemetry(
                "wear-01",
                seq,
                at,
                model=("gesture", 42),
                p99=11 + rng.gauss(0, 0.6),
                psi=psi,
                rate=4 + rng.gauss(0, 0.3),
                alarm=psi > 0.25,
            )
        )
    seq += 1
    batch.append(_event("wear-01", seq, now - 400, "drift_alarm", feature="rms_x", psi=0.27))
    seq += 1
    batch.append(
        _state(
            "wear-01",
            seq,
            now - 1,
            online=True,
            target="wearable",
            tags={"site": "a"},
            model=("gesture", "0.4.2", 42),
            health="drift",
            last_error="<script>alert('x')</script> input rms_x out of range",
        )
    )
    batch.sort(key=lambda m: m.received_at)
    for i in range(0, len(batch), 500):
        store.ingest(batch[i : i + 500])

    gates = {
        "install_success_min": 1.0,
        "error_rate_max": 0.01,
        "latency_p99_ms": 3.5,
        "latency_factor": 1.0,
        "psi_max": 0.25,
        "drift_alarms_max": 0,
        "min_inferences": 100,
        "install_timeout_s": 600.0,
    }
    message = "wave 2 failed the latency_p99 gate: p99 latency (ms) 4.31 > 3.5 (worst telemetry p99 in ms vs budget 3.5 ms x 1)"
    store.put_rollout(
        {
            "rollout_id": ROLLOUT,
            "state": "failed",
            "name": "vibration",
            "version": "1.3.0",
            "release": 8,
            "target": "ecu",
            "sha256": SHA[8],
            "bundle_path": "/srv/b8.edgeops",
            "group": {"target": "ecu", "tags": {}},
            "group_key": "target=ecu",
            "waves": ["1", "100%"],
            "soak_s": 600.0,
            "gates": gates,
            "deadline_at": now + 80000,
            "current_wave": 1,
            "created_at": now - 1600,
            "updated_at": now - 300,
            "message": message,
            "detail": {
                "size": 40960,
                "open": False,
                "allow_bad": False,
                "waves": [
                    {"spec": "1", "soak_from": now - 1560, "extensions": 0},
                    {"spec": "100%", "soak_from": now - 900, "extensions": 1},
                ],
            },
        }
    )
    latency_text = "worst telemetry p99 in ms vs budget 3.5 ms x 1"
    store.put_wave(
        {
            "rollout_id": ROLLOUT,
            "index": 0,
            "state": "passed",
            "devices": ["ecu-01"],
            "started_at": now - 1580,
            "soak_until": now - 960,
            "ended_at": now - 950,
            "passed": True,
            "gate": {
                "install": {"value": 1.0, "limit": 1.0, "passed": True, "detail": "1 of 1 offered devices held the release"},
                "inferences": {
                    "value": 10734,
                    "limit": 100,
                    "passed": True,
                    "detail": "10734 inferences in 500 telemetry records from 1 device(s)",
                },
                "error_rate": {"value": 0.0, "limit": 0.01, "passed": True, "detail": "0 errors in 10734 inferences"},
                "latency_p99": {"value": 3.42, "limit": 3.5, "passed": True, "detail": latency_text},
                "psi": {
                    "value": 0.041,
                    "limit": 0.25,
                    "passed": True,
                    "detail": "previous release 9120 predictions vs new release 10734",
                },
                "drift_alarms": {"value": 0, "limit": 0, "passed": True, "detail": "no drift alarm"},
            },
        }
    )
    store.put_wave(
        {
            "rollout_id": ROLLOUT,
            "index": 1,
            "state": "failed",
            "devices": ["ecu-02", "ecu-03", "ecu-04"],
            "started_at": now - 930,
            "soak_until": now - 330,
            "ended_at": now - 310,
            "passed": False,
            "gate": {
                "install": {"value": 1.0, "limit": 1.0, "passed": True, "detail": "2 of 2 offered devices held the release"},
                "inferences": {
                    "value": 11520,
                    "limit": 100,
                    "passed": True,
                    "detail": "11520 inferences in 120 telemetry records from 2 device(s)",
                },
                "error_rate": {"value": 0.000868, "limit": 0.01, "passed": True, "detail": "10 errors in 11520 inferences"},
                "latency_p99": {"value": 4.31, "limit": 3.5, "passed": False, "detail": latency_text},
                "psi": {
                    "value": 0.063,
                    "limit": 0.25,
                    "passed": True,
                    "detail": "previous release 12000 predictions vs new release 11520",
                },
                "drift_alarms": {"value": 0, "limit": 0, "passed": True, "detail": "no drift alarm"},
            },
        }
    )
    outcomes = [
        ("ecu-01", 0, "committed", now - 1580, now - 950, None, None),
        ("ecu-02", 1, "rolled_back", now - 920, now - 300, "console_rollback", None),
        ("ecu-03", 1, "rolled_back", now - 920, now - 300, "console_rollback", None),
        ("ecu-04", 1, "cancelled", None, now - 310, "failed", "never offered: the rollout failed"),
    ]
    for device, wave, status, offered, ended, reason, text in outcomes:
        store.put_rollout_device(
            {
                "rollout_id": ROLLOUT,
                "device_id": device,
                "wave": wave,
                "deploy_id": f"{ROLLOUT}-w{wave + 1}",
                "status": status,
                "previous_release": 7,
                "offered_at": offered,
                "ended_at": ended,
                "reason": reason,
                "message": text,
            }
        )
    store.put_rollout(
        {
            "rollout_id": HELD_ROLLOUT,
            "state": "running",
            "name": "vibration",
            "version": "1.4.0",
            "release": 9,
            "target": "ecu",
            "sha256": SHA[9],
            "bundle_path": "/srv/b9.edgeops",
            "group": {"target": "ecu", "tags": {"site": "b"}},
            "group_key": "target=ecu,site=b",
            "waves": ["1", "100%"],
            "soak_s": 900.0,
            "gates": gates,
            "deadline_at": now + 86000,
            "current_wave": 0,
            "created_at": now - 200,
            "updated_at": now - 150,
            "message": "wave 1 of 2 starts",
            "detail": {
                "waves": [
                    {"spec": "1", "soak_from": now - 190, "extensions": 0},
                    {"spec": "100%", "soak_from": None, "extensions": 0},
                ]
            },
        }
    )
    store.put_wave(
        {
            "rollout_id": HELD_ROLLOUT,
            "index": 0,
            "state": "soaking",
            "devices": ["ecu-03"],
            "started_at": now - 195,
            "soak_until": now + 710,
            "ended_at": None,
            "passed": None,
            "gate": {
                "install": {"value": 1.0, "limit": 1.0, "passed": True, "detail": "1 of 1 offered devices held the release"}
            },
        }
    )
    store.put_wave(
        {
            "rollout_id": HELD_ROLLOUT,
            "index": 1,
            "state": "pending",
            "devices": ["ecu-04"],
            "started_at": None,
            "soak_until": None,
            "ended_at": None,
            "passed": None,
            "gate": {},
        }
    )
    store.put_rollout_device(
        {
            "rollout_id": HELD_ROLLOUT,
            "device_id": "ecu-03",
            "wave": 0,
            "deploy_id": f"{HELD_ROLLOUT}-w1",
            "status": "held",
            "previous_release": 7,
            "offered_at": now - 195,
            "ended_at": None,
            "reason": None,
            "message": None,
        }
    )
    store.put_rollout_device(
        {
            "rollout_id": HELD_ROLLOUT,
            "device_id": "ecu-04",
            "wave": 1,
            "deploy_id": f"{HELD_ROLLOUT}-w2",
            "status": "pending",
            "previous_release": 7,
            "offered_at": None,
            "ended_at": None,
            "reason": None,
            "message": None,
        }
    )


# -- serving ----------------------------------------------------------------------------------


@dataclass
class Console:
    url: str
    store: Store
    now: float


@contextlib.contextmanager
def serve(app: Starlette) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    folder = tmp_path_factory.mktemp("dashboard")
    store = Store.open(f"sqlite:///{folder / 'console.sqlite'}")
    now = float(int(time.time()))
    try:
        fill(store, now)
        with serve(Starlette(routes=routes(store, None, clock=lambda: now))) as url:
            yield Console(url, store, now)
    finally:
        store.close()


def get(c: Console, path: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(c.url + path, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8")
        exc.close()
        return exc.code, body, dict(exc.headers)


# -- reading a page as a person would ---------------------------------------------------------


@dataclass
class Page:
    """What a page shows: visible text, table rows (cell texts), elements and their attributes."""

    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    elements: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    titles: list[tuple[str, str]] = field(default_factory=list)  # (title attribute, the element's text)

    def row(self, first_cell: str) -> list[str]:
        found = [r for r in self.rows if r and r[0] == first_cell]
        assert len(found) == 1, f"expected one row for {first_cell!r}, got {found}"
        return found[0]

    def has(self, tag: str, **attrs: str) -> bool:
        return any(t == tag and all(a.get(k) == v for k, v in attrs.items()) for t, a in self.elements)


class _Reader(HTMLParser):
    _HIDDEN = ("style", "script", "head", "title", "svg")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._text: list[str] = []
        self._hidden = 0
        self._cells: list[str] | None = None
        self._cell: list[str] | None = None
        self._titled: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.page.elements.append((tag, a))
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag == "tr":
            self._cells = []
        elif tag in ("td", "th"):
            self._cell = []
        if "title" in a and tag == "span":
            self._titled.append((a["title"], []))
        if tag in ("td", "th", "div", "p", "tr", "h1", "h2", "h3", "dt", "dd", "li", "option", "br"):
            self._emit(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden -= 1
        elif tag in ("td", "th") and self._cell is not None and self._cells is not None:
            self._cells.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._cells is not None:
            self.page.rows.append(self._cells)
            self._cells = None
        elif tag == "span" and self._titled:
            title, words = self._titled.pop()
            self.page.titles.append((title, " ".join("".join(words).split())))

    def _emit(self, data: str) -> None:
        if self._hidden:
            return
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        for _, words in self._titled:
            words.append(data)

    def handle_data(self, data: str) -> None:
        self._emit(data)

    def close(self) -> None:
        super().close()
        self.page.text = " ".join("".join(self._text).split())


def read(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page


def assert_self_contained(html: str, page: Page) -> None:
    """No script, no style sheet or image from elsewhere, no link that leaves the console."""
    assert "<script" not in html.lower()
    assert not re.search(r"https?://", html, re.IGNORECASE)  # not even an SVG namespace URL
    for tag, attrs in page.elements:
        assert tag not in ("script", "link", "iframe", "object", "embed", "img"), tag
        for name in ("src", "href", "action", "srcset", "data"):
            value = attrs.get(name, "")
            assert not re.match(r"\s*(https?:)?//", value, re.IGNORECASE), f"<{tag} {name}={value!r}> leaves the console"
    assert not re.search(r"@import|url\(", html, re.IGNORECASE)


# -- pages ------------------------------------------------------------------------------------


def test_fleet_page_shows_every_device_as_an_operator_needs(console: Console) -> None:
    status, html, headers = get(console, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = read(html)
    assert_self_contained(html, page)
    assert page.has("meta", **{"http-equiv": "refresh", "content": "5"})
    for device in DEVICES:
        assert page.has("a", href=f"/devices/{device}")
    status_of = {d: page.row(d)[1] for d in DEVICES}
    assert status_of == {
        "ecu-01": "online",
        "ecu-02": "online",
        "ecu-03": "online held",
        "ecu-04": "offline",
        "wear-01": "online",
    }
    # The release nobody registered is flagged; registered ones are not.
    assert "unknown release" in page.row("wear-01")[4] and "gesture 0.4.2 · r42" in page.row("wear-01")[4]
    assert all("unknown" not in page.row(d)[4] for d in DEVICES[:4])
    assert page.row("ecu-01")[4] == "vibration 1.3.0 · r8"
    # Health, drift, latency and rate from the newest telemetry; last seen relative (absolute in the title).
    wear = page.row("wear-01")
    assert wear[5] == "drift" and wear[6].endswith("alarm") and float(wear[6].split()[0]) > 0.25
    assert re.fullmatch(r"\d+\.\d+ ms", page.row("ecu-02")[7]) and re.fullmatch(r"\d+(\.\d+)?/s", page.row("ecu-02")[8])
    assert page.row("ecu-01")[9] == "2 s ago" and page.row("ecu-04")[9] == "40 min ago"
    absolute = datetime.fromtimestamp(console.now - 2 + 0.05, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert (absolute, "2 s ago") in page.titles
    assert page.row("ecu-01")[3] == "line=3 site=a" and page.row("wear-01")[2] == "wearable"
    # Summary counts at the top.
    summary = page.text.split("target all targets")[0]
    for count, label in ((5, "devices"), (4, "online"), (1, "offline"), (1, "health not ok"), (1, "drift alarms"),
                         (1, "unknown release"), (1, "held by a rollout"), (1, "rollouts running")):  # fmt: skip
        assert f"{count} {label}" in summary, (count, label, summary)


def test_fleet_filters_by_target_and_tag(console: Console) -> None:
    page = read(get(console, "/?target=wearable")[1])
    assert [r[0] for r in page.rows[1:]] == ["wear-01"] and "showing 1 of 5" in page.text
    page = read(get(console, "/?tag=site%3Db")[1])
    assert [r[0] for r in page.rows[1:]] == ["ecu-03", "ecu-04"]
    page = read(get(console, "/?target=ecu&tag=site%3Da")[1])
    assert [r[0] for r in page.rows[1:]] == ["ecu-01", "ecu-02"] and "2 devices" in page.text
    page = read(get(console, "/?target=mobile")[1])
    assert "No device matches this filter." in page.text
    status, html, _ = get(console, "/?tag=site")
    assert status == 400 and "tag filter: expected KEY=VALUE, got 'site'" in read(html).text


def test_device_page_plots_history_events_and_gaps(console: Console) -> None:
    status, html, _ = get(console, "/devices/ecu-01")
    assert status == 200
    page = read(html)
    assert_self_contained(html, page)
    assert page.text.startswith("edgeops fleet console") and "ecu-01 online ok" in page.text
    svgs = re.findall(r"<svg.*?</svg>", html, re.DOTALL)
    assert [re.search(r'aria-label="([^"]+)"', s).group(1) for s in svgs] == ["Latency", "Drift score (PSI)", "Inference rate"]  # type: ignore[union-attr]
    for svg in svgs:
        points = [len(p.split()) for p in re.findall(r'<polyline[^>]*points="([^"]*)"', svg)]
        assert points and sum(points) <= 2 * MAX_PLOT_POINTS  # two lines, each downsampled from ~2 400 records
        assert "release 8" in svg  # the release change is marked on every plot
    # The latency spike survives downsampling: the p99 line reaches above 10 ms.
    assert "latest: p99 " in page.text and "2400 telemetry records" in page.text
    assert "ota committed" in page.text and f"deploy_id={ROLLOUT}-w1, release=8" in page.text
    assert "No gaps" in page.text

    page = read(get(console, "/devices/ecu-04")[1])
    assert page.row("31") == ["31", "42", "12"] and "12 messages never arrived" in page.text
    assert (
        "ecu-04 offline" in page.text
        and "Offline since 40 min ago: what this page shows is what the device last reported." in page.text
    )

    status, html, _ = get(console, "/devices/wear-01?window=15m")
    page = read(html)
    assert "a release this console does not know" in page.text and "gesture release 42" in page.text
    # Text from the wire is escaped, never markup.
    assert "<script>alert('x')</script> input rms_x out of range" in page.text
    assert_self_contained(html, page)
    assert "drift alarm" in page.text and "feature=rms_x, psi=0.27" in page.text

    page = read(get(console, "/devices/ecu-03")[1])
    assert "Held: release 9 passed its health check" in page.text


def test_rollout_pages_show_waves_gates_and_outcomes(console: Console) -> None:
    status, html, _ = get(console, "/rollouts")
    page = read(html)
    assert status == 200
    assert_self_contained(html, page)
    assert page.row(ROLLOUT)[:5] == [ROLLOUT, "failed", "vibration 1.3.0 · r8", "target=ecu", "2 of 2"]
    assert page.row(HELD_ROLLOUT)[:2] == [HELD_ROLLOUT, "running"]
    assert page.has("meta", **{"http-equiv": "refresh", "content": "5"})  # a rollout is running

    status, html, _ = get(console, f"/rollouts/{ROLLOUT}")
    page = read(html)
    assert status == 200
    assert_self_contained(html, page)
    assert not page.has("meta", **{"http-equiv": "refresh"})  # finished: nothing will change
    assert "wave 2 failed the latency_p99 gate: p99 latency (ms) 4.31 > 3.5" in page.text
    assert page.row("Wave 1")[:4] == ["Wave 1", "1", "passed", "ecu-01"]
    assert (
        page.row("Wave 2")[:4] == ["Wave 2", "100%", "failed", "ecu-02 ecu-03 ecu-04"] and "extended 1×" in page.row("Wave 2")[5]
    )
    # Gate results: one row per gate, the limit, then each wave's measured value and verdict.
    latency = "worst telemetry p99 in ms vs budget 3.5 ms x 1"
    assert page.row("p99 latency") == ["p99 latency", "≤ 3.5 ms", "3.42 ms pass", f"4.31 ms fail {latency}"]
    assert page.row("install success") == ["install success", "≥ 100.00 %", "100.00 % pass", "100.00 % pass"]
    assert page.row("error rate") == ["error rate", "≤ 1.00 %", "0.00 % pass", "0.09 % pass"]
    assert page.row("inferences in the soak") == ["inferences in the soak", "≥ 100", "10,734 pass", "11,520 pass"]
    assert page.row("prediction PSI") == ["prediction PSI", "≤ 0.250", "0.041 pass", "0.063 pass"]
    names = [r[0] for r in page.rows if len(r) == 4 and r[1][:1] in "≤≥"]
    assert names == [
        "install success",
        "inferences in the soak",
        "error rate",
        "p99 latency",
        "prediction PSI",
        "devices with a drift alarm",
    ]
    assert (latency, "3.42 ms") in page.titles  # a passing gate's detail is one hover away
    assert "error rate ≤ 1.00 %" in page.text and "p99 latency ≤ 3.5 ms" in page.text and "install timeout 10 min" in page.text
    # Pass and fail are coloured (green and red), not only worded.
    assert '<span class="badge bad">fail</span>' in html and '<span class="badge good">pass</span>' in html
    assert 'class="val bad-text"' in html and 'class="val good-text"' in html
    # Device outcomes.
    assert page.row("ecu-02")[:4] == ["ecu-02", "2", "rolled back", "7"] and page.row("ecu-01")[:3] == [
        "ecu-01",
        "1",
        "committed",
    ]
    assert page.row("ecu-04")[2] == "cancelled" and "never offered: the rollout failed" in page.row("ecu-04")[6]

    page = read(get(console, f"/rollouts/{HELD_ROLLOUT}")[1])
    assert page.row("Wave 1")[:3] == ["Wave 1", "1", "soaking"] and page.row("Wave 1")[5] == "ends in 12 min"
    assert page.row("Wave 2")[:4] == ["Wave 2", "100%", "pending", "ecu-04"] and page.row("ecu-03")[2] == "held"
    assert page.row("install success")[2:] == ["100.00 % pass", "—"] and "wave 1 of 2 starts" in page.text


def test_unknown_device_and_rollout_are_404_pages(console: Console) -> None:
    for path, message in (
        ("/devices/nope-9", "No device 'nope-9' has reported"),
        ("/rollouts/ro-x", "No rollout 'ro-x' is known"),
    ):
        status, html, headers = get(console, path)
        assert status == 404 and headers["content-type"].startswith("text/html")
        page = read(html)
        assert "Not found" in page.text and message in page.text and page.has("a", href="/")
    status, html, _ = get(console, "/devices/ecu-01?window=2y")
    assert status == 400 and "window: expected one of 15m, 1h, 6h, 24h, 7d, got '2y'" in read(html).text


def test_downsample_keeps_extremes_and_breaks() -> None:
    pts: list[tuple[float, float | None]] = [(float(i), float(i % 7)) for i in range(10_000)]
    pts[5000] = (5000.0, 99.0)
    pts[7000:7100] = [(float(i), None) for i in range(7000, 7100)]
    out = downsample(pts)
    assert len(out) <= MAX_PLOT_POINTS and out == sorted(out, key=lambda p: p[0])
    assert max(v for _, v in out if v is not None) == 99.0 and min(v for _, v in out if v is not None) == 0.0
    assert any(v is None for _, v in out)
    assert downsample(pts[:50]) == pts[:50]


# -- in a real browser ------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: scripts/setup.sh --dev installs it (apt package chromium)")


def _chromium_run(url: str, tmp: Path, *mode: str, height: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={tmp / 'profile'}", f"--window-size=1280,{height}", *mode, url,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _screenshot(url: str, out: Path, tmp: Path, height: int = 900) -> np.ndarray:
    import matplotlib.image

    _chromium_run(url, tmp, f"--screenshot={out}", height=height)
    assert out.is_file()
    return np.asarray(matplotlib.image.imread(out))[..., :3]


def _near(img: np.ndarray, rgb: str) -> int:
    """Pixels within a small distance of the colour ``#rrggbb``."""
    want = np.array([int(rgb[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(img - want).max(axis=2) < 0.03).sum())


def test_dashboard_renders_in_headless_chromium(console: Console, tmp_path: Path) -> None:
    """What Chromium builds and draws: the devices, the flag, the rollout; badges in colour."""
    dom = read(_chromium_run(console.url + "/", tmp_path, "--dump-dom").stdout)
    assert [r[0] for r in dom.rows[1:]] == list(DEVICES)
    assert dom.row("ecu-04")[1] == "offline" and "unknown release" in dom.row("wear-01")[4]
    dom = read(_chromium_run(console.url + f"/rollouts/{ROLLOUT}", tmp_path, "--dump-dom").stdout)
    assert dom.row("p99 latency") == [
        "p99 latency",
        "≤ 3.5 ms",
        "3.42 ms pass",
        "4.31 ms fail worst telemetry p99 in ms vs budget 3.5 ms x 1",
    ]

    shots = {
        "fleet": console.url + "/",
        "rollout": console.url + f"/rollouts/{ROLLOUT}",
        "device": console.url + "/devices/ecu-01",
    }
    # The device page is taller than a laptop screen: its last plot sits at the fold, and a
    # browser with taller fonts (CI's) pushes it below, so that page is shot whole.
    heights = {"fleet": 900, "rollout": 900, "device": 1300}
    images = {name: _screenshot(url, tmp_path / f"dashboard-{name}.png", tmp_path, heights[name]) for name, url in shots.items()}
    for name, img in images.items():
        assert img.shape[:2] == (heights[name], 1280), name
        colours = {tuple(px) for px in (img * 255).astype(np.uint8).reshape(-1, 3)[::3]}
        assert len(colours) > 150, name  # text, badges, tables: not a blank or an error page
        assert _near(img, "#1f2937") > 1280 * 30, name  # the header bar is drawn
    # The fleet's badges: green "online", red "offline" / "unknown release", amber "held".
    fleet = images["fleet"]
    assert _near(fleet, "#dcfce7") > 2000 and _near(fleet, "#fee2e2") > 1000 and _near(fleet, "#fef3c7") > 300
    rollout = images["rollout"]
    assert _near(rollout, "#dcfce7") > 2000 and _near(rollout, "#fee2e2") > 300
    device = images["device"]
    assert _near(device, "#2563eb") > 500 and _near(device, "#16a34a") > 500  # the plotted lines
    for name in shots:
        size = (tmp_path / f"dashboard-{name}.png").stat().st_size
        assert 20_000 < size < 400_000, (name, size)
    if os.environ.get("EDGEOPS_UPDATE_SCREENSHOTS") == "1":
        for name in shots:
            shutil.copy(tmp_path / f"dashboard-{name}.png", REPO / "docs" / "img" / f"dashboard-{name}.png")


class _Counting:
    """The store, counting the reads each page makes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if callable(attr):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return attr(*args, **kwargs)

            return counted
        return attr


def test_pages_read_the_store_a_bounded_number_of_times(console: Console) -> None:
    """However many devices: the fleet table is one device read; a device page one bounded history window."""
    counting = _Counting(console.store)
    app = Starlette(routes=routes(counting, None, clock=lambda: console.now))  # type: ignore[arg-type]
    with serve(app) as url:
        c = Console(url, console.store, console.now)
        assert get(c, "/")[0] == 200
        assert sorted(counting.calls) == ["devices", "releases", "rollouts"]
        counting.calls.clear()
        assert get(c, "/devices/ecu-01")[0] == 200
        assert sorted(counting.calls) == ["device", "gaps", "history", "history", "releases"]
        counting.calls.clear()
        assert get(c, f"/rollouts/{ROLLOUT}")[0] == 200
        assert sorted(counting.calls) == ["rollout", "rollout_devices", "waves"]


class _Locked(_Counting):
    """The store while its database stays locked: every read ends in the store's one-line error."""

    def __getattr__(self, name: str) -> Any:
        def locked(*args: Any, **kwargs: Any) -> Any:
            raise StoreError("database sqlite:///console.sqlite stayed locked for 10 s: database is locked")

        return locked


def test_empty_console_and_unavailable_store_render_clear_pages(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        with serve(Starlette(routes=routes(store, None))) as url:
            c = Console(url, store, time.time())
            status, html, _ = get(c, "/")
            assert status == 200 and "No device has reported yet." in read(html).text and "0 devices" in read(html).text
            status, html, _ = get(c, "/rollouts")
            assert status == 200 and "No rollout yet." in read(html).text
        with serve(Starlette(routes=routes(_Locked(store), None))) as url:  # type: ignore[arg-type]
            for path in ("/", "/devices/ecu-01", "/rollouts", f"/rollouts/{ROLLOUT}"):
                status, html, _ = get(Console(url, store, time.time()), path)
                page = read(html)
                assert status == 503 and "Store unavailable" in page.text and "database is locked" in page.text, path
    finally:
        store.close()


def test_the_anomaly_rate_gate_and_its_option_read_as_percentages() -> None:
    from edgeops_fleet.dashboard import _LIMIT_LOOK, _gate_order, _gate_view

    view = _gate_view("anomaly_rate", {"value": 0.3125, "limit": 0.05, "passed": False, "detail": "250 anomalies in 800"})
    assert (view["name"], view["value"], view["op"], view["limit"], view["verdict"]) == (
        "anomaly rate",
        "31.25 %",
        "≤",
        "5.00 %",
        "fail",
    )
    assert _LIMIT_LOOK["anomaly_rate_max"] == ("anomaly rate rise ≤", "percent")
    assert _gate_order({"drift_alarms": {}, "anomaly_rate": {}, "psi": {}}) == ["psi", "anomaly_rate", "drift_alarms"]


def test_an_anomaly_models_task_and_rate_show_in_the_fleet_row_and_its_anomalies_on_the_device_plot() -> None:
    from edgeops_fleet.dashboard import _device_plots, _fleet_row

    def tel(count: int, window: int, task: str = "anomaly") -> dict[str, Any]:
        inference: dict[str, Any] = {"window_count": window, "task": task, "predicted": None}
        if task == "anomaly":
            inference["anomaly"] = {"count": count, "rate": count / window}
        return {"interval_s": 10.0, "inference": inference, "latency_ms": {}, "drift": None}

    row = _fleet_row({"device_id": "a-1", "last_telemetry": tel(3, 200), "model": "m", "release": 1}, {"m": {1}})
    assert (row["task"], row["anomaly_rate"], row["rate"]) == ("anomaly", 0.015, 20.0)
    plain = _fleet_row({"device_id": "c-1", "last_telemetry": {"inference": {"task": "classification"}}}, {})
    assert (plain["task"], plain["anomaly_rate"]) == (None, None)
    hostile = {"inference": {"task": "anomaly", "anomaly": {"count": 1, "rate": "lots"}}}
    assert _fleet_row({"device_id": "x", "last_telemetry": hostile}, {})["anomaly_rate"] is None

    rows = [{"received_at": 1000.0 + 10 * i, "release": 1, "payload": tel(i, 100)} for i in range(1, 4)]
    rate_plot = _device_plots(rows, start=990.0, end=1040.0)[2]
    legend = {e["label"]: e["last"] for e in rate_plot["legend"]}
    assert list(legend) == ["inferences", "errors", "anomalies"] and legend["anomalies"] == "0.30/s"
    rows = [{"received_at": 1000.0, "release": 1, "payload": tel(0, 100, task="classification")}]
    assert [e["label"] for e in _device_plots(rows, start=990.0, end=1040.0)[2]["legend"]] == ["inferences", "errors"]


def test_an_anomaly_device_renders_its_task_rate_and_anomalies(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'console.sqlite'}")
    now = float(int(time.time()))
    try:
        state = _state("an-1", 1, now - 60, online=True, target="ecu", tags={}, model=("vib-anomaly", "1.0.0", 7))
        rows = [state]
        for i in range(1, 5):
            t = _telemetry("an-1", 1 + i, now - 50 + 10 * i, model=("vib-anomaly", 7), p99=0.2, psi=0.01, rate=20.0)
            inference = {**t.payload["inference"], "predicted": None, "task": "anomaly", "anomaly": {"count": 4, "rate": 0.02}}
            payload = Telemetry.from_dict({**t.payload, "inference": inference}).to_dict()  # the contract accepts it
            rows.append(dataclasses.replace(t, payload=payload))
        store.ingest(rows)
        with serve(Starlette(routes=routes(store, None, clock=lambda: now))) as url:
            c = Console(url, store, now)
            status, html, _ = get(c, "/")
            assert status == 200
            page = read(html)
            cells = page.row("an-1")
            assert "anomaly" in cells[4] and "2.0 % anomalous" in cells[8], cells
            status, html, _ = get(c, "/devices/an-1")
            assert status == 200 and "anomalies" in read(html).text
    finally:
        store.close()
