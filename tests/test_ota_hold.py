"""Held trials (issue 9): a deploy with ``hold_s`` waits, held, for the console's commit or rollback.

Real Mosquitto, real ``edgeops-agent run`` processes and the real block sender, through the
rig of tests/test_ota_agent.py (its fixtures are imported, so the session's one built
bundle and its re-signed releases are shared; no new model build).
"""

# ruff: noqa: F811 - the imported fixtures are requested by name as parameters

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Built
from edgeops_core import Event, OtaOutcome, commit_command, rollback_command
from test_ota_agent import (  # noqa: F401 - releases and rig are fixtures used by name
    Console,
    Device,
    _active_release,
    _final,
    _online,
    _serving_tick,
    releases,
    rig,
)

FLOOR = "vibration-classifier"


def _held(console: Console, dev: Device, deploy_id: str) -> None:
    """Wait until the device reports ``deploy_id`` held (an ``ota_progress`` and the retained state)."""

    def held() -> bool:
        events = [p for p in console.of("ota_progress") if p["detail"]["deploy_id"] == deploy_id]
        return any(p["detail"]["phase"] == "held" for p in events)

    console.wait(held, f"{deploy_id} held", 40, _serving_tick(dev))
    console.wait(lambda: (console.states[-1].get("ota") or {}).get("phase") == "held", "the retained state showing held", 10)


def _rejected(console: Console, command_id: str) -> dict[str, Any]:
    console.wait(
        lambda: any(e["detail"].get("id") == command_id for e in console.of("command_rejected")), f"{command_id} rejected"
    )
    return next(e for e in console.of("command_rejected") if e["detail"].get("id") == command_id)


def _send(console: Console, dev: Device, payload: bytes) -> str:
    console.publish(f"edgeops/v1/{dev.name}/cmd", payload)
    return str(json.loads(payload)["id"])


def _hold_state(dev: Device) -> tuple[int, int, bool]:
    """(active release, floor, trial pending) from the state file."""
    state = dev.state_file()
    return _active_release(dev), int(state["highest_release"][FLOOR]), state["trial"] is not None


def test_a_held_deploy_waits_for_commit_then_commits_and_refuses_a_later_rollback(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    unknown = _send(console, dev, commit_command("d-nowhere"))
    assert "no such deploy" in _rejected(console, unknown)["detail"]["message"]

    deploy = console.serve(releases["r2"], "d-hold", built.public_key, block_size=16384)
    console.send_deploy(deploy, hold_s=600)
    _held(console, dev, "d-hold")
    assert _hold_state(dev) == (2, 1, True)  # the new model serves, floor not raised, old slot kept
    assert dev.status()["slots"][dev.status()["active"]]["release"] == 2
    assert all(r["ok"] for r in dev.predict(3))
    time.sleep(1.0)
    assert not console.finals("d-hold")  # held: nothing final until the console says so
    record = json.loads((dev.data / "ota.json").read_text())["current"]
    assert record["phase"] == "held" and record["hold_s"] == 600 and record["hold_until"] > time.time() + 500

    console.publish(f"edgeops/v1/{dev.name}/cmd", commit_command("d-hold", command_id="c-commit"))
    final = _final(console, dev, "d-hold")
    assert final["type"] == "ota_committed" and final["detail"]["reason"] is None, final
    assert _hold_state(dev) == (2, 2, False)
    # command_done is queued after the handler that queued the final event returns: it comes next.
    console.wait(lambda: any(e["detail"]["id"] == "c-commit" for e in console.of("command_done")), "c-commit done", 10)
    done = [e for e in console.of("command_done") if e["detail"]["id"] == "c-commit"]
    assert done and done[0]["detail"]["committed"] is True
    console.wait(lambda: (console.states[-1].get("ota") or {}).get("phase") == "committed", "state ota committed")

    # Too late to roll back (the floor was raised), and a second commit does nothing.
    late = _send(console, dev, rollback_command("d-hold"))
    assert "floor" in _rejected(console, late)["detail"]["message"]
    again = _send(console, dev, commit_command("d-hold"))
    assert "has ended (committed)" in _rejected(console, again)["detail"]["message"]
    assert len(console.finals()) == 1 and _active_release(dev) == 2


def test_a_held_deploy_rolled_back_by_the_console_serves_the_old_model_and_is_marked_bad(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-back", built.public_key, block_size=16384)
    console.send_deploy(deploy, hold_s=600)
    _held(console, dev, "d-back")
    console.publish(f"edgeops/v1/{dev.name}/cmd", rollback_command("d-back"))
    final = _final(console, dev, "d-back")
    outcome = OtaOutcome.from_event(Event.from_dict(final))  # the wire contract reads it
    assert (outcome.type, outcome.reason) == ("ota_rolled_back", "console_rollback"), final
    assert "rolled back by the console" in final["detail"]["message"]
    assert _hold_state(dev) == (1, 1, False)  # the old release is active, the floor never moved
    assert all(r["ok"] for r in dev.predict(3))
    console.wait(lambda: (console.states[-1].get("ota") or {}).get("phase") == "rolled_back", "state ota rolled_back")
    assert console.states[-1]["bundle"]["release"] == 1  # what the process serves

    # The same bundle again: refused before a single request (its sha256 is marked bad).
    asked = console.requests
    again = console.serve(releases["r2"], "d-back-2", built.public_key, block_size=16384)
    console.send_deploy(again, hold_s=600)
    assert (_final(console, dev, "d-back-2")["detail"]["reason"]) == "marked_bad"
    assert console.requests == asked
    late = _send(console, dev, rollback_command("d-back"))
    assert "has ended (rolled_back)" in _rejected(console, late)["detail"]["message"]
    assert len(console.finals()) == 2


def test_a_hold_that_runs_out_commits_by_itself_and_says_so(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-expire", built.public_key, block_size=16384)
    console.send_deploy(deploy, hold_s=2)
    _held(console, dev, "d-expire")
    final = _final(console, dev, "d-expire", timeout=20)
    outcome = OtaOutcome.from_event(Event.from_dict(final))
    assert (outcome.type, outcome.reason) == ("ota_committed", "hold_expired"), final
    assert "without a commit or rollback from the console: committed by the device" in final["detail"]["message"]
    assert _hold_state(dev) == (2, 2, False)
    assert "committed by the device" in dev.log.read_text()


def test_kill_9_and_clean_restarts_while_held_keep_it_held_and_a_later_commit_works(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()  # max_boots = 1: a crash-loop count that ordinary restarts must not reach
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-survive", built.public_key, block_size=16384)
    console.send_deploy(deploy, hold_s=600)
    _held(console, dev, "d-survive")
    until = json.loads((dev.data / "ota.json").read_text())["current"]["hold_until"]

    assert dev.proc is not None
    dev.proc.send_signal(signal.SIGKILL)
    assert dev.wait_dead() == -signal.SIGKILL
    for restart in ("after kill -9", "after SIGTERM"):
        online = sum(1 for s in console.states if s["online"])
        dev.start()
        console.wait(lambda n=online: sum(1 for s in console.states if s["online"]) > n, f"online {restart}")  # type: ignore[misc]
        record = json.loads((dev.data / "ota.json").read_text())["current"]
        assert record["phase"] == "held" and record["hold_until"] == until, (restart, record)
        assert record["boots"] == 1, (restart, record)  # a SIGTERM reset it: only crashes in a row count
        assert _hold_state(dev) == (2, 1, True), restart
        assert (console.states[-1].get("ota") or {}).get("phase") == "held"
        assert all(r["ok"] for r in dev.predict(2))
        if restart == "after kill -9":
            dev.stop()  # a clean stop: not a crash
    assert not console.finals("d-survive")
    console.publish(f"edgeops/v1/{dev.name}/cmd", commit_command("d-survive"))
    final = _final(console, dev, "d-survive")
    assert final["type"] == "ota_committed", final
    assert _hold_state(dev) == (2, 2, False)


def test_a_held_release_that_keeps_dying_right_after_start_up_is_rolled_back_as_a_crash_loop(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()  # max_boots = 1
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-dies", built.public_key, block_size=16384)
    console.send_deploy(deploy, hold_s=600)
    _held(console, dev, "d-dies")
    for boots in (1, 2):  # each process dies within seconds: not an ordinary restart
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGKILL)
        assert dev.wait_dead() == -signal.SIGKILL
        online = sum(1 for s in console.states if s["online"])
        dev.start()
        console.wait(lambda n=online: sum(1 for s in console.states if s["online"]) > n, f"start-up {boots}")  # type: ignore[misc]
    final = _final(console, dev, "d-dies")  # the second start-up is more than max_boots: rolled back before loading
    assert (final["type"], final["detail"]["reason"]) == ("ota_rolled_back", "crash_loop"), final
    assert "in a row while held" in final["detail"]["message"]
    assert _hold_state(dev) == (1, 1, False)
    assert all(r["ok"] for r in dev.predict(3))
