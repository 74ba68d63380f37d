"""Project files: loading, validation and entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLE, make_small_project
from edgeops_toolchain.data import load_dataset
from edgeops_toolchain.errors import DataError, ProjectError
from edgeops_toolchain.project import load_entry, load_project


def test_example_project_loads() -> None:
    p = load_project(EXAMPLE)
    assert p.name == "vibration-classifier" and p.version == "1.0.0"
    assert p.training.epochs == 30 and p.preprocessing == "standardize"
    assert p.hyperparameters()["model"]["hidden"] == [256, 256, 64]
    assert len(p.code_digest()) == 64


def test_code_digest_follows_code(tmp_path: Path) -> None:
    project = make_small_project(tmp_path / "p")
    before = load_project(project).code_digest()
    (project / "vibration_model.py").write_text((project / "vibration_model.py").read_text() + "\n# changed\n")
    assert load_project(project).code_digest() != before


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "vibration-classifier"', 'name = "Vibration Classifier"', r"'project.name' must be lowercase"),
        ('version = "1.0.0"', 'version = "one"', r"'project.version' must be a semantic version"),
        (
            'entry = "vibration_model:build_model"',
            'entry = "vibration_model"',
            r"'model.entry' must be of the form module:function",
        ),
        ("[checks]", "[chekcs]", r"unknown field\(s\) chekcs"),
        ("learning_rate = 0.001", "learning_rate = -1.0", r"'train.learning_rate' must be a number > 0"),
        ('kind = "standardize"', 'kind = "whiten"', r"'preprocessing.kind' must be 'standardize' or 'none'"),
    ],
)
def test_invalid_fields(tmp_path: Path, old: str, new: str, message: str) -> None:
    project = make_small_project(tmp_path / "p")
    toml = project / "edgeops.toml"
    assert old in toml.read_text()
    toml.write_text(toml.read_text().replace(old, new, 1))
    with pytest.raises(ProjectError, match=message):
        load_project(project)


def test_missing_project_file(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match=r"edgeops.toml: cannot read project file"):
        load_project(tmp_path)


def test_entry_point_errors(tmp_path: Path) -> None:
    project_dir = make_small_project(tmp_path / "p")
    project = load_project(project_dir)
    with pytest.raises(ProjectError, match=r"nope.py does not exist"):
        load_entry(project, "nope:f")
    with pytest.raises(ProjectError, match=r"has no function 'missing'"):
        load_entry(project, "vibration_data:missing")
    (project_dir / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ProjectError, match=r"importing broken.py failed: RuntimeError: boom"):
        load_entry(project, "broken:f")


def test_dataset_entry_must_return_a_mapping(tmp_path: Path) -> None:
    project_dir = make_small_project(tmp_path / "p")
    (project_dir / "listdata.py").write_text("def load(**_):\n    return [1, 2, 3]\n")
    toml = project_dir / "edgeops.toml"
    toml.write_text(toml.read_text().replace('"vibration_data:load_dataset"', '"listdata:load"'))
    text = toml.read_text()
    toml.write_text(text.replace("params = { n_train = 1500, n_val = 400, n_test = 800, seed = 7 }", "params = {}"))
    with pytest.raises(DataError, match="must return a mapping, got list"):
        load_dataset(load_project(project_dir))
