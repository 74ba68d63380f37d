"""Offline install, the data directory, the CLI and the Python API, with real bundles and keys."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from conftest import AGENT, Built, run_agent
from edgeops_agent.agent import Agent
from edgeops_agent.errors import (
    ActiveSlotDamagedError,
    RollbackError,
    SelfTestError,
    StateCorruptedError,
    TensorInputError,
    WrongTargetError,
)
from edgeops_agent.install import install_bundle
from edgeops_agent.outbox import Outbox
from edgeops_agent.store import DataDir
from edgeops_core import BundleError, ExpiredBundleError, Manifest, SignatureError, format_time, pack_bundle, read_members
from edgeops_toolchain.signing import generate_keypair, sign_members


def _resign(built: Built, tmp: Path, name: str, change: dict[str, object], *, key: Path | None = None) -> Path:
    """A copy of the session's bundle with manifest fields changed, properly signed again."""
    members = read_members(built.bundle.read_bytes())
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), **change)  # type: ignore[arg-type]
    body = {"manifest.json": manifest.to_json(), "model.onnx": members["model.onnx"]}
    sig = sign_members(body, key or built.private_key, subject=name)
    path = tmp / f"{name}.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sig}))
    return path


@pytest.fixture
def device(tmp_path: Path, built: Built) -> DataDir:
    data = DataDir(tmp_path / "device")
    data.add_trusted_key(built.public_key)
    return data


def test_install_activates_and_every_bad_bundle_leaves_it_serving(tmp_path: Path, built: Built, device: DataDir) -> None:
    result = install_bundle(device, built.bundle, target="ecu")
    assert (result.slot, result.release, result.self_tests) == ("a", 1, 10)
    agent = Agent(device)
    row = np.asarray(agent.model.manifest.self_test.vectors[0].input, dtype=np.float32)  # type: ignore[union-attr]
    before = agent.predict(row)

    members = read_members(built.bundle.read_bytes())
    tampered = tmp_path / "tampered.edgeops"
    onnx = bytearray(members["model.onnx"])
    onnx[len(onnx) // 2] ^= 0x01
    tampered.write_bytes(pack_bundle({**members, "model.onnx": bytes(onnx)}))
    other = generate_keypair(tmp_path / "other-key")
    cases = [
        (tampered, BundleError, "member 'model.onnx' was modified"),
        (_resign(built, tmp_path, "untrusted", {"release": 9}, key=other.private), SignatureError, "which is not a trusted key"),
        (
            _resign(built, tmp_path, "wearable", {"release": 9, "target": "wearable"}),
            WrongTargetError,
            "built for target 'wearable'",
        ),
        (built.bundle, RollbackError, "release 1 of 'vibration-classifier' is not newer than the highest installed release 1"),
        (_resign(built, tmp_path, "old", {"release": 1}), RollbackError, "not newer"),
    ]
    past = datetime.now(UTC) - timedelta(days=1)
    cases.append(
        (
            _resign(
                built,
                tmp_path,
                "expired",
                {"release": 9, "created": format_time(past - timedelta(days=2)), "expires": format_time(past)},
            ),
            ExpiredBundleError,
            "bundle expired at",
        )
    )
    m = Manifest.from_json(members["manifest.json"])
    wrong = dataclasses.replace(
        m.self_test, vectors=(dataclasses.replace(m.self_test.vectors[0], label=(m.self_test.vectors[0].label + 1) % 5),)
    )
    cases.append(
        (_resign(built, tmp_path, "selftest", {"release": 9, "self_test": wrong}), SelfTestError, "self-test vector 0 fails")
    )
    for path, error, message in cases:
        state_before = device.state_path.read_bytes()
        with pytest.raises(error, match=message):
            agent.install(path)
        assert Agent(device).model.manifest.release == 1  # type: ignore[union-attr]  # the active model is unchanged...
        assert agent.predict(row).logits == before.logits  # ...and still serving
        assert device.load_state().active == "a"
        assert json.loads(state_before)["state"]["active"] == "a"

    newer = _resign(built, tmp_path, "newer", {"release": 2})
    result = agent.install(newer)
    assert (result.slot, result.release, result.previous_release) == ("b", 2, 1)
    assert agent.model.manifest.release == 2  # type: ignore[union-attr]
    # Anti-rollback survives a restart: a fresh agent on the same directory refuses release 1.
    with pytest.raises(RollbackError, match="not newer than the highest installed release 2"):
        Agent(device).install(built.bundle)
    assert device.load_state().last_error is not None and "not newer" in device.load_state().last_error  # type: ignore[operator]


def test_predict_rejects_bad_tensors_and_counts_them(built: Built, device: DataDir) -> None:
    install_bundle(device, built.bundle, target="ecu")
    agent = Agent(device)
    good = np.asarray(agent.model.manifest.self_test.vectors[0].input, dtype=np.float32)  # type: ignore[union-attr]
    bad = [
        good[:10],
        np.r_[good[:5], np.nan, good[6:]],
        np.r_[good[:5], -np.inf, good[6:]],
        np.array(["a"] * 106),
        good.reshape(2, 53),
    ]
    for x in bad:
        with pytest.raises(TensorInputError):
            agent.predict(x)
    assert agent.predict(good.astype(np.float64)).class_index == agent.model.manifest.self_test.vectors[0].label  # type: ignore[union-attr]
    t = agent.telemetry(1.0)
    predicted = [0] * len(agent.model.manifest.labels)  # type: ignore[union-attr]
    predicted[agent.model.manifest.self_test.vectors[0].label] = 1  # type: ignore[union-attr]
    assert t["inference"] == {
        "task": "classification",
        "count": 1,
        "window_count": 1,
        "errors": {"TensorInputError": 5},
        "error_count": 5,
        "predicted": predicted,  # only the good input was predicted
        "feedback": {"labelled": 0, "correct": 0, "rejected": 0},
    }
    assert agent.telemetry(1.0)["inference"]["window_count"] == 0  # the window resets, the totals do not


def test_state_file_is_checksummed_and_never_silently_reset(built: Built, device: DataDir) -> None:
    install_bundle(device, built.bundle, target="ecu")
    raw = device.state_path.read_text()
    device.state_path.write_text(raw.replace('"release": 1', '"release": 0'))
    with pytest.raises(StateCorruptedError, match="checksum mismatch"):
        Agent(device)
    proc = run_agent("status", "--data-dir", device.root)
    assert proc.returncode == 5 and "checksum mismatch" in proc.stderr and proc.stderr.count("\n") == 1
    device.state_path.write_text("{not json")
    with pytest.raises(StateCorruptedError, match="not a state file"):
        install_bundle(device, built.bundle)


def test_cli_trust_install_status_predict(tmp_path: Path, built: Built) -> None:
    data = tmp_path / "d"
    assert run_agent("install", built.bundle, "--data-dir", data, "-t", "ecu").returncode == 4  # empty trust store
    assert run_agent("trust", "add", built.public_key, "--data-dir", data).returncode == 0
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    assert run_agent("trust", "add", bad_key, "--data-dir", data).returncode == 2
    first = run_agent("install", built.bundle, "--data-dir", data, "-t", "ecu", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["release"] == 1
    again = run_agent("install", built.bundle, "--data-dir", data)  # the target is remembered now
    assert again.returncode == 3 and "not newer" in again.stderr
    status = json.loads(run_agent("status", "--data-dir", data, "--json").stdout)
    assert (
        status["active"] == "a" and status["highest_release"] == {"vibration-classifier": 1} and len(status["trusted_keys"]) == 1
    )
    m = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    lines = [json.dumps(list(v.input)) for v in m.self_test.vectors[:3]] + ["[1, 2]", "not json"]
    proc = subprocess.run(
        [*AGENT, "predict", "--data-dir", str(data)],
        input="\n".join(lines),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and [o["ok"] for o in out] == [True, True, True, False, False]
    assert [o["index"] for o in out[:3]] == [v.label for v in m.self_test.vectors[:3]]


def test_outbox_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", cap=5)
    seqs = [box.put("t", {"n": i}) for i in range(8)]
    assert seqs == list(range(1, 9))
    pending = box.pending()
    assert [p.seq for p in pending] == [4, 5, 6, 7, 8] and json.loads(pending[0].payload) == {"n": 3, "seq": 4}
    assert box.stats().dropped == 3
    box.ack(4)
    assert box.quarantine(5, 0x87, "Not authorized") is not None and box.quarantine(5, 0x87, "again") is None
    assert box.stats() == type(box.stats())(pending=3, dropped=3, quarantined=1, last_seq=8)
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite", cap=5)  # survives a restart
    assert [p.seq for p in reopened.pending()] == [6, 7, 8] and reopened.put("t", {}) == 9
    assert reopened.first_time("cmd-1") and not reopened.first_time("cmd-1")


def test_serving_agent_does_not_load_the_signature_stack(built: Built, device: DataDir) -> None:
    """Start-up checks the installed slot by its recorded digest: cryptography stays out of memory."""
    install_bundle(device, built.bundle, target="ecu")
    code = (
        "import sys, numpy as np; from pathlib import Path; from edgeops_agent.agent import Agent; "
        "from edgeops_agent.store import DataDir; a = Agent(DataDir(Path(sys.argv[1]))); "
        "a.predict(np.asarray(a.model.manifest.self_test.vectors[0].input, dtype=np.float32)); "
        "print(sorted(m for m in ('cryptography', '_hashlib', 'torch', 'onnx', 'paho') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(device.root)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    slot = device.slot_path("a")
    data = bytearray(slot.read_bytes())
    data[-10] ^= 0x01  # a slot changed on disk after the install is not served after a restart
    slot.write_bytes(bytes(data))
    damaged = Agent(device)  # ...but the agent starts, so that an install can repair it
    assert damaged.model is None and re.search(r"differs from the .* recorded at install", damaged.fault or "")
    with pytest.raises(ActiveSlotDamagedError, match="install a bundle to repair"):
        damaged.predict(np.zeros(106, dtype=np.float32))


def test_example_agent_config_is_valid(tmp_path: Path) -> None:
    from conftest import REPO
    from edgeops_agent.config import load_config

    config = tmp_path / "agent.toml"  # beside a data directory, as on a provisioned device
    config.write_bytes((REPO / "examples" / "agent" / "agent.toml").read_bytes())
    (tmp_path / "data").mkdir()
    cfg = load_config(config)
    assert cfg.device_id == "ecu-demo-1" and cfg.target == "ecu" and cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.mqtt.reconnect_max_s == 30.0 and cfg.drift.window == 500 and cfg.outbox_max_messages == 10_000
