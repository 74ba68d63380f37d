"""Key rotation and revocation through the agent: its trust store, its installs, its daemon's trust_update.

The host side is the real ``edgeops_toolchain.keyring`` (what ``edgeops keys`` runs); bundles are
the session's build re-signed with other keys (model_signing), never rebuilt.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import Broker
from conftest import AGENT, Built, make_small_project, run_agent, run_edgeops
from edgeops_agent.agent import Agent
from edgeops_agent.config import AgentConfig
from edgeops_agent.daemon import Daemon
from edgeops_agent.errors import ActiveSlotDamagedError
from edgeops_agent.install import install_bundle, rollback_trial
from edgeops_agent.store import DataDir
from edgeops_agent.trust import TrustStore
from edgeops_core import (
    InputError,
    Manifest,
    SignatureError,
    TrustError,
    find_profile,
    pack_bundle,
    read_members,
    verify_bundle_file,
)
from edgeops_core.messages import trust_update_command
from edgeops_core.trust import canonical_bytes, load_metadata, parse_release_keys, parse_root
from edgeops_toolchain.errors import SigningError
from edgeops_toolchain.keyring import (
    check_signing_key,
    init_root,
    load_host_trust,
    load_root_key,
    revoke_release_key,
    rotate_release_key,
    rotate_root,
)
from edgeops_toolchain.signing import generate_keypair, load_signing_key, sign_members

HOME_SIGNING = "keys/dev-signing.pem"


@dataclass(frozen=True)
class Host:
    home: Path
    out: Path
    root_keys: tuple[Path, ...]

    @property
    def signing_key(self) -> Path:
        return self.home / HOME_SIGNING

    def documents(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        host = load_host_trust()
        assert host is not None
        return host.update_documents()


def resign(built: Built, tmp: Path, name: str, change: dict[str, Any], key: Path) -> Path:
    """The session's bundle with manifest fields changed, signed by ``key``."""
    members = read_members(built.bundle.read_bytes())
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), **change)
    body = {"manifest.json": manifest.to_json(), "model.onnx": members["model.onnx"]}
    path = tmp / f"{name}.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, key, subject=name)}))
    return path


def signed_by(body: dict[str, Any], *key_paths: Path) -> dict[str, Any]:
    """A metadata document signed by exactly these keys (to forge under-signed documents)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    sigs = []
    for path in key_paths:
        k = load_root_key(path)
        sigs.append(
            {"keyid": k.keyid, "sig": base64.b64encode(k.private.sign(canonical_bytes(body), ec.ECDSA(hashes.SHA256()))).decode()}
        )
    return {"signed": body, "signatures": sigs}


def trust_files(data: DataDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.trust_dir.iterdir())}


@pytest.fixture
def host(tmp_path: Path, built: Built) -> Host:
    """A host with a root of trust: 2 root keys, threshold 2; list v1 holds the session's signing key."""
    out = tmp_path / "root-keys"
    made = init_root(out, keys=2, threshold=2, signing_key=built.private_key)
    assert {p.stat().st_mode & 0o777 for p in made.root_keys} == {0o600}
    return Host(home=Path(os.environ["EDGEOPS_HOME"]), out=out, root_keys=made.root_keys)


@pytest.fixture
def device(tmp_path: Path, built: Built, host: Host) -> DataDir:
    """A device provisioned with the host's root and list v1, running the session's bundle."""
    data = DataDir(tmp_path / "device")
    root = load_metadata((host.out / "root.json").read_bytes())
    listed = load_metadata((host.out / "release-keys.json").read_bytes())
    TrustStore(data).provision(root, listed)
    install_bundle(data, built.bundle, target="ecu")
    return data


class InProcessDaemon:
    """The real daemon, not connected: commands go through its handler, events land in its outbox."""

    def __init__(self, data: DataDir) -> None:
        self.daemon = Daemon(AgentConfig(device_id="d1", target="ecu", data_dir=data.root), endpoint=False)
        self.seen = 0

    def send(self, roots: list[dict[str, Any]], listed: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """One trust_update; the events it caused, by type."""
        self.events()  # what came before
        self.daemon._handle(trust_update_command(roots, listed))
        return self.events()

    def events(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in self.daemon.outbox.pending(after=self.seen, limit=1000):
            self.seen = p.seq
            if p.topic.endswith("/events"):
                event = json.loads(p.payload)
                out[event["type"]] = event["detail"]
        return out

    def close(self) -> None:
        self.daemon.shutdown()


def test_rotation_revocation_and_every_refusal_through_the_daemon(
    tmp_path: Path, built: Built, host: Host, device: DataDir
) -> None:
    agent = InProcessDaemon(device)
    try:
        # 1. Rotate: a new signing key, listed in v2. Before the update the device refuses its bundles.
        rotated = rotate_release_key(host.root_keys)
        k1, k2 = load_signing_key(built.private_key).fingerprint, rotated.new_keyid
        r2 = resign(built, tmp_path, "r2", {"release": 2}, host.signing_key)
        before = trust_files(device)
        with pytest.raises(SignatureError, match="which is not a trusted key"):
            agent.daemon.agent.install(r2)
        assert trust_files(device) == before
        roots, v2 = host.documents()
        events = agent.send(roots, v2)
        assert events["trust_updated"] == {
            "id": events["command_done"]["id"], "source": "command", "root_version": 1, "keys_version": 2, "revoked": [],
            "revoked_total": 0, "changed": True, "active_revoked": None,
        }  # fmt: skip
        assert agent.send(roots, v2)["trust_updated"]["changed"] is False  # redelivered: a success, nothing changes
        assert agent.daemon.agent.install(r2).release == 2  # signed by the new key: installs

        # 2. Revoke the old key: a newer release signed by it is refused.
        revoke_release_key(k1[:12], host.root_keys)
        _, v3 = host.documents()
        events = agent.send(roots, v3)
        assert events["trust_updated"]["revoked"] == [k1] and events["trust_updated"]["keys_version"] == 3
        r3_old_key = resign(built, tmp_path, "r3-old-key", {"release": 3}, built.private_key)
        with pytest.raises(SignatureError, match=f"signed by key sha256:{k1[:16]}…, which is not a trusted key"):
            agent.daemon.agent.install(r3_old_key)
        assert device.load_state().highest_release == {"vibration-classifier": 2}

        # 3. Refusals: each is one line, a trust_update_refused and a command_failed, and changes no byte.
        current = parse_root(load_metadata((host.home / "trust" / "root.json").read_bytes()))
        new_root_key = generate_keypair(tmp_path / "rogue").private
        rogue = load_root_key(new_root_key)
        v4_body = {**v3["signed"], "version": 4}
        rogue_root = {**current.signed(), "version": 2, "keys": {rogue.keyid: rogue.pem}, "threshold": 1}
        cases = [
            ([], v2, r"^release-key list version 2 is not newer than the trusted version 3 \(replay\)$"),
            ([], signed_by(v4_body, host.root_keys[0]), r"^release-key list has 1 valid root signature, threshold is 2$"),
            ([signed_by(rogue_root, new_root_key)], None, r"^root version 2 is not signed by the previous root \(TUF 5\.3\.4\)"),
            ([signed_by(rogue_root, new_root_key, host.root_keys[0])], None, "1 valid signature.* threshold is 2"),
        ]
        for send_roots, listed, message in cases:
            before = trust_files(device)
            events = agent.send(send_roots, listed)
            assert set(events) == {"trust_update_refused", "command_failed"}, events
            assert re.search(message, events["trust_update_refused"]["reason"]), events
            assert "\n" not in events["trust_update_refused"]["reason"]
            assert trust_files(device) == before
        assert TrustStore(device).load().release_keys.version == 3  # type: ignore[union-attr]

        # 4. A root rotation signed by the old root (and its list signed by the new one) is taken.
        rotation = rotate_root(host.root_keys, generate=1, out=tmp_path / "new-root", threshold=1)
        roots, v4 = host.documents()
        events = agent.send(roots, v4)
        assert (events["trust_updated"]["root_version"], events["trust_updated"]["keys_version"]) == (2, 4)
        with pytest.raises(TrustError, match=r"root version 2 is not newer|differs"):
            TrustStore(device).update((parse_root(signed_by(rogue_root, new_root_key)),), None)
        r4 = resign(built, tmp_path, "r4", {"release": 4}, host.signing_key)
        assert agent.daemon.agent.install(r4).release == 4
        assert rotation.root.version == 2 and k2 in TrustStore(device).summary().release_keys
    finally:
        agent.close()


def test_a_bundle_carrying_a_newer_list_installs_in_one_step(tmp_path: Path, built: Built, host: Host, device: DataDir) -> None:
    rotate_release_key(host.root_keys)
    _, v2 = host.documents()
    v1 = load_metadata((host.out / "release-keys.json").read_bytes())
    agent = Agent(device)
    events: list[tuple[str, dict[str, Any]]] = []
    agent._on_event = lambda kind, detail: events.append((kind, detail))
    # Signed by the new key, carrying list v2 that adds it: applied first, then the bundle verifies.
    r2 = resign(built, tmp_path, "r2", {"release": 2, "release_keys": v2}, host.signing_key)
    result = agent.install(r2)
    assert result.release == 2 and result.trust is not None and result.trust.state.release_keys.version == 2  # type: ignore[union-attr]
    assert ("trust_updated", {"source": "bundle", "root_version": 1, "keys_version": 2, "revoked": [], "revoked_total": 0,
                              "changed": True}) in events  # fmt: skip
    # An older list in a bundle is normal and ignored; so is a forged newer one. Neither changes a byte.
    before = trust_files(device)
    forged = signed_by({**v2["signed"], "version": 9, "keys": {}}, host.root_keys[0])  # below the threshold
    for name, listed, release in (("old-list", v1, 3), ("forged-list", forged, 4)):
        bundle = resign(built, tmp_path, name, {"release": release, "release_keys": listed}, host.signing_key)
        assert agent.install(bundle).trust is None
        assert trust_files(device) == before
    # A bundle signed by a key its own (forged) list would add is refused: the list was not applied.
    rogue = generate_keypair(tmp_path / "rogue")
    pem = rogue.public.read_text()
    sneaky = signed_by({**v2["signed"], "version": 9, "keys": {load_signing_key(rogue.private).fingerprint: pem}}, rogue.private)
    with pytest.raises(SignatureError, match="not a trusted key"):
        agent.install(resign(built, tmp_path, "sneaky", {"release": 9, "release_keys": sneaky}, rogue.private))
    assert trust_files(device) == before


def test_the_active_bundle_whose_key_is_revoked_stops_serving(tmp_path: Path, built: Built, host: Host, device: DataDir) -> None:
    """ADR 0018: as a slot that fails its start-up check -- no model, the reason in last_error, an install repairs."""
    agent = Agent(device)
    row = np.asarray(agent.model.manifest.self_test.vectors[0].input, dtype=np.float32)  # type: ignore[union-attr]
    agent.predict(row)
    k1 = load_signing_key(built.private_key).fingerprint
    rotate_release_key(host.root_keys)
    r2 = resign(built, tmp_path, "r2", {"release": 2}, host.signing_key)
    # r2 (new key) on trial in slot b, the old slot a its rollback target.
    TrustStore(device).update((), parse_release_keys(host.documents()[1]))
    install_bundle(device, r2, trial=True)
    revoke_release_key(k1, host.root_keys)
    TrustStore(device).update((), parse_release_keys(host.documents()[1]))
    assert agent.enforce_revocations() is not None  # the running agent still served slot a (k1): it stops
    with pytest.raises(ActiveSlotDamagedError, match="is revoked"):
        agent.predict(row)
    assert "revoked" in (device.load_state().last_error or "")
    rollback_trial(device)  # back to slot a, signed by the revoked key: not served at start-up either
    restarted = Agent(device)
    assert restarted.model is None and "which is revoked" in (restarted.fault or "")
    assert restarted.state_message(online=True)["health"] == "no_model"
    r3 = resign(built, tmp_path, "r3", {"release": 3}, host.signing_key)
    restarted.install(r3)  # the repair: a release signed by a current key
    assert restarted.predict(row).label and Agent(device).model is not None
    # The start-up check of revocations reads JSON only: a serving agent still loads no cryptography.
    code = (
        "import sys; from pathlib import Path; from edgeops_agent.agent import Agent; from edgeops_agent.store import DataDir; "
        "a = Agent(DataDir(Path(sys.argv[1]))); print(a.model is not None, 'cryptography' in sys.modules)"
    )
    out = subprocess.run([*AGENT[:1], "-c", code, str(device.root)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_development_setup_and_the_trust_cli(tmp_path: Path, built: Built, host: Host) -> None:
    dev = tmp_path / "dev"
    done = run_agent("trust", "add", built.public_key, "-d", dev)
    assert done.returncode == 0, done.stderr
    assert run_agent("install", built.bundle, "-d", dev, "-t", "ecu").returncode == 0  # single-key setup, unchanged
    shown = json.loads(run_agent("trust", "show", "-d", dev, "--json").stdout)
    assert shown["root_version"] is None and shown["development_keys"] == [load_signing_key(built.private_key).fingerprint]
    prod = tmp_path / "prod"
    done = run_agent("trust", "root", host.out / "root.json", "--release-keys", host.out / "release-keys.json", "-d", prod)
    assert done.returncode == 0 and "root version 1, release-key list version 1" in done.stdout, done.stderr
    done = run_agent("trust", "add", built.public_key, "-d", prod)
    assert done.returncode == 4 and done.stderr.startswith("error: this device trusts a root") and done.stderr.count("\n") == 1
    other = init_root_elsewhere(tmp_path)
    done = run_agent("trust", "root", other, "-d", prod)
    assert done.returncode == 4 and "already trusts root version 1" in done.stderr
    done = run_agent("trust", "root", host.out / "root.json", "-d", prod)  # the same root again: a no-op
    assert done.returncode == 0 and "unchanged" in done.stdout


def init_root_elsewhere(tmp_path: Path) -> Path:
    """Another host's root.json (its own EDGEOPS_HOME)."""
    code = "import sys; from pathlib import Path; from edgeops_toolchain.keyring import init_root; init_root(Path(sys.argv[1]))"
    env = {**os.environ, "EDGEOPS_HOME": str(tmp_path / "other-home")}
    subprocess.run([*AGENT[:1], "-c", code, str(tmp_path / "other")], check=True, env=env)
    return tmp_path / "other" / "root.json"


@pytest.mark.parametrize("crash_at", ["trust_pending", "trust_revoked", "trust_root"])
def test_a_kill_9_between_trust_files_leaves_the_new_state_whole(
    tmp_path: Path, host: Host, device: DataDir, crash_at: str
) -> None:
    rotate_root(host.root_keys, generate=1, out=tmp_path / "new-root", threshold=1)
    roots, listed = host.documents()
    args: list[str] = []
    for i, doc in enumerate(roots):
        path = tmp_path / f"root-{i}.json"
        path.write_text(json.dumps(doc))
        args += ["--root", str(path)]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    cmd = [*AGENT, "trust", "update", *args, "--release-keys", str(tmp_path / "list.json"), "-d", str(device.root)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EDGEOPS_AGENT_CRASH_AT": crash_at})
    assert done.returncode == -9, done.stderr
    # The commit point passed: readers see the new state whole (pending.json), never a mix.
    state = TrustStore(device).load()
    assert state is not None and (state.root.version, state.release_keys.version) == (2, 2)  # type: ignore[union-attr]
    # The next writer finishes the update: the same documents again change nothing, and no pending is left.
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr
    assert sorted(trust_files(device)) == ["release-keys.json", "revoked.json", "root.json"]
    assert install_keys(device) == TrustStore(device).summary().release_keys


def install_keys(data: DataDir) -> tuple[str, ...]:
    return tuple(k.fingerprint for k in TrustStore(data).bundle_keys())


def test_concurrent_trust_updates_apply_one_at_a_time(tmp_path: Path, host: Host, device: DataDir) -> None:
    lists = []
    for _ in range(6):
        rotate_release_key(host.root_keys, new_key=generate_keypair(tmp_path / f"k{len(lists)}").public)
        lists.append(parse_release_keys(host.documents()[1]))
    outcomes: list[str] = []

    def apply(doc: Any) -> None:
        try:
            TrustStore(device).update((), doc)
            outcomes.append("ok")
        except TrustError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=apply, args=(doc,)) for doc in reversed(lists)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "ok" in outcomes and all(o == "ok" or "(replay)" in o for o in outcomes), outcomes
    assert TrustStore(device).load().release_keys.version == 7  # type: ignore[union-attr]  # the newest won, whole
    assert sorted(trust_files(device)) == ["release-keys.json", "revoked.json", "root.json"]


def test_the_build_refuses_a_key_devices_would_refuse_and_embeds_the_list(tmp_path: Path, built: Built, host: Host) -> None:
    signer = load_signing_key(built.private_key)
    listed = check_signing_key(signer, source="k")
    assert listed is not None and listed["signed"]["version"] == 1
    stranger = load_signing_key(generate_keypair(tmp_path / "stranger").private)
    with pytest.raises(
        SigningError, match=f"signing key sha256:{stranger.fingerprint[:16]}… \\(s\\) is not in release-key list version 1"
    ):
        check_signing_key(stranger, source="s")
    rotate_release_key(host.root_keys)
    revoke_release_key(signer.fingerprint, host.root_keys)
    with pytest.raises(
        SigningError, match=f"signing key sha256:{signer.fingerprint[:16]}… \\(k\\) is revoked by release-key list version 3"
    ):
        check_signing_key(signer, source="k")
    with pytest.raises(InputError, match="is the current signing key"):
        revoke_release_key(load_signing_key(host.signing_key).fingerprint, host.root_keys)
    with pytest.raises(InputError, match="needs 2 of its keys to sign"):
        rotate_release_key(host.root_keys[:1])


def test_a_changed_list_makes_a_new_release_and_an_unchanged_one_does_not(tmp_path: Path, built: Built) -> None:
    """The package step keys on the embedded list: a new list re-runs package (a new release), the same one hits."""
    from edgeops_toolchain.pipeline import BuildState, _Silent, step_keys
    from edgeops_toolchain.project import load_project
    from edgeops_toolchain.resources import builtin_targets_dir

    project = load_project(make_small_project(tmp_path / "p"))
    profile = find_profile("ecu", [builtin_targets_dir()])

    def keys(listed: dict[str, Any] | None) -> dict[str, str]:
        state = BuildState(project=project, profile=profile, out_dir=tmp_path, key=built.private_key,
                           trusted=load_signing_key(built.private_key), progress=_Silent(), release_keys=listed)  # fmt: skip
        return step_keys(state)

    v1 = {"signed": {"version": 1}, "signatures": []}
    none, first, same, renewed = keys(None), keys(v1), keys(json.loads(json.dumps(v1))), keys({**v1, "signed": {"version": 2}})
    assert first == same
    changed = [s for s in first if first[s] != renewed[s]]
    assert changed == ["package", "sign", "report"] and [s for s in none if none[s] != first[s]] == changed


def test_key_rotation_end_to_end_over_mqtt(tmp_path: Path, built: Built, host: Host, device: DataDir, broker: Broker) -> None:
    """The must-show: a real broker, the agent process, `edgeops fleet trust-push` and over-the-air deploys."""
    from edgeops_fleet import Deployer, fleet_status, parse_broker_url
    from edgeops_fleet.trust_push import push_trust_update

    config = tmp_path / "d1.toml"
    config.write_text(
        f'device_id = "d1"\ntarget = "ecu"\ndata_dir = "{device.root}"\n'
        f"[mqtt]\nport = {broker.port}\nkeepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n"
        "[telemetry]\ninterval_s = 5\n[ota]\nhealth_inferences = 0\nretry_initial_s = 0.5\n"
    )
    url = f"mqtt://127.0.0.1:{broker.port}"
    proc = subprocess.Popen([*AGENT, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30  # commands reach a device whose session exists: wait until it is online
        while not any(r.device_id == "d1" and r.online for r in fleet_status(parse_broker_url(url), max_wait_s=1)):
            assert time.monotonic() < deadline and proc.poll() is None, "the agent did not come online"
        k1 = load_signing_key(built.private_key)
        rotated = rotate_release_key(host.root_keys)
        _, v2 = host.documents()
        pushed = run_edgeops("fleet", "trust-push", "--broker", url, "--device", "d1", "--json")
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout)["devices"] == [
            {"device_id": "d1", "outcome": "updated", "root_version": 1, "keys_version": 2, "changed": True, "message": None}
        ]

        def deploy(bundle: Path, key: Path, deploy_id: str) -> Any:
            verified = verify_bundle_file(bundle, [load_signing_key(key)])
            return Deployer(verified, ["d1"], parse_broker_url(url), deploy_id=deploy_id).run(60)[0]

        r2 = resign(built, tmp_path, "r2", {"release": 2}, host.signing_key)
        report = deploy(r2, host.signing_key, "dep-r2")
        assert (report.outcome, report.active_release) == ("committed", 2), report  # signed by the new key: installs

        revoke_release_key(k1.fingerprint, host.root_keys)
        pushed = run_edgeops("fleet", "trust-push", "--broker", url, "--device", "d1", "--json")
        assert pushed.returncode == 0 and json.loads(pushed.stdout)["devices"][0]["keys_version"] == 3, pushed.stdout
        r3 = resign(built, tmp_path, "r3", {"release": 3}, built.private_key)  # newer, but signed by the revoked key
        report = deploy(r3, built.private_key, "dep-r3")
        assert (report.outcome, report.reason) == ("failed", "install_rejected"), report
        assert f"sha256:{k1.fingerprint[:16]}…, which is not a trusted key" in (report.message or "")

        before = trust_files(device)
        replay = push_trust_update(parse_broker_url(url), ["d1"], trust_update_command([], v2), timeout_s=20)[0]
        assert replay.outcome == "refused" and replay.message == (
            "release-key list version 2 is not newer than the trusted version 3 (replay)"
        ), replay
        assert trust_files(device) == before
        assert rotated.new_keyid in TrustStore(device).summary().release_keys
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("root.json", lambda b: b + b"x"),
        ("release-keys.json", lambda b: b[: len(b) // 2]),
        ("revoked.json", lambda b: b'{"revoked": "all"}'),
    ],
)
def test_a_damaged_trust_store_fails_closed(tmp_path: Path, built: Built, device: DataDir, name: str, damage: Any) -> None:
    """Bytes appended or cut: never read as "no root" (that would fall back to development keys)."""
    path = device.trust_dir / name
    if not path.exists():
        path.write_bytes(b'{"revoked":[]}\n')
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TrustError, match="damaged"):
        install_bundle(device, resign(built, tmp_path, "r2", {"release": 2}, built.private_key))
    agent = Agent(device)  # start-up: the active slot cannot be checked against revocations, so it is not served
    assert agent.model is None and "damaged" in (agent.fault or "")
    status = run_agent("status", "-d", device.root, "--json")
    assert status.returncode == 0 and "damaged" in json.loads(status.stdout)["trust_error"]


def test_the_keys_cli(tmp_path: Path, built: Built) -> None:
    out = tmp_path / "offline"
    done = run_edgeops(
        "keys", "root", "init", "--out", out, "--keys", "2", "--threshold", "2", "--signing-key", built.private_key
    )
    assert done.returncode == 0, done.stderr
    assert "edgeops-agent trust root" in done.stdout
    done = run_edgeops("keys", "rotate", "--root-key", out / "root-1.pem")
    assert done.returncode == 2 and done.stderr == (
        "error: root version 1 needs 2 of its keys to sign (its threshold), got 1: pass --root-key for each\n"
    )
    stranger = generate_keypair(tmp_path / "stranger").private
    done = run_edgeops("keys", "renew", "--root-key", out / "root-1.pem", "--root-key", stranger)
    assert done.returncode == 2 and "is not a key of root version 1" in done.stderr
    done = run_edgeops("keys", "rotate", "--root-key", out / "root-1.pem", "--root-key", out / "root-2.pem")
    assert done.returncode == 0 and "release-key list version 2" in done.stdout, done.stderr
    shown = json.loads(run_edgeops("keys", "show", "--json").stdout)
    k1 = load_signing_key(built.private_key).fingerprint
    assert shown["root"]["threshold"] == 2 and shown["release_keys"]["version"] == 2
    assert k1 in shown["release_keys"]["keys"] and shown["signing_key"] in shown["release_keys"]["keys"]
    again = run_edgeops("keys", "root", "init", "--out", tmp_path / "again")
    assert again.returncode == 2 and "has a root of trust already" in again.stderr


def test_builds_embed_the_list_and_a_new_list_makes_a_new_release(tmp_path: Path, built: Built, small_project: Path) -> None:
    """Real builds on the session's step cache: nothing is trained again, package onwards runs."""
    out = tmp_path / "offline"
    assert run_edgeops("keys", "root", "init", "--out", out, "--signing-key", built.private_key).returncode == 0
    cache = built.home / "cache"

    def build(key: Path) -> Any:
        return run_edgeops("build", "--target", "ecu", "--project", small_project, "--out", tmp_path / "dist",
                           "--key", key, "--cache-dir", cache, "--json")  # fmt: skip

    def embedded(result: dict[str, Any]) -> Any:
        members = read_members(Path(result["bundle"]).read_bytes())
        return Manifest.from_json(members["manifest.json"]).release_keys

    first = json.loads(build(built.private_key).stdout)
    again = json.loads(build(built.private_key).stdout)
    assert embedded(first)["signed"]["version"] == 1  # type: ignore[index]
    assert (again["release"], again["reused_bundle"]) == (first["release"], True)  # the same list: the same release
    assert "train" in first["cached_steps"] and "package" not in first["cached_steps"]
    assert run_edgeops("keys", "renew", "--root-key", out / "root-1.pem").returncode == 0
    renewed = json.loads(build(built.private_key).stdout)
    assert renewed["release"] == first["release"] + 1 and embedded(renewed)["signed"]["version"] == 2  # type: ignore[index]
    stranger = generate_keypair(tmp_path / "stranger").private
    refused = build(stranger)
    fp = load_signing_key(stranger).fingerprint
    assert (
        refused.returncode == 5
        and f"signing key sha256:{fp[:16]}… ({stranger}) is not in release-key list version 2" in refused.stderr
    )


def test_a_revocation_that_lands_during_an_install_wins(
    tmp_path: Path, built: Built, host: Host, device: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The install checks its signer against the trust store again at its commit, and the agent after activating."""
    import edgeops_agent.install as install_module

    k1 = load_signing_key(built.private_key).fingerprint
    rotate_release_key(host.root_keys)  # v2: k1 + k2 (the new signing key)
    k2_private = tmp_path / "k2.pem"
    k2_private.write_bytes(host.signing_key.read_bytes())
    TrustStore(device).update((), parse_release_keys(host.documents()[1]))
    agent = Agent(device)
    agent.install(resign(built, tmp_path, "r2", {"release": 2}, k2_private))  # serving release 2, signed by k2
    revoke_release_key(k1, host.root_keys)
    v3 = parse_release_keys(host.documents()[1])

    # 1. The trust_update (another thread, as the daemon's worker) lands after the install read the keys.
    real_keys, fired = TrustStore.bundle_keys, []

    def racing_keys(self: TrustStore, **kw: Any) -> Any:
        keys = real_keys(self, **kw)
        if not fired:
            fired.append(True)
            t = threading.Thread(target=TrustStore(device).update, args=((), v3))
            t.start()
            t.join()
        return keys

    monkeypatch.setattr(TrustStore, "bundle_keys", racing_keys)
    with pytest.raises(SignatureError, match=f"key sha256:{k1[:16]}…, which is no longer a trusted key"):
        agent.install(resign(built, tmp_path, "r3", {"release": 3}, built.private_key))
    monkeypatch.setattr(TrustStore, "bundle_keys", real_keys)
    assert fired and k1 in TrustStore(device).revoked()
    assert device.load_state().highest_release == {"vibration-classifier": 2}  # the floor did not move
    assert agent.model is not None and agent.model.manifest.release == 2
    assert sorted(p.name for p in (device.root / "slots").glob("*/bundle.edgeops")) == ["bundle.edgeops"]

    # 2. It lands after the commit, before the agent activates the model: the agent stops serving it.
    rotate_release_key(host.root_keys)  # v4: k2 + k3, so k2 can be revoked
    revoke_release_key(load_signing_key(k2_private).fingerprint, host.root_keys)  # v5
    v5 = parse_release_keys(host.documents()[1])
    real_install = install_module.install_bundle

    def install_then_revoke(*args: Any, **kw: Any) -> Any:
        result = real_install(*args, **kw)
        t = threading.Thread(target=TrustStore(device).update, args=((), v5))
        t.start()
        t.join()
        return result

    monkeypatch.setattr(install_module, "install_bundle", install_then_revoke)
    assert agent.install(resign(built, tmp_path, "r4", {"release": 4}, k2_private)).release == 4
    assert agent.model is None and "is revoked" in (agent.fault or "")
    assert "is revoked" in (device.load_state().last_error or "")


def test_a_rollback_to_a_slot_signed_by_a_revoked_key_serves_nothing(
    tmp_path: Path, built: Built, host: Host, device: DataDir
) -> None:
    """Not the rolled-back trial's model: the state says the old slot is active, so that is what would answer."""
    k1 = load_signing_key(built.private_key).fingerprint
    rotate_release_key(host.root_keys)
    TrustStore(device).update((), parse_release_keys(host.documents()[1]))
    agent = InProcessDaemon(device)
    try:
        served = agent.daemon.agent
        trial = install_bundle(device, resign(built, tmp_path, "r2", {"release": 2}, host.signing_key), trial=True)
        served._activate(trial.model)  # what the updater does with a trial
        served.state = device.load_state()
        revoke_release_key(k1, host.root_keys)
        events = agent.send(*host.documents())
        assert events["trust_updated"]["active_revoked"] is None  # the trial's key (k2) serves on
        rollback_trial(device, "health check failed")  # the trial fails: back to slot a, signed by k1
        agent.daemon.updater._serve_active()
        assert served.model is None and "cannot be served after the rollback" in (served.fault or "")
        assert "which is revoked" in (device.load_state().last_error or "")
        assert served.state_message(online=True)["health"] == "no_model"
        with pytest.raises(ActiveSlotDamagedError, match="which is revoked"):
            served.predict(np.zeros(trial.model.n_features, dtype=np.float32))
    finally:
        agent.close()


def test_a_disk_error_after_the_journal_commits_is_an_applied_update(
    tmp_path: Path, built: Built, host: Host, device: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers take the new state from pending.json: the answer says applied, and the revocation is enforced."""
    import edgeops_agent.trust as trust_module

    k1 = load_signing_key(built.private_key).fingerprint
    real_write = trust_module.write_durably
    full: set[str] = set()

    def write(path: Path, data: bytes) -> None:
        if path.name in full:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(trust_module, "write_durably", write)
    agent = InProcessDaemon(device)
    try:
        rotate_release_key(host.root_keys)
        revoke_release_key(k1, host.root_keys)  # v3 revokes the key of the serving model
        roots, v3 = host.documents()
        full.add("revoked.json")
        events = agent.send(roots, v3)
        assert "trust_update_refused" not in events and "command_done" in events, events
        updated = events["trust_updated"]
        assert (updated["keys_version"], updated["revoked"], updated["changed"]) == (3, [k1], True)
        assert "No space left on device" in updated["warning"] and "pending.json" in updated["warning"]
        assert updated["active_revoked"] and agent.daemon.agent.model is None
        assert "pending.json" in trust_files(device)
        full.clear()
        again = agent.send(roots, v3)["trust_updated"]  # the next writer finishes the journal
        assert again["changed"] is False and "warning" not in again
        assert sorted(trust_files(device)) == ["release-keys.json", "revoked.json", "root.json"]
        # Before the commit point it is a refusal, and no file changes.
        renew = signed_by({**v3["signed"], "version": 4}, *host.root_keys)
        full.add("pending.json")
        before = trust_files(device)
        events = agent.send(roots, renew)
        assert set(events) == {"trust_update_refused", "command_failed"}, events
        assert trust_files(device) == before
    finally:
        agent.close()


def test_a_device_many_root_versions_behind_catches_up_in_one_push(
    tmp_path: Path, host: Host, device: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain cannot be applied in parts (each rotation re-signs the list with the new root only): one command."""
    import edgeops_core.messages as messages
    from edgeops_core.trust import trust_update_args

    keys = host.root_keys
    for i in range(10):  # root versions 2..11: more than the old 8-root window
        keys = rotate_root(keys, generate=1, out=tmp_path / f"root-{i}", threshold=1).new_keys
    trusted = load_host_trust()
    assert trusted is not None
    roots, listed = trusted.update_documents()
    assert [r["signed"]["version"] for r in roots] == list(range(1, 12)) and trusted.oldest_reachable_root() == 1
    update = TrustStore(device).update(*trust_update_args(parse_command_args(trust_update_command(roots, listed))))
    assert (update.state.root.version, update.state.release_keys.version) == (11, 11)  # type: ignore[union-attr]
    # What does not fit in one command is left out, oldest first, and the host says which devices it strands.
    monkeypatch.setattr(messages, "MAX_COMMAND_BYTES", len(trust_update_command(roots[-4:], listed)) + 100)
    cut, _ = trusted.update_documents()
    assert [r["signed"]["version"] for r in cut] == [8, 9, 10, 11] and trusted.oldest_reachable_root() == 7


def parse_command_args(payload: bytes) -> Any:
    from edgeops_core import parse_command

    return parse_command(payload).args


def test_provisioning_a_root_refuses_a_model_signed_by_a_key_the_list_does_not_name(
    tmp_path: Path, built: Built, host: Host
) -> None:
    """A development-key model would otherwise serve on, and stay a rollback target, vouched for by no root."""
    data = DataDir(tmp_path / "dev-device")
    dev = generate_keypair(tmp_path / "dev-key")
    TrustStore(data).add_development_key(dev.public)
    install_bundle(data, resign(built, tmp_path, "dev-r1", {}, dev.private), target="ecu")
    root = load_metadata((host.out / "root.json").read_bytes())
    v1 = load_metadata((host.out / "release-keys.json").read_bytes())
    fp = load_signing_key(dev.private).fingerprint
    for listed, which in ((v1, "release-key list version 1 does not name"), (None, "no release-key list names")):
        with pytest.raises(TrustError, match=f"slot a .* signed by key sha256:{fp[:16]}…, which {which}"):
            TrustStore(data).provision(root, listed)
        assert not TrustStore(data).has_root()
    rotate_release_key(host.root_keys, new_key=dev.public)  # the remedy: a list that names the key
    assert TrustStore(data).provision(root, host.documents()[1]).state.release_keys.version == 2  # type: ignore[union-attr]
    assert Agent(data).model is not None


def test_an_interrupted_root_rotation_leaves_the_host_usable(
    tmp_path: Path, built: Built, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full between the host's release-keys.json and root.json: builds and the next rotation still work."""
    import edgeops_toolchain.keyring as keyring

    real_write = keyring.write_atomically

    def write(path: Path, data: bytes) -> None:
        if (path.parent.name, path.name) == ("trust", "root.json"):  # the host's current root, not out/root.json
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(keyring, "write_atomically", write)
    with pytest.raises(InputError, match="No space left on device"):
        rotate_root(host.root_keys, generate=1, out=tmp_path / "new-root")
    monkeypatch.setattr(keyring, "write_atomically", real_write)
    trusted = load_host_trust()  # root.json v1, release-keys.json v2 (signed by the old and the new root)
    assert trusted is not None and (trusted.root.version, trusted.release_keys.version) == (1, 2)  # type: ignore[union-attr]
    assert [r.version for r in trusted.root_history()] == [1]  # the unpublished v2 copy is not sent
    assert check_signing_key(load_signing_key(built.private_key), source="k") is not None  # builds work
    rotation = rotate_root(host.root_keys, generate=1, out=tmp_path / "retry")
    assert (rotation.root.version, rotation.release_keys.version) == (2, 3)  # type: ignore[union-attr]
