"""Pieces of the pipeline that need no full build: training determinism, cache keys and planning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_small_project
from edgeops_toolchain.data import check_data, load_dataset
from edgeops_toolchain.project import load_project
from edgeops_toolchain.train import train_model


def test_training_is_deterministic(tmp_path: Path) -> None:
    project = load_project(make_small_project(tmp_path / "p", n_train=400, epochs=2))
    ds = load_dataset(project)
    pre = check_data(ds, project.checks, project.preprocessing).preprocessing
    progress: list[tuple[int, int]] = []
    a = train_model(project, ds, pre, on_epoch=lambda d, t: progress.append((d, t)))
    b = train_model(project, ds, pre)
    assert progress == [(1, 2), (2, 2)]
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.loss_per_epoch == b.loss_per_epoch
    assert a.loss_per_epoch[1] < a.loss_per_epoch[0]


def test_step_declarations_are_consistent() -> None:
    """Every state input is produced by an earlier step; every output is a state field."""
    import dataclasses

    from edgeops_toolchain.pipeline import STEPS, BuildState

    fields = {f.name for f in dataclasses.fields(BuildState)}
    produced: set[str] = set()
    for step in STEPS:
        for name in step.inputs:
            if name.split(".")[0] in {"project", "target", "key"}:
                continue
            assert name in produced, f"{step.name} reads {name!r} before any step produces it"
        assert set(step.outputs) <= fields, step.name
        produced |= set(step.outputs)
    assert [s.name for s in STEPS] == ["data", "train", "export", "quantize", "validate", "package", "sign", "report"]


def test_mkl_reproducibility_mode_is_set_on_import() -> None:
    """MKL reads MKL_CBWR once, at its first call: importing the toolchain must set it first."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    code = "import os, edgeops_toolchain; print(os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "AUTO,STRICT"
    env["MKL_CBWR"] = "COMPATIBLE"  # the user's own choice wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "COMPATIBLE"


_KEYS = """
import json, sys
from pathlib import Path
from edgeops_core import find_profile
from edgeops_toolchain.pipeline import BuildState, step_keys, _Silent
from edgeops_toolchain.project import load_project
from edgeops_toolchain.resources import builtin_targets_dir
from edgeops_toolchain.signing import generate_keypair, load_signing_key
key = Path(sys.argv[2]) / "edgeops-signing.pem"
if not key.exists():
    generate_keypair(key.parent)
state = BuildState(project=load_project(Path(sys.argv[1])), profile=find_profile(sys.argv[3], [builtin_targets_dir()]),
                   out_dir=Path("."), key=key, trusted=load_signing_key(key), progress=_Silent())
print(json.dumps(step_keys(state)))
"""


def _keys(project: Path, keydir: Path, target: str, seed: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run(
        [sys.executable, "-c", _KEYS, str(project), str(keydir), target], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_cache_keys_are_stable_across_processes_and_follow_inputs(tmp_path: Path) -> None:
    """Keys must not depend on the hash seed (profiles hold sets); they change exactly with their inputs."""
    project = make_small_project(tmp_path / "p")
    a = _keys(project, tmp_path / "k", "ecu", "1")
    assert a == _keys(project, tmp_path / "k", "ecu", "2")
    mobile = _keys(project, tmp_path / "k", "mobile", "3")
    assert [s for s in a if a[s] == mobile[s]] == ["data", "train"]  # a target switch reuses the trained model
    toml = project / "edgeops.toml"
    toml.write_text(toml.read_text().replace("learning_rate = 0.001", "learning_rate = 0.002"))
    lr = _keys(project, tmp_path / "k", "ecu", "1")
    assert lr["data"] == a["data"] and all(lr[s] != a[s] for s in a if s != "data")
    (project / "vibration_model.py").write_text((project / "vibration_model.py").read_text() + "\n# a comment\n")
    code = _keys(project, tmp_path / "k", "ecu", "1")
    assert all(code[s] != lr[s] for s in a)  # any code change re-runs everything


def _keys_with_code(project: Path, keydir: Path, site: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _KEYS, str(project), str(keydir), "ecu"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_cache_keys_follow_edgeops_own_code_not_only_its_version(tmp_path: Path) -> None:
    """A changed edgeops source file (same version: an install from a checkout, a developer's
    edit) changes every key; byte-code caches and non-Python files do not."""
    import edgeops_agent
    import edgeops_core
    import edgeops_toolchain
    from edgeops_toolchain.resources import builtin_targets_dir

    site = tmp_path / "checkout" / "toolchain"  # laid out as a checkout: resources finds ../targets
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "targets").symlink_to(builtin_targets_dir())
    for module in (edgeops_core, edgeops_toolchain, edgeops_agent):
        src = Path(str(module.__file__)).parent
        shutil.copytree(src, site / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    project = make_small_project(tmp_path / "p")
    before = _keys_with_code(project, tmp_path / "k", site)
    assert before == _keys(project, tmp_path / "k", "ecu", "1")  # the copy is the installed code
    (site / "edgeops_toolchain" / "notes.txt").write_text("not code")
    assert _keys_with_code(project, tmp_path / "k", site) == before  # (the import also wrote __pycache__)
    edited = site / "edgeops_toolchain" / "onnx_export.py"
    edited.write_text(edited.read_text() + "\n# a comment\n")
    after = _keys_with_code(project, tmp_path / "k", site)
    assert all(after[s] != before[s] for s in before)


def test_python_sources_digest_reads_paths_and_bytes_of_python_files_only(tmp_path: Path) -> None:
    from edgeops_toolchain.project import python_sources_digest

    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.py").write_text("y = 2\n")
    first = python_sources_digest(root)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0" * 16)
    (root / "data.toml").write_text("k = 1\n")
    assert python_sources_digest(root) == first
    (root / "sub" / "b.py").rename(root / "sub" / "c.py")
    renamed = python_sources_digest(root)
    assert renamed != first
    (root / "sub" / "c.py").write_text("y = 3\n")
    assert python_sources_digest(root) not in (first, renamed)


def test_plan_runs_what_misses_and_everything_after_package() -> None:
    from edgeops_toolchain.pipeline import STEPS, _plan

    names = [s.name for s in STEPS]
    everything: dict[str, dict[str, bytes]] = {n: {} for n in names}
    run, load = _plan(everything)
    assert run == set() and load == {"validate", "package", "sign", "report"}  # only what the end needs
    run, load = _plan({n: {} for n in names if n != "train"})
    assert run == {"train"} and "data" in load  # train needs the data; export's entry still stands
    run, _ = _plan({n: {} for n in names if n != "package"})
    assert run == {"package", "sign", "report"}  # a new manifest makes new bytes downstream


def test_latency_retries_keep_the_quietest_run_after_growing_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A p99 over the budget is measured again after pauses of 0.1, 0.2, 0.4, 0.8 s; the quietest run counts,
    and measuring stops at the first run within the budget (a slow model fails after all of them)."""
    import numpy as np

    from edgeops_toolchain import validate

    pauses: list[float] = []
    monkeypatch.setattr(validate.time, "sleep", pauses.append)
    ev = object.__new__(validate.Evaluator)
    runs = [np.full(100, ms) for ms in (5.0, 3.0, 4.0, 0.5, 0.1)]  # p99 of each run is its value
    monkeypatch.setattr(ev, "_time_runs", lambda x: runs.pop(0))
    got = ev.latency_ms(np.zeros((1, 3), np.float32), budget_ms=1.0)
    assert float(np.percentile(got, 99)) == 0.5 and pauses == [0.1, 0.2, 0.4] and len(runs) == 1

    pauses.clear()
    runs[:] = [np.full(100, ms) for ms in (5.0, 3.0, 4.0, 2.0, 6.0, 0.1)]  # too slow every time
    got = ev.latency_ms(np.zeros((1, 3), np.float32), budget_ms=1.0)
    assert float(np.percentile(got, 99)) == 2.0 and pauses == [0.1, 0.2, 0.4, 0.8] and len(runs) == 1

    pauses.clear()
    runs[:] = [np.full(100, 5.0), np.full(100, 0.1)]
    got = ev.latency_ms(np.zeros((1, 3), np.float32))  # no budget: one measurement, no pause
    assert float(np.percentile(got, 99)) == 5.0 and pauses == [] and len(runs) == 1
