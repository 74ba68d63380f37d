"""`edgeops release revert`: an earlier model, signed again as a new, higher release.

Two real releases with different models come from the session's build (release 1) and one
cheap real rebuild of a copy of its project with another int8 calibration sample count and
version (release 2): the copied step cache supplies data checks, training and export, so no
model is trained again; quantize onwards runs.
The revert of 2 back to 1 is then checked the way a device and an operator would: `edgeops
verify`, edgeops_core's streaming verification, the registry, and a real agent install over
release 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Built, run_agent, run_edgeops
from edgeops_core import BundleError, Manifest, load_public_key, parse_time, read_members, verify_bundle_file
from edgeops_toolchain.registry import Registry
from edgeops_toolchain.revert import RevertError, RevertSourceError, revert_release, revert_version
from edgeops_toolchain.signing import generate_keypair

NAME = "vibration-classifier"


@dataclass(frozen=True)
class TwoReleases:
    """A registry holding release 1 (the session build) and release 2 (a rebuild)."""

    registry: Path
    release1: Path
    release2: Path
    home: Path


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, built: Built, small_project: Path) -> TwoReleases:
    root = tmp_path_factory.mktemp("revert")
    registry = root / "registry.sqlite"
    # A registry of our own that holds just the session's release 1 (the session registry may
    # hold later releases by now, built by other tests).
    first = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    assert first.release == 1
    with Registry(registry) as reg:
        digest = hashlib.sha256(built.bundle.read_bytes()).hexdigest()
        reg.record_release(first, bundle_sha256=digest, path=built.bundle, report_path=None, signer="session")
    shutil.copytree(built.home / "cache", root / "cache")
    project = root / "project"
    shutil.copytree(small_project, project, ignore=shutil.ignore_patterns("__pycache__"))
    toml = project / "edgeops.toml"
    text = toml.read_text().replace('version = "1.0.0"', 'version = "1.1.0"', 1)
    toml.write_text(text.replace("calibration_samples = 512", "calibration_samples = 200", 1))
    home = root / "home"
    proc = run_edgeops(
        "build",
        "-t",
        "ecu",
        "-p",
        project,
        "-o",
        root / "dist2",
        "--key",
        built.private_key,
        "--registry",
        registry,
        "--cache-dir",
        root / "cache",
        "--json",
        env={"EDGEOPS_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)
    # Honest and cheap: a real new release of another int8 model, the trained weights from the cache.
    assert second["release"] == 2 and second["version"] == "1.1.0"
    assert second["cached_steps"] == ["data", "train", "export"], second["cached_steps"]
    return TwoReleases(registry=registry, release1=built.bundle, release2=Path(second["bundle"]), home=home)


def test_revert_ships_release_1s_model_as_release_3(tmp_path: Path, built: Built, two: TwoReleases) -> None:
    out = tmp_path / "dist"
    proc = run_edgeops(
        "release",
        "revert",
        NAME,
        "--to",
        "1",
        "--registry",
        two.registry,
        "--key",
        built.private_key,
        "--out",
        out,
        "--json",
        env={"EDGEOPS_HOME": str(two.home)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    bundle = Path(result["bundle"])
    assert result["release"] == 3 and result["reverted_to"] == 1 and result["parent_release"] == 2
    assert result["version"] == "1.0.0+release.3.reverts-to.1" and bundle.parent == out
    assert bundle.name == "vibration-classifier-1.0.0+release.3.reverts-to.1-ecu.edgeops"

    checked = run_edgeops("verify", bundle, "--key", built.public_key, "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["release"] == 3

    trusted = [load_public_key(built.public_key)]
    new = verify_bundle_file(bundle, trusted)
    first = verify_bundle_file(two.release1, trusted)
    second = verify_bundle_file(two.release2, trusted)
    assert new.model_sha256 == first.model_sha256 == result["model_sha256"]
    assert new.read_model() == first.read_model()
    assert second.model_sha256 != first.model_sha256  # so the revert really went back
    assert new.manifest.release > max(first.manifest.release, second.manifest.release)
    assert new.manifest.lineage.reverted_to == 1 and new.manifest.lineage.parent_release == 2
    # Everything that describes the model is release 1's; only the release's own fields moved.
    same = ("inputs", "outputs", "labels", "feature_names", "preprocessing", "drift_reference", "self_test", "metrics")
    assert all(getattr(new.manifest, f) == getattr(first.manifest, f) for f in same)
    assert new.manifest.lineage.dataset_digest == first.manifest.lineage.dataset_digest
    assert new.manifest.created > first.manifest.created
    assert new.manifest.expires > first.manifest.expires

    with Registry(two.registry) as reg:
        record = reg.latest(NAME, "ecu")
        assert record is not None and record.release == 3 and record.path == str(bundle)
        assert record.bundle_sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest() == result["sha256"]
        assert record.lineage["reverted_to"] == 1 and record.version == result["version"]
    shown = run_edgeops("registry", "show", NAME, "-t", "ecu", "--registry", two.registry, "--json")
    assert json.loads(shown.stdout)["lineage"]["reverted_to"] == 1

    # A device on release 2 moves forward onto release 1's model; release 1 itself it refuses.
    device = tmp_path / "device"
    assert run_agent("trust", "add", built.public_key, "-d", device).returncode == 0
    on2 = run_agent("install", two.release2, "-d", device, "-t", "ecu", "--json")
    assert on2.returncode == 0, on2.stderr
    back = run_agent("install", two.release1, "-d", device)
    assert back.returncode == 3 and "not newer" in back.stderr
    on3 = run_agent("install", bundle, "-d", device, "--json")
    assert on3.returncode == 0, on3.stderr
    assert json.loads(on3.stdout)["release"] == 3
    status = json.loads(run_agent("status", "-d", device, "--json").stdout)
    assert status["highest_release"] == {NAME: 3}


def _one_line(proc: object, code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)  # type: ignore[attr-defined]
    assert text in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr  # type: ignore[attr-defined]


def test_bad_reverts_say_why_and_change_nothing(tmp_path: Path, built: Built, two: TwoReleases) -> None:
    registry = tmp_path / "registry.sqlite"
    with sqlite3.connect(two.registry) as src, sqlite3.connect(registry) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    # Whatever ran before: release 2 is not the latest, so reverting to it reaches its bundle.
    last = revert_release(NAME, to=1, registry=registry, key=built.private_key, out_dir=tmp_path / "setup").manifest.release
    out = tmp_path / "out"
    env = {"EDGEOPS_HOME": str(two.home)}

    def cli(*args: object) -> object:
        return run_edgeops("release", "revert", *args, "--registry", registry, "--key", built.private_key, "-o", out, env=env)

    _one_line(cli("nope", "--to", "1"), 2, "has no release of 'nope'")
    _one_line(cli(NAME, "--to", "1", "-t", "mobile"), 2, "no release of 'vibration-classifier' for target 'mobile' (it has ecu)")
    _one_line(cli(NAME, "--to", "99"), 2, "has no release 99 of 'vibration-classifier' for target 'ecu' (recorded: 1, 2")
    _one_line(cli(NAME, "--to", str(last)), 2, f"release {last} is already the latest release")
    _one_line(cli(NAME, "--to", "0"), 2, "has no release 0")

    def revert(to: int, **kw: object) -> object:
        return revert_release(NAME, to=to, registry=registry, key=built.private_key, out_dir=out, **kw)  # type: ignore[arg-type]

    # Release 2's file moved away, then modified, then checked against a key that did not sign it.
    moved = two.release2.with_suffix(".away")
    two.release2.rename(moved)
    try:
        with pytest.raises(RevertSourceError, match=r"release 2 of 'vibration-classifier' for 'ecu': its bundle .* is missing"):
            revert(2)
        proc = cli(NAME, "--to", "2")
        _one_line(proc, 4, "is missing")
        data = bytearray(moved.read_bytes())
        data[len(data) // 2] ^= 0x01
        two.release2.write_bytes(bytes(data))
        with pytest.raises(RevertSourceError, match=r"is no longer the bundle recorded for it .*replaced or modified"):
            revert(2)
    finally:
        moved.replace(two.release2)
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(RevertSourceError, match=r"no longer verifies: .*not a trusted key; pass the key that signed it"):
        revert(2, verify_keys=[other.public])
    assert isinstance(RevertSourceError("x"), BundleError) and issubclass(RevertError, Exception)

    with Registry(registry) as reg:
        assert reg.last_release(NAME, "ecu") == last  # no number consumed by any refusal
    assert not out.exists()


def test_revert_version_keeps_the_model_version_as_build_metadata() -> None:
    assert revert_version("1.0.0", release=3, reverted_to=1) == "1.0.0+release.3.reverts-to.1"
    assert revert_version("2.1.0-rc.1+release.5.reverts-to.2", release=9, reverted_to=5) == "2.1.0-rc.1+release.9.reverts-to.5"


def test_an_expired_release_can_be_reverted_to_and_gets_a_fresh_lifetime(tmp_path: Path, built: Built) -> None:
    """Renewing a release that expired is a reason to revert to it: its bundle is checked as of its creation."""
    import dataclasses

    from edgeops_core import Manifest, pack_bundle, read_members, verify_bundle
    from edgeops_toolchain.signing import sign_members

    members = read_members(built.bundle.read_bytes())
    first = Manifest.from_json(members["manifest.json"])
    registry = tmp_path / "registry.sqlite"
    with Registry(registry) as reg:
        lifetimes = ((1, "2020-01-01T00:00:00Z", "2020-01-31T00:00:00Z"), (2, "2020-02-01T00:00:00Z", "2021-02-01T00:00:00Z"))
        for release, created, expires in lifetimes:
            manifest = dataclasses.replace(first, release=release, created=created, expires=expires)
            body = {"manifest.json": manifest.to_json(), "model.onnx": members["model.onnx"]}
            data = pack_bundle({**body, "model.sig": sign_members(body, built.private_key, subject=f"r{release}")})
            path = tmp_path / f"r{release}.edgeops"
            path.write_bytes(data)
            reg.record_release(manifest, bundle_sha256=hashlib.sha256(data).hexdigest(), path=path, report_path=None, signer="s")
    result = revert_release(NAME, to=1, registry=registry, key=built.private_key, out_dir=tmp_path / "out")
    renewed = verify_bundle(result.bundle_path, [load_public_key(built.public_key)]).manifest  # verified as of now
    assert (renewed.release, renewed.lineage.reverted_to, renewed.lineage.parent_release) == (3, 1, 2)
    lifetime = parse_time(renewed.expires) - parse_time(renewed.created)
    assert lifetime.days == 30  # release 1's own lifetime, from now
