"""The step cache and the registry: unit behaviour, then real rebuilds through the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import make_small_project, run_edgeops
from edgeops_core import load_public_key, verify_bundle
from edgeops_toolchain.cache import CacheEntryCorrupted, StepCache
from edgeops_toolchain.registry import Registry, RegistryError


def test_cache_roundtrip_and_corruption_is_detected_deleted_never_used(tmp_path: Path) -> None:
    cache = StepCache(tmp_path / "c")
    key = "ab" * 32
    assert cache.load("train", key) is None
    cache.store("train", key, {"model": b"\x00weights", "meta": b"{}"})
    assert cache.load("train", key) == {"model": b"\x00weights", "meta": b"{}"}
    folder = tmp_path / "c" / "train" / "ab" / key
    data = bytearray((folder / "model").read_bytes())
    data[3] ^= 0x01
    (folder / "model").write_bytes(bytes(data))
    found = cache.load("train", key)
    assert isinstance(found, CacheEntryCorrupted) and "model: sha256" in found.reason
    assert not folder.exists()  # deleted, so the next build starts clean
    assert cache.load("train", key) is None
    cache.store("train", key, {"model": b"x"})
    (folder / "entry.json").write_text("{broken")
    assert isinstance(cache.load("train", key), CacheEntryCorrupted)
    cache.store("train", key, {"model": b"x"})
    (folder / "model").unlink()
    assert isinstance(cache.load("train", key), CacheEntryCorrupted)
    stats = cache.stats()
    assert stats.entries == 0
    cache.store("data", "cd" * 32, {"d": b"123"})
    assert cache.stats().per_step == {"data": 1} and cache.clear() == 1


def test_cache_clear_deletes_only_cache_entries(tmp_path: Path) -> None:
    """`cache clear` on a folder that also holds the user's files removes the entries and nothing else."""
    root = tmp_path / "shared"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("mine")
    (root / "report.pdf").write_bytes(b"%PDF")
    (root / "train" / "zz").mkdir(parents=True)  # not a key folder: left alone
    (root / "train" / "zz" / "keep.txt").write_text("mine too")
    cache = StepCache(root)
    cache.store("train", "ab" * 32, {"model": b"w"})
    cache.store("data", "cd" * 32, {"d": b"1"})
    stray = root / "data" / "cd" / ".cdcdcdcdcdcd-crashed"  # a crashed store's temporary folder
    stray.mkdir()
    (stray / "d").write_bytes(b"partial")
    assert cache.clear() == 2
    assert cache.stats().entries == 0
    assert (root / "notes" / "todo.txt").read_text() == "mine"
    assert (root / "report.pdf").read_bytes() == b"%PDF"
    assert (root / "train" / "zz" / "keep.txt").read_text() == "mine too"
    assert not (root / "data").exists() and not stray.exists()  # emptied step folders go too
    assert not (root / "train" / "ab").exists()


def _manifest(built_manifest: object, **changes: object) -> object:
    import dataclasses

    return dataclasses.replace(built_manifest, **changes)  # type: ignore[type-var]


def test_registry_releases_are_monotonic_and_conflicts_refused(tmp_path: Path, built: object) -> None:
    manifest = verify_bundle(built.bundle, [load_public_key(built.public_key)]).manifest  # type: ignore[attr-defined]
    with Registry(tmp_path / "r.sqlite") as reg:
        assert reg.last_release(manifest.name, "ecu") == 0 and reg.latest(manifest.name, "ecu") is None
        reg.record_release(manifest, bundle_sha256="aa", path=tmp_path / "b1", report_path=None, signer="s")
        second = _manifest(manifest, release=2)
        reg.record_release(second, bundle_sha256="bb", path=tmp_path / "b2", report_path=None, signer="s")  # type: ignore[arg-type]
        with pytest.raises(RegistryError, match=r"release 2 of .* is not newer than the recorded 2"):
            reg.record_release(second, bundle_sha256="cc", path=tmp_path / "b3", report_path=None, signer="s")  # type: ignore[arg-type]
        latest = reg.latest(manifest.name, "ecu")
        assert latest is not None and latest.release == 2 and latest.bundle_sha256 == "bb"
        assert [r.release for r in reg.releases(name=manifest.name)] == [2, 1]
        assert latest.metrics["accuracy_deployed"] == manifest.metrics["accuracy_deployed"]
    with Registry(tmp_path / "r.sqlite") as reg:  # persisted
        assert reg.last_release(manifest.name, "ecu") == 2


def test_registry_imports_legacy_counters_and_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "releases.json").write_text(json.dumps({"m/ecu": 7}))
    with Registry(tmp_path / "registry.sqlite") as reg:
        assert reg.last_release("m", "ecu") == 7  # numbering never restarts below what devices saw
        assert reg.last_release("m", "mobile") == 0
    (tmp_path / "bad.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a usable registry database"):
        Registry(tmp_path / "bad.sqlite")
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RegistryError, match="registry schema 99"):
        Registry(other)


def _build(project: Path, home: Path, out: Path, *args: str) -> dict[str, object]:
    proc = run_edgeops("build", "-p", project, "-o", out, "--json", *args, env={"EDGEOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.slow
def test_rebuilds_reuse_what_did_not_change(tmp_path: Path) -> None:
    project = make_small_project(tmp_path / "p")
    home, out = tmp_path / "home", tmp_path / "out"
    cold = _build(project, home, out, "-t", "ecu")
    assert cold["cached_steps"] == [] and cold["release"] == 1
    bundle = Path(str(cold["bundle"]))
    first_bytes = bundle.read_bytes()

    warm = _build(project, home, out, "-t", "ecu")  # nothing changed
    assert warm["cached_steps"] == ["data", "train", "export", "quantize", "validate", "package", "sign", "report"]
    assert warm["reused_bundle"] is True and warm["release"] == 1 and warm["timings_s"] == {}
    assert bundle.read_bytes() == first_bytes

    switched = _build(project, home, out, "-t", "mobile")  # the trained model is reused
    assert switched["cached_steps"] == ["data", "train"] and switched["release"] == 1

    toml = project / "edgeops.toml"
    toml.write_text(toml.read_text().replace("learning_rate = 0.001", "learning_rate = 0.002"))
    retrained = _build(project, home, out, "-t", "ecu")  # a hyperparameter changed: retrain
    assert retrained["cached_steps"] == ["data"] and "train" in dict(retrained["timings_s"])  # type: ignore[call-overload]
    assert retrained["release"] == 2

    # Corrupt the cached training result: detected by digest, deleted, rebuilt, never used.
    entries = list((home / "cache" / "train").glob("*/*/entry.json"))
    current = next(e.parent for e in entries if e.stat().st_mtime == max(x.stat().st_mtime for x in entries))
    victim = current / "trained"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_edgeops("build", "-p", project, "-o", out, "-t", "ecu", env={"EDGEOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "cache entry of step 'train' was corrupted" in proc.stderr and "rebuilt" in proc.stderr
    assert "up to date" in proc.stdout  # the retrained weights are identical, so the bundle stands
    assert StepCache(home / "cache").load("train", current.name) is not None  # a good entry again

    fresh = _build(project, home, out, "-t", "ecu", "--no-cache")
    assert fresh["cached_steps"] == [] and fresh["release"] == 3  # --no-cache packages a new release

    listing = run_edgeops("registry", "list", "--json", env={"EDGEOPS_HOME": str(home)})
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["target"], r["release"]) for r in rows] == [("ecu", 3), ("ecu", 2), ("ecu", 1), ("mobile", 1)]
    show = run_edgeops("registry", "show", "vibration-classifier", "-t", "ecu", "--json", env={"EDGEOPS_HOME": str(home)})
    record = json.loads(show.stdout)
    assert record["release"] == 3 and record["lineage"]["parent_release"] == 2
    assert record["bundle_sha256"] == __import__("hashlib").sha256(Path(record["path"]).read_bytes()).hexdigest()
    assert [b["reused"] for b in record["builds"]] == [False]
    text = run_edgeops("registry", "show", "vibration-classifier", "-t", "ecu", "-r", "1", env={"EDGEOPS_HOME": str(home)})
    assert "release 1 → ecu" in text.stdout and "builds: 2 (1 reused the cached bundle)" in text.stdout
    missing = run_edgeops("registry", "show", "nope", "-t", "ecu", env={"EDGEOPS_HOME": str(home)})
    assert missing.returncode == 2 and "the registry has no release of 'nope' for target 'ecu'" in missing.stderr
    info = run_edgeops("cache", "info", "--json", env={"EDGEOPS_HOME": str(home)})
    assert json.loads(info.stdout)["per_step"]["train"] == 2


def test_cache_dir_option_and_env(tmp_path: Path) -> None:
    """--cache-dir and $EDGEOPS_CACHE_DIR put the entries where the user says, not in $EDGEOPS_HOME."""
    project = make_small_project(tmp_path / "p")
    home = tmp_path / "home"
    _build(project, home, tmp_path / "out", "-t", "ecu", "--cache-dir", str(tmp_path / "opt-cache"))
    assert not (home / "cache").exists()
    info = run_edgeops("cache", "info", "--cache-dir", tmp_path / "opt-cache", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["entries"] == 8
    proc = run_edgeops("cache", "clear", env={"EDGEOPS_CACHE_DIR": str(tmp_path / "opt-cache")})
    assert proc.returncode == 0 and "deleted 8 entries" in proc.stdout
    assert StepCache(tmp_path / "opt-cache").stats().entries == 0
