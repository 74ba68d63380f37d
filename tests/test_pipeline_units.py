"""Pieces of the pipeline that need no full build: training determinism, release counters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_small_project
from edgeops_toolchain.data import check_data, load_dataset
from edgeops_toolchain.errors import BuildError
from edgeops_toolchain.project import load_project
from edgeops_toolchain.releases import ReleaseCounter
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


def test_release_counter(tmp_path: Path) -> None:
    counter = ReleaseCounter(tmp_path)
    assert counter.last("m", "ecu") is None
    counter.commit("m", "ecu", 1)
    counter.commit("m", "ecu", 2)
    counter.commit("m", "mobile", 1)
    assert counter.last("m", "ecu") == 2 and counter.last("m", "mobile") == 1
    with pytest.raises(BuildError, match="release 2 of m/ecu is not newer than the recorded 2"):
        counter.commit("m", "ecu", 2)
    assert ReleaseCounter(tmp_path).last("m", "ecu") == 2  # persisted


def test_release_counter_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "releases.json").write_text("{not json")
    with pytest.raises(BuildError, match="release counters are unreadable"):
        ReleaseCounter(tmp_path).last("m", "ecu")


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
    assert [s.name for s in STEPS] == ["data", "train", "export", "quantize", "validate", "package", "sign"]
