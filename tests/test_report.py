"""The build report: self-contained HTML that a headless Chromium displays."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import Built
from edgeops_core import load_public_key, verify_bundle


def _report(built: Built) -> Path:
    path = Path(str(built.result["report"]))
    assert path.parent == built.bundle.parent and path.name == built.bundle.name.replace(".edgeops", ".report.html")
    return path


def test_report_is_self_contained_and_complete(built: Built) -> None:
    html = _report(built).read_text(encoding="utf-8")
    manifest = verify_bundle(built.bundle, [load_public_key(built.public_key)]).manifest
    # No network: every src is an embedded image, no scripts, no external links or styles.
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html
    for section in ("Budgets", "Accuracy on the held-out split", "Latency", "Input features"):
        assert f"<h2>{section}</h2>" in html
    for check in built.result["budgets"]:  # type: ignore[attr-defined]
        assert check["name"] in html and check["measured_text"] in html
    for label in manifest.labels:  # per-class accuracy rows
        assert f"<tr><td>{label}</td>" in html
    for feature in manifest.feature_names:  # the feature table lists every input
        assert f"<td>{feature}</td>" in html
    assert f"{manifest.metrics['accuracy_float'] * 100:.2f} %" in html


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: scripts/setup.sh --dev installs it (apt package chromium)")


def _screenshot(page: Path, out: Path, tmp: Path) -> np.ndarray:
    import matplotlib.image

    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2400", f"--screenshot={out}", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return np.asarray(matplotlib.image.imread(out))


def test_report_renders_in_headless_chromium(built: Built, tmp_path: Path) -> None:
    """The page displays with its plots: the screenshot is far from blank, and the plots make the difference."""
    page = tmp_path / "report.html"
    shutil.copy(_report(built), page)
    shot = _screenshot(page, tmp_path / "report.png", tmp_path)
    # The same page with its images' data removed: what the text and tables alone draw.
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r'src="data:[^"]*"', 'src=""', page.read_text(encoding="utf-8")), encoding="utf-8")
    bare = _screenshot(stripped, tmp_path / "bare.png", tmp_path)
    colours = {tuple(px) for px in (shot[..., :3] * 255).astype(np.uint8).reshape(-1, 3)[::7]}

    def blue(img: np.ndarray) -> int:  # the plots' ink (Blues colour map, blue bars and lines)
        return int(((img[..., 2] - img[..., 0]) > 0.15).sum())

    assert len(colours) > 200  # plots: many shades, not just black text on white
    assert blue(shot) > 20 * max(blue(bare), 100)  # the embedded images decoded and were drawn
