"""``edgeops data …`` and ``edgeops fleet autopilot|retrain|approve|runs`` against a real console over HTTP.

The console runs in process (real Mosquitto, real SQLite); devices' ``samples`` uploads
arrive over MQTT as an agent publishes them; the CLI runs in a subprocess as a user runs it.
The autopilot's worker is stopped, so a requested run stays queued (the runs themselves, with
real builds, are tests/test_autopilot.py).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Broker
from edgeops_core import ModelRef, Samples, utc_now_text
from edgeops_core.fielddata import load_field_dataset
from edgeops_fleet.autopilot import build_dataset
from edgeops_fleet.console import Console
from edgeops_fleet.link import BrokerUrl
from edgeops_fleet.store import Store
from test_autopilot import FEATURES, LABELS, shifted_rows
from test_fleet_cli import edgeops, one_line_error
from test_fleet_console import Publisher, state, wait_for

GROUP = "target=ecu,line=b"


@pytest.fixture
def console(tmp_path: Path, broker: Broker) -> Iterator[tuple[Console, str]]:
    store = Store.open(f"sqlite:///{tmp_path / 'console.sqlite'}")
    console = Console(
        BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), bundles_dir=tmp_path / "b", work_dir=tmp_path / "w"
    )
    console.start()
    console.autopilot.stop()  # runs stay queued: this file tests the CLI and the API, not the builds
    pub = Publisher(broker.port, "autopilot-cli-test")
    try:
        for i, device_id in enumerate(("ecu-1", "ecu-2")):
            pub.send(device_id, "state", state(device_id, 1))
            x, labels = shifted_rows(40, 30 + i, shaft_rpm=2700)
            labels = [lb if k % 2 else None for k, lb in enumerate(labels)]  # half of them labelled
            msg = Samples(
                device_id=device_id, ts=utc_now_text(), command_id=f"c{i}", model=ModelRef("vibration-classifier", 1),
                feature_names=FEATURES, rows=tuple(tuple(map(float, r)) for r in x), labels=tuple(labels),
                label_names=LABELS, scores=(0.5,) * len(labels),
            )  # fmt: skip
            pub.send(device_id, "samples", msg.to_json())
        pub.send("ecu-2", "samples", b'{"schema": 1, "kind": "samples", "rows": "not rows"}')
        wait_for(lambda: len(store.uploads()) == 2 and len(store.rejects()) == 1, what="the uploads over MQTT")
        address = console.http_address or ("", 0)
        yield console, f"http://{address[0]}:{address[1]}"
    finally:
        pub.close()
        console.stop()
        store.close()


def test_uploads_over_mqtt_become_a_dataset_that_data_commands_trace_back(console: tuple[Console, str], tmp_path: Path) -> None:
    c, url = console
    uploads = c.store.uploads(with_payload=True)
    assert [u["labelled"] for u in uploads] == [20, 20] and [u["rows"] for u in uploads] == [40, 40]
    dataset, left_out = build_dataset(uploads, FEATURES, LABELS, {"target": "ecu", "tags": {"line": "b"}})
    assert left_out == 0
    c.store.put_dataset(
        digest=dataset.digest, group_key=GROUP, run_id="run-x", rows=80, labelled=40,
        provenance=dataset.provenance.to_dict(), data=dataset.to_bytes(),
    )  # fmt: skip

    code, out, err = edgeops(url, "data", "list", "--json")
    assert code == 0, err
    (row,) = json.loads(out)["datasets"]
    assert row["digest"] == dataset.digest and row["rows"] == 80 and row["labelled"] == 40

    prefix = dataset.digest.removeprefix("sha256:")[:12]
    code, out, err = edgeops(url, "data", "show", prefix)
    assert code == 0, err
    assert dataset.digest in out and "ecu-1, ecu-2" in out and "40 labelled, 50%" in out
    assert dataset.provenance.first_ts in out and dataset.provenance.last_ts in out and "target=ecu,line=b" in out

    dest = tmp_path / "exported" / "field.npz"
    code, out, err = edgeops(url, "data", "export", dataset.digest, "-o", str(dest), "--json")
    assert code == 0, err
    assert json.loads(out)["digest"] == dataset.digest
    assert load_field_dataset(dest, expect_digest=dataset.digest).provenance.devices == ("ecu-1", "ecu-2")

    code, _, err = edgeops(url, "data", "show", "ffffffffffff")
    assert code == 2 and "no field dataset" in one_line_error(err)
    code, _, err = edgeops(url, "data", "show", "not-a-digest")
    assert code == 2 and "sha256:<hex>" in one_line_error(err)


def test_autopilot_set_retrain_runs_and_approve(console: tuple[Console, str], small_project: Path) -> None:
    _, url = console
    code, out, err = edgeops(url, "fleet", "autopilot", "set", GROUP, "--mode", "propose", "--project", str(small_project),
                             "--set", "drift_devices=2", "--set", "schedule_s=none", "--waves", "1,100%", "--json")  # fmt: skip
    assert code == 0, err
    config = json.loads(out)["config"]
    assert config["mode"] == "propose" and config["drift_devices"] == 2 and config["schedule_s"] is None
    code, _, err = edgeops(url, "fleet", "autopilot", "set", GROUP, "--mode", "auto", "--project", str(small_project),
                           "--set", "margin=2")  # fmt: skip
    assert code == 2 and "margin" in one_line_error(err)
    code, _, err = edgeops(url, "fleet", "autopilot", "set", GROUP, "--mode", "auto", "--set", "margin=nan")
    assert code == 2 and "expected a finite number" in one_line_error(err)
    code, _, err = edgeops(url, "fleet", "autopilot", "set", GROUP, "--mode", "auto", "--set", "bogus=1")
    assert code == 2 and "--set must be NAME=VALUE" in one_line_error(err)

    code, out, err = edgeops(url, "fleet", "retrain", GROUP, "--reason", "the line was re-geared", "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    assert run["state"] == "queued" and run["trigger"] == "manual"
    code, out, err = edgeops(url, "fleet", "retrain", GROUP)
    assert code == 0 and "merged" in out, err
    code, out, err = edgeops(url, "fleet", "runs", "--json")
    (listed,) = json.loads(out)["runs"]
    assert listed["run_id"] == run["run_id"] and len(listed["triggers"]) == 2
    code, out, err = edgeops(url, "fleet", "runs", run["run_id"])
    assert code == 0 and "the line was re-geared" in out and "queued" in out, err

    code, _, err = edgeops(url, "fleet", "approve", run["run_id"])
    assert code == 5 and "not waiting for an approval" in one_line_error(err)
    code, _, err = edgeops(url, "fleet", "approve", "run-nope")
    assert code == 2 and "no autopilot run" in one_line_error(err)
    code, _, err = edgeops(url, "fleet", "retrain", "target=ecu,line=zzz")
    assert code == 2 and "no autopilot is set" in one_line_error(err)

    with urllib.request.urlopen(f"{url}/autopilot", timeout=10) as page:  # the dashboard shows the run
        html = page.read().decode()
    assert run["run_id"] in html and "the line was re-geared" in html and "propose" in html
