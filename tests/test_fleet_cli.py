"""``edgeops fleet devices|history|watch|rollout`` against a real console over HTTP.

The console runs in process (real Mosquitto, real SQLite); the CLI runs as a user runs it,
in a subprocess. Every bad input ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Broker, free_port
from conftest import run_edgeops
from edgeops_fleet.console import Console
from edgeops_fleet.link import BrokerUrl
from edgeops_fleet.store import Store
from test_fleet_console import Publisher, event, history, state, telemetry, wait_for


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[tuple[Console, str]]:
    """A console with two ecu devices and one wearable that reported in; ``(console, url)``."""
    store = Store.open(f"sqlite:///{tmp_path / 'console.sqlite'}")
    console = Console(BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), bundles_dir=tmp_path / "bundles")
    console.start()
    pub = Publisher(broker.port, "cli-test-publisher")
    try:
        for device_id, target in (("ecu-1", "ecu"), ("ecu-2", "ecu"), ("watch-1", "wearable")):
            pub.send(device_id, "state", state(device_id, 1, target=target))
            for seq in (2, 3, 5):
                pub.send(device_id, "telemetry", telemetry(device_id, seq))
        pub.send("ecu-1", "events", event("ecu-1", 6))
        wait_for(lambda: len(history(console, "ecu-1")) == 5 and len(history(console, "watch-1")) == 4, what="the fleet")
        address = console.http_address or ("", 0)
        yield console, f"http://{address[0]}:{address[1]}"
    finally:
        pub.close()
        console.stop()
        store.close()


def edgeops(url: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {"EDGEOPS_CONSOLE": url}
    if token is not None:
        env["EDGEOPS_CONSOLE_TOKEN"] = token
    done = run_edgeops(*args, env=env)
    return done.returncode, done.stdout, done.stderr


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_devices_lists_the_fleet_and_filters_by_target(fleet: tuple[Console, str]) -> None:
    _, url = fleet
    code, out, err = edgeops(url, "fleet", "devices", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and sorted(d["device_id"] for d in doc["devices"]) == ["ecu-1", "ecu-2", "watch-1"]
    code, out, err = edgeops(url, "fleet", "devices", "--group", "target=ecu", "--json")
    assert code == 0, err
    assert sorted(d["device_id"] for d in json.loads(out)["devices"]) == ["ecu-1", "ecu-2"]
    code, out, err = edgeops(url, "fleet", "devices", "--target", "wearable")
    assert code == 0, err
    assert "watch-1" in out and "ecu-1" not in out


def test_history_shows_messages_and_gaps(fleet: tuple[Console, str]) -> None:
    _, url = fleet
    code, out, err = edgeops(url, "fleet", "history", "ecu-1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["seq"] for r in doc["history"]] == [1, 2, 3, 5, 6]
    assert doc["gaps"] == [[4, 4]]
    code, out, err = edgeops(url, "fleet", "history", "ecu-1", "--since", "1h", "--kinds", "event", "--json")
    assert code == 0, err
    assert [r["kind"] for r in json.loads(out)["history"]] == ["event"]
    code, out, err = edgeops(url, "fleet", "history", "ecu-1", "--since", "2020-01-01T00:00:00Z")
    assert code == 0, err
    assert "drift_alarm" in out and "gaps (seq never received): 4" in out
    code, out, err = edgeops(url, "fleet", "history", "ecu-1", "--since", "2099-01-01T00:00:00Z", "--json")
    assert code == 0 and json.loads(out)["history"] == []


def test_watch_prints_one_json_line_per_poll(fleet: tuple[Console, str]) -> None:
    _, url = fleet
    code, out, err = edgeops(url, "fleet", "watch", "--json", "--interval", "0.1", "--count", "3", "--target", "ecu")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(sorted(d["device_id"] for d in json.loads(line)["devices"]) == ["ecu-1", "ecu-2"] for line in lines)
    code, out, err = edgeops(url, "fleet", "watch", "--count", "1")  # not a terminal: one plain table
    assert code == 0, err
    assert "watch-1" in out and "\x1b[" not in out


def test_rollout_status_with_no_rollout(fleet: tuple[Console, str]) -> None:
    _, url = fleet
    code, out, err = edgeops(url, "fleet", "rollout", "status", "--json")
    assert code == 0, err
    assert json.loads(out) == {"ok": True, "rollouts": []}
    code, out, err = edgeops(url, "fleet", "rollout", "status", "r-nope")
    assert code == 2 and "no rollout 'r-nope'" in one_line_error(err)
    code, out, err = edgeops(url, "fleet", "rollout", "abort", "r-nope", "--json")
    assert code == 2 and json.loads(out)["ok"] is False


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--group", "ecu"), "--group must be KEY=VALUE"),
        (("--group", "site=a"), "--group must name a target"),
        (("--group", "target=ecu", "--tag", "site"), "--tag must be KEY=VALUE"),
        (("--group", "target=ecu", "--gate", "error_rate_max"), "must be NAME=VALUE"),
        (("--group", "target=ecu", "--gate", "error_rate_max=2"), "error_rate_max must be a finite number"),
        (("--group", "target=ecu", "--gate", "bogus=1"), "unknown gate option 'bogus'"),
        (("--group", "target=ecu", "--waves", "50%,10%"), "waves"),
        (("--group", "target=ecu", "--soak", "forever"), "duration"),
    ],
)
def test_rollout_start_refuses_bad_options_in_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    bundle = tmp_path / "b.edgeops"
    bundle.write_bytes(b"not a bundle")
    code, _, err = edgeops(
        f"http://127.0.0.1:{free_port()}", "fleet", "rollout", "start", str(bundle), "--waves", "1,100%", "--soak", "1m", *args
    )
    assert code == 2
    assert expected in one_line_error(err)


def test_unreachable_console_and_missing_token_are_one_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = edgeops(dead, "fleet", "devices")
    assert code == 5 and "cannot reach the console" in one_line_error(err)
    code, out, err = edgeops(dead, "fleet", "rollout", "status", "--json")
    assert code == 5 and json.loads(out)["error"]["type"] == "ConsoleError"
    code, out, err = edgeops("ftp://example", "fleet", "devices")
    assert code == 2 and "must be http://HOST:PORT" in one_line_error(err)


def test_a_console_with_a_token_refuses_the_cli_without_it(tmp_path: Path, broker: Broker) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'console.sqlite'}")
    console = Console(
        BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), token="tok-123", bundles_dir=tmp_path / "b"
    )
    console.start()
    try:
        address = console.http_address or ("", 0)
        url = f"http://{address[0]}:{address[1]}"
        code, out, err = edgeops(url, "fleet", "devices")
        assert code == 5 and "token" in one_line_error(err)
        code, out, err = edgeops(url, "fleet", "devices", "--json", token="tok-123")
        assert code == 0 and json.loads(out) == {"ok": True, "devices": []}
    finally:
        console.stop()
        store.close()


def test_serve_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_CONSOLE_TOKEN"}
    done = run_edgeops("fleet", "serve", "--broker", "http://x", env=env)
    assert done.returncode == 2 and "mqtt://" in one_line_error(done.stderr)
    done = run_edgeops("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--http", "nope", env=env)
    assert done.returncode == 2 and "HOST:PORT" in one_line_error(done.stderr)
    db = tmp_path / "c.sqlite"
    done = run_edgeops("fleet", "serve", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--db", f"sqlite:///{db}",
                       "--http", "127.0.0.1:0", env=env)  # fmt: skip
    assert done.returncode == 5 and "cannot reach the broker" in one_line_error(_errors(done.stderr))


def _errors(stderr: str) -> str:
    """Only the error line(s) (serve logs its start-up at INFO before failing)."""
    return "\n".join(line for line in stderr.splitlines() if line.startswith("error: "))


def test_history_summary_shows_an_anomaly_models_flagged_inputs() -> None:
    from edgeops_toolchain.fleet_cli import _summary

    inference = {"count": 900, "error_count": 0, "task": "anomaly", "anomaly": {"count": 3, "rate": 0.015}}
    row = {"kind": "telemetry", "payload": {"inference": inference, "latency_ms": {"p99": 0.2}, "drift": None}}
    assert _summary(row) == "n=900 errors=0 p99=0.2 ms anomalies=3 (0.015)"
    classifier = {"kind": "telemetry", "payload": {"inference": {"count": 5, "error_count": 1}, "latency_ms": {}}}
    assert _summary(classifier) == "n=5 errors=1 p99=- ms"


@pytest.mark.parametrize("module", ["cli_common", "fleet_cli", "field_cli", "keys_cli", "pki_cli", "cli"])
def test_each_command_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """The command modules depend on cli_common, not on cli (which imports them all): a
    module imported first used to meet a half-initialised fleet_cli through cli."""
    import subprocess
    import sys

    code = (
        f"import json, edgeops_toolchain.{module}; from edgeops_toolchain.cli import main; "
        "print(json.dumps({name: sorted(getattr(cmd, 'commands', {})) for name, cmd in main.commands.items()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    commands = json.loads(proc.stdout)
    assert {"build", "verify", "data", "demo", "fleet", "keys"} <= set(commands)
    assert {"generate", "root", "rotate", "revoke"} <= set(commands["keys"])
    assert {"deploy", "status", "trust-push", "ca", "provision"} <= set(commands["fleet"])
