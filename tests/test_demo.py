"""``edgeops demo``'s parts that do not need a fleet: options, the timeline arithmetic, the report.

The demo itself (about 4 minutes: a broker, a console, 20 simulated devices, a retrain) is
run by hand and recorded in docs/benchmarks.md; its pieces are tested in
tests/test_autopilot.py, tests/test_field_samples.py and tests/test_sim.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_edgeops
from edgeops_core import InputError
from edgeops_toolchain.demo import DRIFT_WINDOW, DemoOptions, _judged_clean, _Timeline, summary_lines
from edgeops_toolchain.demo_report import write_report

T0 = 1_800_000_000.0


def _write(folder: Path, device: str, cohort: str, rows: list[tuple[float, int, int, int, bool]]) -> None:
    path = folder / "devices" / device / "timeline.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t, predictions, correct, release, alarm in rows:
            f.write(json.dumps({"t": t, "at": T0 + t, "device": device, "cohort": cohort, "release": release,
                                "predictions": predictions, "correct": correct, "drift_alarm": alarm,
                                "drift_samples": 300, "max_psi": 1.5 if alarm else 0.05}) + "\n")  # fmt: skip
        f.write('{"t": 99, "partial line')  # a line still being written is not read


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--devices"):
        DemoOptions(out=tmp_path / "a", devices=2)
    with pytest.raises(InputError, match="--deadline"):
        DemoOptions(out=tmp_path / "a", deadline_s=10)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="new or empty"):
        DemoOptions(out=tmp_path / "full")
    done = run_edgeops("demo", "--devices", "1", "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and done.stderr.startswith("error: --devices") and len(done.stderr.splitlines()) == 1


def test_timeline_accuracy_counts_only_the_interval(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "sim-0000",
        "line-b",
        [(0, 0, 0, 1, False), (10, 100, 97, 1, False), (20, 200, 187, 1, True), (30, 300, 282, 2, False)],
    )
    _write(tmp_path, "sim-0001", "line-a", [(0, 0, 0, 1, False), (30, 300, 291, 1, False)])
    tl = _Timeline(tmp_path)
    tl.read()
    tl.read()  # reading again adds nothing
    assert len(tl.rows["sim-0000"]) == 4 and tl.cohort("line-b") == ["sim-0000"]
    assert tl.accuracy(["sim-0000"], T0 + 10, T0 + 20) == (0.9, 100)
    assert tl.accuracy(["sim-0000"], T0 + 20, T0 + 30) == (0.95, 100)
    assert tl.accuracy(["sim-0000", "sim-0001"], T0, T0 + 30)[1] == 600
    assert not _judged_clean({"release": 2, "drift_samples": DRIFT_WINDOW - 1, "drift_alarm": False}, 2)
    assert not _judged_clean({"release": 2, "drift_samples": DRIFT_WINDOW, "drift_alarm": True}, 2)
    assert not _judged_clean({"release": 1, "drift_samples": DRIFT_WINDOW, "drift_alarm": False}, 2)
    assert _judged_clean({"release": 2, "drift_samples": DRIFT_WINDOW, "drift_alarm": False}, 2)


def test_report_and_summary(tmp_path: Path) -> None:
    _write(tmp_path, "sim-0000", "line-b", [(0, 0, 0, 1, False), (10, 100, 97, 1, True), (20, 200, 190, 2, False)])
    tl = _Timeline(tmp_path)
    tl.read()
    summary = {
        "ok": True, "devices": 2, "shift": {"cohort": "line-b", "quantity": "shaft_rpm", "to": 2700.0, "at_s": 5.0},
        "recovered": True, "recovery_s": 12.5, "within_2_points": True, "final_alarms": 0, "wall_s": 100.0,
        "accuracy": {"before_shift": 0.97, "after_shift": 0.88, "after_recovery": 0.96, "steady_cohort": 0.97},
        "run": {"run_id": "run-1", "trigger": "drift", "state": "deployed", "release": 2, "datasets": ["sha256:" + "a" * 64],
                "metrics": {"champion_accuracy": 0.87, "challenger_accuracy": 0.95, "holdout_rows": 600},
                "steps": [{"at": T0 + 8, "state": "queued", "note": "drift <alarm>"}]},
        "waves": [{"index": 0, "started_at": T0 + 15, "devices": 1, "passed": True}],
        "marks_epoch": {"shift": T0 + 5, "first_alarm": T0 + 7, "recovered": T0 + 17.5}, "t0": T0, "report": None,
    }  # fmt: skip
    page = write_report(tmp_path / "demo-report.html", summary, tl).read_text()
    assert page.count("<svg") == 3 and "first alarm" in page and "wave 1 (1)" in page and "release 2" in page
    assert "drift &lt;alarm&gt;" in page and "<alarm>" not in page  # notes are escaped
    lines = summary_lines(summary)
    assert "before the shift 97.0%, after it 88.0%, after recovery 96.0%" in lines[1]
    assert lines[-1].startswith("ok:") and "recovered 12.5 s after the shift" in "\n".join(lines)
