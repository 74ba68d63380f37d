"""Build benchmarks: cold-build time per step against raw library calls, and the step cache.

    .venv/bin/python bench/build.py [--target ecu] [--project DIR] [--repeat N]
    .venv/bin/python bench/build.py --cache [--target ecu] [--switch-to mobile]

``--cache`` measures, in one run and one fresh cache: a cold build, a rebuild with nothing
changed (warm / cold must be <= 0.05), and a switch to another target that reuses the
trained model (against that target's own cold build). Each is timed both in-process
(``run_build``) and end to end through the CLI in a fresh interpreter.

A cold build runs every step from nothing (fresh EDGEOPS_HOME, fresh output folder). Next
to each step it times the bare library work the step wraps, in the same process and on the
same data, and prints step / baseline, so the cost of edgeops' own checks and bookkeeping
is visible apart from the machine's speed:

* data      vs calling the project's dataset function alone
* train     vs a bare torch loop over the same model, data and epochs (the step also pays
            the lazy ``import torch``, printed separately)
* export    vs a bare ``torch.onnx.export`` to a file
* quantize  vs a bare ``quantize_static`` on the same exported model
* validate  (measures latency and spawns the RAM probe; no single raw equivalent)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(fn: object, *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start, out


def _baselines(project_dir: Path, profile_name: str, tmp: Path) -> dict[str, float]:
    start = time.perf_counter()
    import torch

    t_import = time.perf_counter() - start
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeops_core import apply_preprocessing
    from edgeops_toolchain.data import check_data, load_dataset
    from edgeops_toolchain.project import load_entry, load_project

    project = load_project(project_dir)
    data_fn = load_entry(project, project.data_entry)
    t_data, _ = _timed(lambda: data_fn(**project.data_params))
    ds = load_dataset(project)
    pre = check_data(ds, project.checks, project.preprocessing).preprocessing
    x = torch.from_numpy(apply_preprocessing(pre, ds.x_train))
    y = torch.from_numpy(ds.y_train)
    cfg = project.training
    torch.manual_seed(cfg.seed)
    model = load_entry(project, project.model_entry)(len(ds.feature_names), len(ds.label_names), **project.model_params)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def train() -> None:
        for _ in range(cfg.epochs):
            order = torch.randperm(x.shape[0])
            for s in range(0, x.shape[0], cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()

    t_train, _ = _timed(train)
    model.eval()
    onnx_path = tmp / "raw.onnx"

    def export() -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros(1, x.shape[1]),), str(onnx_path), dynamo=True, external_data=False, verbose=False
            )

    from edgeops_core import find_profile
    from edgeops_toolchain.resources import builtin_targets_dir

    calib = apply_preprocessing(pre, ds.x_train[: project.quantization.calibration_samples])
    if find_profile(profile_name, [builtin_targets_dir()]).format == "tflite":
        t_export, t_quant = _tflite_baselines(model, calib)
        return {"data": t_data, "train": t_train, "export": t_export, "quantize": t_quant, "import_torch": t_import}
    t_export, _ = _timed(export)
    input_name = _input_name(onnx_path)

    class Reader:
        def __init__(self) -> None:
            self.rows = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self.rows, None)
            return None if row is None else {input_name: row[None, :]}

    def quantize() -> None:
        quant_pre_process(str(onnx_path), str(tmp / "pre.onnx"))
        quantize_static(
            str(tmp / "pre.onnx"),
            str(tmp / "q.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )

    t_quant, _ = _timed(quantize)
    return {"data": t_data, "train": t_train, "export": t_export, "quantize": t_quant, "import_torch": t_import}


def _tflite_baselines(model: object, calib: object) -> tuple[float, float]:
    """Bare litert-torch: float conversion, and PT2E prepare/calibrate/convert + conversion."""
    import litert_torch
    import numpy as np
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    rows = np.asarray(calib, dtype=np.float32)
    args = (torch.from_numpy(rows[:1]),)

    def export() -> None:
        litert_torch.convert(model, args).export(os.devnull)

    def quantize() -> None:
        quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(model, args).module(), quantizer)
        for i in range(rows.shape[0]):
            prepared(torch.from_numpy(rows[i : i + 1]))
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        litert_torch.convert(converted, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(os.devnull)

    t_export, _ = _timed(export)
    t_quant, _ = _timed(quantize)
    return t_export, t_quant


def _input_name(path: Path) -> str:
    import onnx

    return str(onnx.load(str(path)).graph.input[0].name)


def _cold_build(project_dir: Path, target: str) -> dict[str, float]:
    from edgeops_core import find_profile
    from edgeops_toolchain.pipeline import run_build
    from edgeops_toolchain.project import load_project
    from edgeops_toolchain.resources import builtin_targets_dir

    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        os.environ["EDGEOPS_HOME"] = str(Path(tmp) / "home")
        start = time.perf_counter()
        profile = find_profile(target, [builtin_targets_dir()])
        result = run_build(load_project(project_dir), profile, Path(tmp) / "dist")
        timings = dict(result.timings)
        timings["total"] = time.perf_counter() - start
    m = result.manifest.metrics
    timings.update({f"metric:{k}": float(v) for k, v in m.items()})
    return timings


def _cache_bench(project_dir: Path, target: str, switch: str) -> None:
    from edgeops_core import find_profile
    from edgeops_toolchain.pipeline import CacheOptions, run_build
    from edgeops_toolchain.project import load_project
    from edgeops_toolchain.resources import builtin_targets_dir

    def build(home: Path, tgt: str) -> tuple[float, tuple[str, ...]]:
        os.environ["EDGEOPS_HOME"] = str(home)
        start = time.perf_counter()
        result = run_build(
            load_project(project_dir),
            find_profile(tgt, [builtin_targets_dir()]),
            home / "dist",
            cache=CacheOptions(root=home / "cache"),
        )
        return time.perf_counter() - start, result.cached

    def cli(home: Path, tgt: str) -> float:
        env = {**os.environ, "EDGEOPS_HOME": str(home)}
        start = time.perf_counter()
        args = ["build", "-t", tgt, "-p", str(project_dir), "-o", str(home / "dist"), "--json"]
        proc = subprocess.run(
            [sys.executable, "-m", "edgeops_toolchain", *args], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"CLI build failed: {proc.stderr[-2000:]}")
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="edgeops-bench-cache-") as tmp:
        home, other = Path(tmp) / "home", Path(tmp) / "other"
        t_cli_cold = cli(Path(tmp) / "cli", target)
        t_cli_warm = cli(Path(tmp) / "cli", target)
        t_cold, _ = build(home, target)
        t_warm, warm_cached = build(home, target)
        t_switch, switch_cached = build(home, switch)
        t_switch_cold, _ = build(other, switch)
    print(f"step cache, {project_dir.name}: one fresh cache, builds in this order")
    print(f"{'build':<44}{'seconds':>9}{'ratio':>9}")
    print(f"{'cold ' + target + ' (in-process, run_build)':<44}{t_cold:9.3f}{'':>9}")
    print(f"{'rebuild, nothing changed (in-process)':<44}{t_warm:9.3f}{t_warm / t_cold:9.4f}   warm / cold")
    print(f"{'cold ' + target + ' (CLI, fresh interpreter)':<44}{t_cli_cold:9.3f}{'':>9}")
    print(f"{'rebuild, nothing changed (CLI)':<44}{t_cli_warm:9.3f}{t_cli_warm / t_cli_cold:9.4f}   warm / cold")
    print(f"{'switch to ' + switch + ' (same cache)':<44}{t_switch:9.3f}{t_switch / t_switch_cold:9.4f}   vs its own cold build")
    print(f"{'cold ' + switch + ' (empty cache)':<44}{t_switch_cold:9.3f}")
    print(f"rebuild reused: {', '.join(warm_cached)}")
    print(f"switch reused:  {', '.join(switch_cached)}")
    verdict = "PASS" if t_warm / t_cold <= 0.05 and t_cli_warm / t_cli_cold <= 0.05 else "FAIL"
    print(f"warm / cold <= 0.05: {verdict}")


def _worker(kind: str, project_dir: Path, target: str) -> dict[str, float]:
    """Run one side in a fresh interpreter, so both pay the same cold imports."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--target", target, "--project", str(project_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="ecu")
    parser.add_argument("--project", type=Path, default=REPO / "examples" / "vibration")
    parser.add_argument("--repeat", type=int, default=1, help="cold builds (and raw runs) to take the median of")
    parser.add_argument("--worker", choices=["build", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="store_true", help="benchmark the step cache instead of a cold build")
    parser.add_argument("--switch-to", default="mobile", help="target switched to in --cache")
    args = parser.parse_args()
    if args.cache:
        _cache_bench(args.project, args.target, args.switch_to)
        return
    if args.worker == "build":
        print(json.dumps(_cold_build(args.project, args.target)))
        return
    if args.worker == "raw":
        with tempfile.TemporaryDirectory(prefix="edgeops-bench-raw-") as tmp:
            print(json.dumps(_baselines(args.project, args.target, Path(tmp))))
        return

    from edgeops_toolchain.pipeline import STEPS

    builds = [_worker("build", args.project, args.target) for _ in range(args.repeat)]
    raws = [_worker("raw", args.project, args.target) for _ in range(args.repeat)]
    print(f"cold build of {args.project.name} for {args.target}: median of {args.repeat} run(s), each in a fresh interpreter")
    print(f"{'step':<10}{'edgeops s':>11}{'raw s':>9}{'ratio':>8}")
    for step in [*(s.name for s in STEPS), "total"]:
        value = statistics.median(r[step] for r in builds)
        base = statistics.median(r[step] for r in raws) if step in raws[0] else None
        ratio = f"{value / base:8.2f}" if base else f"{'-':>8}"
        base_text = f"{base:9.3f}" if base else f"{'-':>9}"
        print(f"{step:<10}{value:11.3f}{base_text}{ratio}")
    torch_import = statistics.median(r["import_torch"] for r in raws)
    print(f"(the train step includes the lazy `import torch`, {torch_import:.2f} s here; the raw loop imports it untimed)")
    m = builds[-1]
    print(
        f"bundle: int8 {int(m['metric:model_bytes'])} B = {m['metric:size_ratio']:.3f} x fp32; "
        f"accuracy drop {m['metric:accuracy_drop_points']:.2f} pt; p50 {m['metric:latency_p50_ms'] * 1000:.1f} us"
    )


if __name__ == "__main__":
    main()
