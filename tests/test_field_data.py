"""Field datasets: the file format, and what `edgeops build` and `edgeops evaluate` do with them."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import edgeops_core.fielddata as fielddata
from conftest import EXAMPLE, make_small_project, run_edgeops
from edgeops_core import (
    FIELD_FORMAT,
    UNLABELLED,
    FieldDataError,
    FieldDataset,
    Provenance,
    load_field_dataset,
    load_public_key,
    verify_bundle,
)
from edgeops_toolchain.data import check_data, feature_reference, field_rows, load_dataset
from edgeops_toolchain.errors import ProjectError
from edgeops_toolchain.project import load_project

PROVENANCE = Provenance(
    devices=("dev-1", "dev-2"),
    first_ts="2026-03-01T10:00:00.000000Z",
    last_ts="2026-03-02T11:30:00.250000Z",
    releases=(3, 4),
    group={"target": "ecu", "tags": {"cohort": "b"}},
    uploads=5,
    created="2026-03-03T00:00:00.000000Z",
)


def _tiny(**changes: object) -> FieldDataset:
    """Four rows, three features, two labels: small enough to reason about byte by byte."""
    fields: dict[str, object] = {
        "feature_names": ("a", "b", "c"),
        "label_names": ("ok", "bad"),
        "x": np.array([[0.0, 1.5, -2.0], [3.25, 4.0, 5.0], [6.0, -7.5, 8.0], [9.0, 10.0, 11.0]]),
        "y": np.array([0, 1, UNLABELLED, 1]),
        "device_index": np.array([0, 1, 1, 0]),
        "provenance": PROVENANCE,
    }
    fields.update(changes)
    return FieldDataset(**fields)  # type: ignore[arg-type]


def _random(n: int, seed: int, *, features: int = 4, labels: int = 3) -> FieldDataset:
    rng = np.random.default_rng(seed)
    return FieldDataset(
        feature_names=tuple(f"f{i}" for i in range(features)),
        label_names=tuple(f"l{i}" for i in range(labels)),
        x=rng.normal(size=(n, features)).astype(np.float32),
        y=rng.integers(UNLABELLED, labels, size=n),
        device_index=rng.integers(0, 2, size=n),
        provenance=PROVENANCE,
    )


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _meta(ds: FieldDataset, **changes: object) -> np.ndarray:
    meta = {
        "format": FIELD_FORMAT,
        "feature_names": list(ds.feature_names),
        "label_names": list(ds.label_names),
        "provenance": ds.provenance.to_dict(),
        "digest": ds.digest,
        **changes,
    }
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


# -- the format ---------------------------------------------------------------------------


def test_round_trip_is_exact_and_the_bytes_are_reproducible(tmp_path: Path) -> None:
    ds = _tiny()
    data = ds.to_bytes()
    assert data == _tiny().to_bytes()  # no timestamps: the same content, the same file
    back = FieldDataset.from_bytes(data, expect_digest=ds.digest)
    assert back == ds and back.digest == ds.digest
    assert back.x.dtype == np.float32 and back.y.dtype == np.int64 and back.device_index.dtype == np.int32
    assert np.array_equal(back.x, ds.x) and np.array_equal(back.y, ds.y) and np.array_equal(back.device_index, ds.device_index)
    assert back.provenance == ds.provenance and back.provenance.group["tags"] == {"cohort": "b"}
    assert back.feature_names == ("a", "b", "c") and back.label_names == ("ok", "bad")
    assert ds.labelled == 3 and ds.labelled_fraction == 0.75
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # a plain .npz for numpy
        assert sorted(npz.files) == ["device_index", "meta", "x", "y"]
        assert json.loads(npz["meta"].tobytes())["digest"] == ds.digest
    path = tmp_path / f"{ds.digest.removeprefix('sha256:')}.npz"
    path.write_bytes(data)
    assert load_field_dataset(path, expect_digest=ds.digest) == ds
    # What numpy.savez writes with the same arrays and meta is read too.
    written = _npz(x=ds.x, y=ds.y, device_index=ds.device_index, meta=_meta(ds))
    assert FieldDataset.from_bytes(written) == ds


def test_arrays_are_read_only_copies() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    ds = _tiny(x=x, y=np.array([0, 1]), device_index=np.array([0, 0]))
    before = ds.digest
    x[0, 0] = 1.0  # the caller's array, not the dataset's
    assert ds.x[0, 0] == 0.0 and ds.digest == before
    with pytest.raises(ValueError, match="read-only"):
        ds.x[0, 0] = 2.0


def test_digest_is_pinned_and_follows_every_part() -> None:
    ds = _tiny()
    # The console stores datasets under this digest: the encoding must never change silently.
    assert ds.digest == "sha256:77fbf8076e7c55f218c7f60ffbef95226a3b7a398888080171e65220e2d478da"
    # The encoding, spelled out (docs/projects.md): length-prefixed parts.
    import hashlib

    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little") + data)

    def canonical(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    part(b"edgeops-field-dataset/1")
    part(canonical(["a", "b", "c"]))
    part(canonical(["ok", "bad"]))
    part(canonical(PROVENANCE.to_dict()))
    for name, dtype in (("x", "<f4"), ("y", "<i8"), ("device_index", "<i4")):
        arr = getattr(ds, name)
        part(canonical({"dtype": dtype, "name": name, "shape": list(arr.shape)}))
        part(arr.astype(dtype).tobytes())
    assert ds.digest == f"sha256:{h.hexdigest()}"
    x = ds.x.copy()
    x[2, 1] = np.nextafter(x[2, 1], np.float32(0))  # one ulp
    y = ds.y.copy()
    y[2] = 0  # an unlabelled row gets a label
    changed = [
        _tiny(x=x),
        _tiny(y=y),
        _tiny(device_index=np.array([0, 1, 1, 1])),
        _tiny(feature_names=("a", "b", "d")),
        _tiny(label_names=("ok", "broken")),
        _tiny(provenance=dataclasses.replace(PROVENANCE, uploads=6)),
        _tiny(provenance=dataclasses.replace(PROVENANCE, group={"target": "ecu", "tags": {"cohort": "c"}})),
        _tiny(provenance=dataclasses.replace(PROVENANCE, releases=(4,))),
        _tiny(x=ds.x[:3], y=ds.y[:3], device_index=ds.device_index[:3]),
    ]
    digests = {d.digest for d in changed}
    assert len(digests) == len(changed) and ds.digest not in digests


def _rewrite_member(data: bytes, name: str, payload: bytes) -> bytes:
    """The archive with member ``name`` replaced (the rest copied as they are)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename == name else src.read(info))
    return out.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


_DS = _tiny()
_OK = _DS.to_bytes()
_OTHER = _tiny(provenance=dataclasses.replace(PROVENANCE, uploads=9))

REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "one byte appended": (lambda: _OK + b"\0", "bytes were appended or cut"),
    "a zip comment appended": (lambda: _OK[:-2] + b"\x01\x00!", "bytes were appended or cut"),
    "last byte cut": (lambda: _OK[:-1], "bytes were appended or cut"),
    "half cut": (lambda: _OK[: len(_OK) // 2], "bytes were appended or cut"),
    "bytes prepended": (lambda: b"\0" * 4 + _OK, "not an .npz file"),
    "not a zip": (lambda: b"x" * 100, "not an .npz file"),
    "a bare .npy": (lambda: _npy(np.zeros(3)), "not an .npz file"),
    "one bit flipped in x": (lambda: _OK[:200] + bytes([_OK[200] ^ 1]) + _OK[201:], "x.npy"),
    "meta digest of other content": (
        lambda: _rewrite_member(_OK, "meta.npy", _npy(_meta(_DS, digest=_OTHER.digest))),
        "the file was altered",
    ),
    "meta not JSON": (
        lambda: _rewrite_member(_OK, "meta.npy", _npy(np.frombuffer(b"{nope", np.uint8))),
        "meta is not UTF-8 JSON",
    ),
    "meta of another format": (
        lambda: _rewrite_member(_OK, "meta.npy", _npy(_meta(_DS, format="edgeops-field-dataset/9"))),
        "meta.format is 'edgeops-field-dataset/9'",
    ),
    "meta with an extra key": (lambda: _rewrite_member(_OK, "meta.npy", _npy(_meta(_DS, note="hi"))), "extra ['note']"),
    "x as float64": (lambda: _rewrite_member(_OK, "x.npy", _npy(_DS.x.astype(np.float64))), "'x' must have dtype <f4"),
    "y as a column": (lambda: _rewrite_member(_OK, "y.npy", _npy(_DS.y.reshape(-1, 1))), "'y' must have 1 dimension(s)"),
    "a pickled object array": (
        lambda: _npz(x=_DS.x, y=_DS.y, device_index=_DS.device_index, meta=np.array([{"a": 1}], dtype=object)),
        "'meta' must have dtype |u1, got |O",
    ),
    "an extra array": (
        lambda: _npz(x=_DS.x, y=_DS.y, device_index=_DS.device_index, meta=_meta(_DS), z=np.zeros(1)),
        "extra ['z.npy']",
    ),
    "a missing array": (lambda: _npz(x=_DS.x, y=_DS.y, meta=_meta(_DS)), "missing ['device_index.npy']"),
    "compressed members": (
        lambda: _compressed(x=_DS.x, y=_DS.y, device_index=_DS.device_index, meta=_meta(_DS)),
        "stored uncompressed",
    ),
    "NaN in x": (
        lambda: _npz(x=_with_nan(_DS.x, 1, 1), y=_DS.y, device_index=_DS.device_index, meta=_meta(_DS)),
        "'x' has 1 NaN/inf value(s); first at row 1, feature 'b'",
    ),
    "label out of range": (
        lambda: _npz(x=_DS.x, y=np.array([0, 2, -1, 1]), device_index=_DS.device_index, meta=_meta(_DS)),
        "'y' row 1 is 2",
    ),
    "device index out of range": (
        lambda: _npz(x=_DS.x, y=_DS.y, device_index=np.array([0, 1, 2, 0], dtype=np.int32), meta=_meta(_DS)),
        "'device_index' row 2 is 2, not an index into the 2 provenance.devices",
    ),
}


def _with_nan(x: np.ndarray, row: int, col: int) -> np.ndarray:
    out = x.copy()
    out[row, col] = np.nan
    return out


def _compressed(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_are_one_clear_line(case: str) -> None:
    make, needle = REFUSED[case]
    with pytest.raises(FieldDataError) as info:
        FieldDataset.from_bytes(make())
    message = str(info.value)
    assert message.startswith("field dataset: ") and "\n" not in message, message
    assert needle in message, message


def test_expect_digest_and_row_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FieldDataError, match=f"digest is {_DS.digest}, expected {_OTHER.digest}"):
        FieldDataset.from_bytes(_OK, expect_digest=_OTHER.digest)
    with pytest.raises(FieldDataError, match="expected digest must be 'sha256:'"):
        FieldDataset.from_bytes(_OK, expect_digest="abc")
    monkeypatch.setattr(fielddata, "MAX_FIELD_ROWS", 3)
    with pytest.raises(FieldDataError, match="4 rows, more than the 3 accepted"):
        FieldDataset.from_bytes(_OK)
    with pytest.raises(FieldDataError, match="4 rows, more than the 3 accepted"):
        _tiny()
    missing = tmp_path / "nope.npz"
    with pytest.raises(FieldDataError, match=rf"{missing}: cannot read field dataset"):
        load_field_dataset(missing)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(_OK + b"\0")
    with pytest.raises(FieldDataError, match=rf"^{bad}: the .npz does not end"):
        load_field_dataset(bad)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"x": np.array([[0.0, np.inf, 0.0]]), "y": [0], "device_index": [0]}, "'x' has 1 NaN/inf"),
        ({"x": np.array([[1e39, 0.0, 0.0]]), "y": [0], "device_index": [0]}, "'x' has 1 NaN/inf"),  # beyond float32
        ({"y": np.array([0, 1, -2, 1])}, "'y' row 2 is -2"),
        ({"y": np.array([0.0, 1.0, 1.0, 1.0])}, "'y' must hold integers"),
        ({"device_index": np.array([0, 1, -1, 0])}, "'device_index' row 2 is -1"),
        ({"x": np.zeros((4, 2))}, "'x' must have shape [rows, 3]"),
        ({"y": np.array([0, 1, 1])}, "'y' must have shape [4]"),
        ({"feature_names": ("a", "b", "a")}, "'feature_names' names 'a' more than once"),
        ({"label_names": ()}, "'label_names' must be a non-empty list"),
    ],
)
def test_construction_validates(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(FieldDataError) as info:
        _tiny(**changes)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("uploads"), "missing field 'uploads' in 'provenance'"),
        (lambda d: d.update(extra=1), "unknown field(s) extra in 'provenance'"),
        (lambda d: d.update(devices=["dev-2", "dev-1"]), "'provenance.devices' must be sorted"),
        (lambda d: d.update(devices=["no/slash"]), "'provenance.devices[0]'"),
        (lambda d: d.update(releases=[0]), "'provenance.releases[0]' must be an integer >= 1"),
        (lambda d: d.update(uploads=True), "'provenance.uploads' must be an integer"),
        (lambda d: d.update(first_ts="yesterday"), "'provenance.first_ts' must be UTC text"),
        (lambda d: d.update(last_ts="2026-02-01T00:00:00Z"), "last_ts 2026-02-01T00:00:00Z is before first_ts"),
        (lambda d: d.update(group=[]), "'provenance.group' must be a table/object"),
    ],
)
def test_provenance_from_dict_is_strict(change: Callable[[dict[str, object]], object], needle: str) -> None:
    raw = PROVENANCE.to_dict()
    assert Provenance.from_dict(raw) == PROVENANCE
    change(raw)
    with pytest.raises(FieldDataError) as info:
        Provenance.from_dict(raw)
    assert needle in str(info.value)


def test_split_is_per_row_and_stable_across_overlapping_datasets() -> None:
    whole = _random(3000, seed=1)
    a = dataclasses.replace(whole, x=whole.x[:2000], y=whole.y[:2000], device_index=whole.device_index[:2000])
    b = dataclasses.replace(
        whole,
        x=whole.x[1000:],
        y=whole.y[1000:],
        device_index=whole.device_index[1000:],
        provenance=dataclasses.replace(PROVENANCE, uploads=1),
    )
    assert a.digest != b.digest
    train_a, hold_a = a.split()
    assert np.array_equal(train_a, a.split()[0]) and np.array_equal(hold_a, a.split()[1])  # deterministic
    labelled = np.flatnonzero(a.y != UNLABELLED)
    assert np.array_equal(np.union1d(train_a, hold_a), labelled) and not np.intersect1d(train_a, hold_a).size
    assert 0.25 < hold_a.size / labelled.size < 0.35  # HOLDOUT_FRACTION = 0.3
    held_a = {a.x[i].tobytes() for i in hold_a}
    trained_b = {b.x[i].tobytes() for i in b.split()[0]}
    held_b = {b.x[i].tobytes() for i in b.split()[1]}
    shared = {whole.x[i].tobytes() for i in range(1000, 2000) if whole.y[i] != UNLABELLED}
    assert shared and held_a & shared == held_b & shared  # the overlap splits identically
    assert not (held_a & trained_b)  # nothing held out in one is trained on from the other
    # The rule, spelled out: the first 4 bytes of sha256(row), big-endian, below 0.3 * 2**32.
    import hashlib

    row = int(hold_a[0])
    assert int.from_bytes(hashlib.sha256(a.x[row].astype("<f4").tobytes()).digest()[:4], "big") < 0.3 * 2**32


def test_field_rows_dedupe_across_datasets() -> None:
    whole = _random(600, seed=2)
    a = dataclasses.replace(whole, x=whole.x[:400], y=whole.y[:400], device_index=whole.device_index[:400])
    b = dataclasses.replace(whole, x=whole.x[200:], y=whole.y[200:], device_index=whole.device_index[200:])
    for which in ("train", "holdout", "all"):
        x, y = field_rows([a, b], which)
        alone, _ = field_rows([whole], which)
        assert x.shape == alone.shape and len({r.tobytes() for r in x}) == x.shape[0]
    x, y = field_rows([a, b], "all")
    assert x.shape[0] == int((whole.y != UNLABELLED).sum()) and (y != UNLABELLED).all()


# -- the project file ---------------------------------------------------------------------


def test_project_field_keys(tmp_path: Path) -> None:
    project = make_small_project(tmp_path / "p", extra="")
    toml = project / "edgeops.toml"
    text = toml.read_text()
    assert load_project(project).field_data == () and load_project(project).field_reference == "field"
    toml.write_text(text.replace("[train]", 'field = ["field/a.npz", "b.npz"]\nfield_reference = "training"\n\n[train]', 1))
    p = load_project(project)
    assert p.field_data == (project.resolve() / "field" / "a.npz", project.resolve() / "b.npz")
    assert p.field_reference == "training" and p.hyperparameters()["data"]["field_reference"] == "training"
    extra = p.with_field_data([Path("c.npz")])
    assert extra.field_data[-1] == Path("c.npz").absolute() and len(extra.field_data) == 3
    for bad, needle in [
        ('field = "a.npz"', "'data.field' must be a list of file paths relative to the project folder"),
        ('field = ["/abs/a.npz"]', "'data.field' must be a list of file paths relative"),
        ('field = ["../a.npz"]', "'data.field' must be paths inside the project folder"),
        ('field_reference = "recent"', "'data.field_reference' must be 'field' or 'training'"),
    ]:
        toml.write_text(text.replace("[train]", f"{bad}\n\n[train]", 1))
        with pytest.raises(ProjectError) as info:
            load_project(project)
        assert needle in str(info.value)


# -- builds -------------------------------------------------------------------------------


def _vibration() -> ModuleType:
    """The example's data generator (numpy only), to draw field rows from."""
    name = "_field_test_vibration_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / "vibration_data.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def _field_dataset(seed: int, *, labelled: int = 400, unlabelled: int = 60, gain: float = 1.6) -> FieldDataset:
    """Rows a fleet saw after its sensors' gain shifted, most labelled; the unlabelled ones shifted further."""
    vib = _vibration()
    x, y = vib.generate(labelled, seed, vib.Shift(sensor_gain=gain))
    xu, _ = vib.generate(unlabelled, seed + 1, vib.Shift(sensor_gain=gain * 3)) if unlabelled else (x[:0], y[:0])
    return FieldDataset(
        feature_names=vib.feature_names(),
        label_names=vib.LABELS,
        x=np.concatenate([x, xu]),
        y=np.concatenate([y, np.full(unlabelled, UNLABELLED)]),
        device_index=np.arange(labelled + unlabelled) % 2,
        provenance=PROVENANCE,
    )


@dataclass(frozen=True)
class FieldBuild:
    """A small project built once with one field dataset, through the CLI and the dev key."""

    project: Path
    field: Path
    dataset: FieldDataset
    result: dict[str, Any]
    home: Path
    out: Path

    @property
    def bundle(self) -> Path:
        return Path(self.result["bundle"])

    def edgeops(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run_edgeops(*args, env={"EDGEOPS_HOME": str(self.home)})


@pytest.fixture(scope="module")
def field_build(tmp_path_factory: pytest.TempPathFactory) -> FieldBuild:
    root = tmp_path_factory.mktemp("field-build")
    project = make_small_project(root / "project")
    dataset = _field_dataset(seed=101)
    path = root / f"{dataset.digest.removeprefix('sha256:')}.npz"
    path.write_bytes(dataset.to_bytes())
    home = root / "home"
    proc = run_edgeops(
        "build", "-t", "ecu", "-p", project, "-o", root / "dist", "--field-data", path, "--json", env={"EDGEOPS_HOME": str(home)}
    )
    assert proc.returncode == 0, proc.stderr
    return FieldBuild(project, path, dataset, json.loads(proc.stdout), home, root / "dist")


def test_build_trains_on_field_rows_and_measures_the_held_out_ones(field_build: FieldBuild) -> None:
    ds = field_build.dataset
    manifest = verify_bundle(field_build.bundle, [load_public_key(field_build.home / "keys" / "dev-signing.pub.pem")]).manifest
    assert manifest.lineage.field_datasets == (ds.digest,)
    assert field_build.result["field_datasets"] == [ds.digest]
    train_idx, holdout_idx = ds.split()
    metrics = manifest.metrics
    assert metrics["field_train_rows"] == train_idx.size and metrics["field_holdout_rows"] == holdout_idx.size
    assert 0.0 <= metrics["field_holdout_accuracy"] <= 1.0 and 0.0 <= metrics["field_holdout_accuracy_float"] <= 1.0
    assert field_build.result["metrics"] == dict(metrics)
    budgets = {row["name"]: row for row in field_build.result["budgets"]}
    assert budgets["field holdout (int8)"]["kind"] == "info"
    # Training rows grew by the labelled train-split rows, and by nothing else.
    project = load_project(field_build.project)
    base = load_dataset(project)
    merged = load_dataset(project.with_field_data([field_build.field]))
    assert merged.x_train.shape[0] == base.x_train.shape[0] + train_idx.size
    assert merged.field is not None and merged.field.holdout_x.shape[0] == holdout_idx.size
    assert not ({r.tobytes() for r in merged.field.holdout_x} & {r.tobytes() for r in merged.x_train})
    # The drift reference describes the labelled field rows (the unlabelled ones, shifted
    # further, are left out), not the training split.
    labelled_x, _ = field_rows([ds], "all")
    from_field = feature_reference(labelled_x, ds.feature_names)
    from_training = feature_reference(merged.x_train, ds.feature_names)
    assert manifest.drift_reference.sample_count == labelled_x.shape[0] == ds.labelled
    assert [f.bin_edges for f in manifest.drift_reference.features] == [f.bin_edges for f in from_field]
    assert [f.bin_edges for f in from_field] != [f.bin_edges for f in from_training]
    j = manifest.feature_names.index("x_log_rms")  # a gain of 1.6 moves log10 RMS up by 0.2
    assert manifest.drift_reference.features[j].mean > float(base.x_train[:, j].mean()) + 0.15


def test_reference_falls_back_to_training(field_build: FieldBuild) -> None:
    project = load_project(field_build.project).with_field_data([field_build.field])
    ds = load_dataset(project)
    assert check_data(ds, project.checks, project.preprocessing).reference_source == "field"
    report = check_data(ds, project.checks, project.preprocessing, field_reference="training")
    assert report.reference_source == "training"
    assert report.features == feature_reference(ds.x_train, ds.feature_names)
    few = _field_dataset(seed=303, labelled=99, unlabelled=0)
    small = load_dataset(project, field_data=[(Path("few.npz"), few)])
    assert check_data(small, project.checks, project.preprocessing).reference_source == "training"


def test_same_dataset_hits_the_cache_and_a_new_one_makes_a_release(field_build: FieldBuild, tmp_path: Path) -> None:
    renamed = tmp_path / "same-content.npz"
    shutil.copyfile(field_build.field, renamed)
    again = field_build.edgeops(
        "build", "-t", "ecu", "-p", field_build.project, "-o", field_build.out, "--json", "--field-data", renamed
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["release"] == field_build.result["release"] and result["reused_bundle"] is True
    other = _field_dataset(seed=202)
    path = tmp_path / "other.npz"
    path.write_bytes(other.to_bytes())
    # Another folder: the bundle the other tests evaluate stays as it is.
    new = field_build.edgeops(
        "build", "-t", "ecu", "-p", field_build.project, "-o", tmp_path / "out", "--json", "--field-data", path
    )
    assert new.returncode == 0, new.stderr
    result = json.loads(new.stdout)
    assert result["release"] == field_build.result["release"] + 1
    assert result["cached_steps"] == [] and result["field_datasets"] == [other.digest]


def _one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_build_stops_on_a_bad_field_dataset(field_build: FieldBuild, tmp_path: Path) -> None:
    renamed = dataclasses.replace(field_build.dataset, feature_names=("x_band00_raw", *field_build.dataset.feature_names[1:]))
    wrong = tmp_path / "wrong-names.npz"
    wrong.write_bytes(renamed.to_bytes())
    proc = field_build.edgeops("build", "-t", "ecu", "-p", field_build.project, "-o", tmp_path / "out", "--field-data", wrong)
    _one_line(proc, 2, str(wrong), "feature_names differ", "feature_names[0] is 'x_band00_raw', expected 'x_band00_0_32hz'")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(field_build.field.read_bytes()[:-10])
    proc = field_build.edgeops("build", "-t", "ecu", "-p", field_build.project, "-o", tmp_path / "out", "--field-data", cut)
    _one_line(proc, 2, str(cut), "bytes were appended or cut")
    assert not (tmp_path / "out").exists()


def test_evaluate_json_matches_the_runtime_by_hand(field_build: FieldBuild) -> None:
    import onnxruntime as ort

    from edgeops_core import apply_preprocessing

    proc = field_build.edgeops("evaluate", field_build.bundle, "--field-data", field_build.field, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    verified = verify_bundle(field_build.bundle, [load_public_key(field_build.home / "keys" / "dev-signing.pub.pem")])
    m = verified.manifest
    session = ort.InferenceSession(verified.model, providers=["CPUExecutionProvider"])
    ds = field_build.dataset
    held = ds.split()[1]
    x = apply_preprocessing(m.preprocessing, ds.x[held])
    predicted = np.array([int(session.run(None, {"features": x[i : i + 1]})[0].argmax()) for i in range(x.shape[0])])
    assert result["accuracy"] == float((predicted == ds.y[held]).mean()) == m.metrics["field_holdout_accuracy"]
    assert result["rows"] == held.size and result["split"] == "holdout"
    assert result["bundle"] == str(field_build.bundle) and result["release"] == m.release and result["name"] == m.name
    assert list(result["per_class"]) == list(m.labels)
    assert sum(c["rows"] for c in result["per_class"].values()) == held.size
    first = result["per_class"][m.labels[0]]
    rows0 = ds.y[held] == 0
    assert first["rows"] == int(rows0.sum()) and first["accuracy"] == float((predicted[rows0] == 0).mean())
    every = field_build.edgeops("evaluate", field_build.bundle, "--field-data", field_build.field, "--split", "all", "--json")
    assert json.loads(every.stdout)["rows"] == ds.labelled


def test_evaluate_refusals_and_an_unlabelled_dataset(field_build: FieldBuild, tmp_path: Path) -> None:
    ds = field_build.dataset
    unlabelled = dataclasses.replace(ds, y=np.full(ds.rows, UNLABELLED))
    path = tmp_path / "unlabelled.npz"
    path.write_bytes(unlabelled.to_bytes())
    proc = field_build.edgeops("evaluate", field_build.bundle, "--field-data", path, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["accuracy"] is None and result["rows"] == 0
    assert all(c == {"rows": 0, "accuracy": None} for c in result["per_class"].values())
    relabelled = dataclasses.replace(ds, label_names=("normal", "imbalance", "misalignment", "bearing_inner", "looseness"))
    wrong = tmp_path / "labels.npz"
    wrong.write_bytes(relabelled.to_bytes())
    proc = field_build.edgeops("evaluate", field_build.bundle, "--field-data", wrong)
    _one_line(
        proc, 2, "label_names differ", "label_names[3] is 'bearing_inner', expected 'bearing_outer'", field_build.bundle.name
    )
    keys = tmp_path / "keys"
    assert field_build.edgeops("keys", "generate", keys).returncode == 0
    other_key = keys / "edgeops-signing.pub.pem"
    proc = field_build.edgeops("evaluate", field_build.bundle, "--field-data", field_build.field, "--key", other_key)
    _one_line(proc, 4)
    proc = field_build.edgeops("evaluate", tmp_path / "missing.edgeops", "--field-data", field_build.field)
    _one_line(proc, 2, "no such bundle file")
