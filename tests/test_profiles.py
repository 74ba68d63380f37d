"""Target profiles: the built-ins, user folders, and every way a profile can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_edgeops
from edgeops_core import ProfileError, TargetProfile, UnknownTargetError, find_profile, list_profiles, load_profile

BUILTIN = REPO / "targets"


def test_builtin_profiles_load_with_their_runtimes() -> None:
    profiles = {p.name: p for p in list_profiles([BUILTIN])}
    assert set(profiles) == {"ecu", "wearable", "mobile"}
    assert (profiles["ecu"].runtime, profiles["ecu"].format, profiles["ecu"].model_file) == ("onnxruntime", "onnx", "model.onnx")
    assert profiles["wearable"].runtime == "tflite-micro"
    assert profiles["mobile"].runtime == "litert"
    for p in profiles.values():
        assert isinstance(p, TargetProfile)
        assert p.precision == "int8"
        assert p.budgets.model_bytes > 0 and p.budgets.ram_bytes > 0
        assert "QuantizeLinear" in p.supported_ops or "QUANTIZE" in p.supported_ops
    # The MCU is the most constrained: smallest RAM budget.
    assert profiles["wearable"].budgets.ram_bytes < profiles["ecu"].budgets.ram_bytes < profiles["mobile"].budgets.ram_bytes


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(UnknownTargetError, match=r"unknown target 'ecuu'; valid targets: ecu, mobile, wearable"):
        find_profile("ecuu", [BUILTIN])


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _ecu_text() -> str:
    return (BUILTIN / "ecu.toml").read_text()


def test_user_folder_adds_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path, "tiny-ecu", _ecu_text().replace("model_bytes = 262_144", "model_bytes = 1000"))
    _write(tmp_path, "ecu", _ecu_text().replace("threads = 1", "threads = 2"))
    profiles = {p.name: p for p in list_profiles([BUILTIN, tmp_path])}
    assert profiles["tiny-ecu"].budgets.model_bytes == 1000
    assert profiles["ecu"].threads == 2
    assert profiles["ecu"].source == tmp_path / "ecu.toml"


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken", 'runtime = "onnxruntime"\nprecision = "int8\n')
    with pytest.raises(ProfileError, match=r"broken\.toml: malformed TOML: .*line 2"):
        load_profile(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("model_bytes = 262_144", "model_bytes = -5", r"'budgets.model_bytes' must be an integer >= 1, got int -5"),
        ("latency_ms = 1.0", "latency_ms = 0", r"'budgets.latency_ms' must be a number > 0"),
        ("min_accuracy = 0.90", "min_accuracy = 90", r"'budgets.min_accuracy' must be a number <= 1"),
        ("threads = 1", 'threads = "one"', r"'threads' must be an integer, got str 'one'"),
        ('precision = "int8"', 'precision = "int4"', r"'precision' must be one of int8, fp16, fp32"),
        ('runtime = "onnxruntime"', 'runtime = "tensorrt"', r"'runtime' must be one of onnxruntime, litert, tflite-micro"),
        ('format = "onnx"', 'format = "tflite"', r"runtime 'onnxruntime' runs format 'onnx'"),
        ("latency_ms = 1.0", "latency_ms = 1.0\nlatncy_ms = 2.0", r"unknown field\(s\) latncy_ms in 'budgets'"),
        ("max_accuracy_drop_points = 1.0", "", r"missing field 'max_accuracy_drop_points' in 'budgets'"),
    ],
)
def test_invalid_profile_fields_are_named(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = _ecu_text()
    assert old in text
    path = _write(tmp_path, "ecu", text.replace(old, new))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_missing_targets_dir_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        list_profiles([tmp_path / "nope"])


def test_cli_targets_lists_user_profiles(tmp_path: Path) -> None:
    _write(tmp_path, "tiny-ecu", _ecu_text().replace("model_bytes = 262_144", "model_bytes = 1000"))
    proc = run_edgeops("targets", "--targets-dir", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == {"ecu", "mobile", "wearable", "tiny-ecu"}
    assert rows["tiny-ecu"]["budgets"]["model_bytes"] == 1000
    table = run_edgeops("targets")
    assert table.returncode == 0
    assert "wearable" in table.stdout and "tflite-micro" in table.stdout


def test_cli_targets_broken_profile_is_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "bad", "runtime = [")
    proc = run_edgeops("targets", "--targets-dir", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "bad.toml: malformed TOML" in proc.stderr
    assert "Traceback" not in proc.stderr
