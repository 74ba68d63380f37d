"""Agent benchmark: prediction latency, memory and start-up against the bare runtime, in one run.

    .venv/bin/python bench/agent.py [--bundle B --key PUB.pem]...

Without ``--bundle`` it builds the example for ``ecu`` and ``mobile`` (in a temporary
EDGEOPS_HOME) first. For each bundle, every side runs in its own fresh interpreter:

* **agent** — ``Agent.predict`` (input checks, preprocessing, int8 conversion, the
  runtime, latency and drift bookkeeping) on the installed bundle;
* **raw, same job** — bare Python with only numpy and the runtime, the model loaded from
  the same bytes, doing what any caller must: standardize, quantize (int8 models), the
  runtime's documented call (``session.run`` / ``set_tensor``-``invoke``-``get_tensor``),
  dequantize, argmax;
* **raw, runtime call only** — just the runtime call on a ready input tensor.

Latency: one fresh interpreter holds both the agent and a bare runtime session on the same
model bytes and times them in alternating blocks of 250 back-to-back calls (20 rounds),
then once more paced at one call per millisecond, as a sensor loop calls it; so a change in
the shared machine's speed hits every side alike (separate processes measured minutes
apart differed by 1.5x on this host). Memory and start-up: each side alone in its own fresh
interpreter (resident memory after the runs: agent vs bare Python + runtime + the same
model; start-up: process start to the first prediction).
Batch: ``Agent.predict_batch`` on 64 rows against the raw job done batch-wise (vectorized
conversions, the runtime called per row, as the models' batch dimension is fixed at 1).
Throughput: 4 000 predictions from 1 and 8 threads in-process (one interpreter under its
lock, and the alternative, a pool of two interpreters), and through the socket endpoint
(served by a separate process) from 1 and 8 client connections.
Targets: agent / raw-same-job p50 <= 1.05 back to back and paced, batch per row <= 1.2,
agent / raw RSS <= 1.30.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_RAW_SETUP = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
runtime, model_path, threads, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
model = open(model_path, "rb").read()
mean = np.asarray(spec["mean"], dtype=np.float32); std = np.asarray(spec["std"], dtype=np.float32)
rows = [np.asarray(r, dtype=np.float32).reshape(1, -1) for r in spec["rows"]]
qin, qout = spec["qin"], spec["qout"]
if runtime == "onnxruntime":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    def call(t):
        return sess.run(None, {name: t})[0]
elif runtime == "tflite-micro":
    from tflite_micro.python.tflite_micro.runtime import Interpreter as Micro
    tm = Micro.from_bytes(model, arena_size=spec["arena"])
    def call(t):
        tm.set_input(t, 0); tm.invoke(); return tm.get_output(0)
else:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=model, num_threads=threads); it.allocate_tensors()
    i_in, i_out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    def call(t):
        it.set_tensor(i_in, t); it.invoke(); return it.get_tensor(i_out)
def job(x):
    t = (x - mean) / std
    if qin:
        t = np.clip(np.rint(t / qin[0]) + qin[1], -128, 127).astype(np.int8)
    out = call(t)
    if qout:
        out = (out.astype(np.float32) - qout[1]) * qout[0]
    return int(out.argmax())
def convert(r):
    t = (r - mean) / std
    return t if not qin else np.clip(np.rint(t / qin[0]) + qin[1], -128, 127).astype(np.int8)
ready = [convert(r) for r in rows]
job(rows[0])
startup = time.perf_counter() - t0
"""

_RAW_ALONE = (
    _RAW_SETUP
    + r"""
for i in range(1000):
    job(rows[i % len(rows)])
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
print(json.dumps({"rss": rss, "startup_s": startup}))
"""
)

_AGENT_ALONE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from pathlib import Path
from edgeops_agent.agent import Agent
from edgeops_agent.store import DataDir
agent = Agent(DataDir(Path(sys.argv[1])))
rows = [np.asarray(v.input, dtype=np.float32) for v in agent.model.manifest.self_test.vectors]
agent.predict(rows[0])
startup = time.perf_counter() - t0
for i in range(1000):
    agent.predict(rows[i % len(rows)])
agent.flush_drift()
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024
print(json.dumps({"rss": rss, "startup_s": startup}))
"""

_INTERLEAVED = (
    _RAW_SETUP
    + r"""
from pathlib import Path
from edgeops_agent.agent import Agent
from edgeops_agent.store import DataDir
agent = Agent(DataDir(Path(sys.argv[5])))
arows = [r.reshape(-1) for r in rows]
n_rounds, block = 20, 250
BATCH = 64
batch = np.stack(arows * (BATCH // len(arows) + 1))[:BATCH]
def raw_batch(xs):
    t = (xs - mean) / std
    if qin:
        t = np.clip(np.rint(t / qin[0]) + qin[1], -128, 127).astype(np.int8)
    out = np.stack([call(r.reshape(1, -1)) for r in t]).reshape(len(xs), -1)
    if qout:
        out = (out.astype(np.float32) - qout[1]) * qout[0]
    return out.argmax(axis=1)
sides = {"agent": (agent.predict, arows), "job": (job, rows), "call": (call, ready),
         "agent_batch": (agent.predict_batch, [batch]), "raw_batch": (raw_batch, [batch])}
samples = {k: [] for k in sides}
for f, args in sides.values():
    for i in range(300):
        f(args[i % len(args)])
for _ in range(n_rounds):
    for key, (f, args) in sides.items():
        lat = samples[key]
        for i in range(block if "batch" not in key else 10):
            a = args[i % len(args)]
            s = time.perf_counter_ns(); f(a); lat.append(time.perf_counter_ns() - s)
paced = {k: [] for k in sides}
for _ in range(10):  # as a sensor loop calls it: one prediction per millisecond
    for key, (f, args) in sides.items():
        if "batch" in key:
            continue
        lat = paced[key]
        for i in range(50):
            time.sleep(0.001)
            a = args[i % len(args)]
            s = time.perf_counter_ns(); f(a); lat.append(time.perf_counter_ns() - s)
out = {k: float(np.percentile(v, 50)) / 1000 / (BATCH if "batch" in k else 1) for k, v in samples.items()}
out.update({"paced_" + k: float(np.percentile(v, 50)) / 1000 for k, v in paced.items() if v})
print(json.dumps(out))
"""
)


_CONCURRENCY = r"""
import json, queue, sys, threading, time
import numpy as np
from pathlib import Path
from edgeops_agent.agent import Agent
from edgeops_agent.runtime import open_runtime
from edgeops_agent.store import DataDir
from edgeops_core import read_members
agent = Agent(DataDir(Path(sys.argv[1])))
m = agent.model.manifest
rows = [np.asarray(v.input, dtype=np.float32) for v in m.self_test.vectors]
N = 4000
def rate(threads):
    per = N // threads
    def work():
        for i in range(per):
            agent.predict(rows[i % len(rows)])
    ts = [threading.Thread(target=work) for _ in range(threads)]
    s = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    return per * threads / (time.perf_counter() - s)
for _ in range(300): agent.predict(rows[0])
out = {"inproc_1": rate(1), "lock_8": rate(8)}
# The alternative: a pool of interpreters (2 = the cores), each caller borrowing one.
members = read_members(agent.data_dir.slot_path(agent.state.active).read_bytes())
arena = int(m.metrics["arena_bytes"]) + 256 if "arena_bytes" in m.metrics else None
pool = queue.SimpleQueue()
for _ in range(2):
    pool.put(open_runtime(m.runtime, members[m.model_file], int(m.metrics.get("threads", 1)), arena_size=arena))
def pooled(t):
    r = pool.get()
    try:
        return r.invoke(t)
    finally:
        pool.put(r)
agent.model.invoke = pooled
out["pool2_1"] = rate(1)
out["pool2_8"] = rate(8)
print(json.dumps(out))
"""

_SERVER = r"""
import sys
from pathlib import Path
from edgeops_agent.agent import Agent
from edgeops_agent.server import EndpointServer
from edgeops_agent.store import DataDir
server = EndpointServer(Path(sys.argv[2]), Agent(DataDir(Path(sys.argv[1]))))
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def _socket_rate(data_dir: Path, sock_path: Path, rows: list[list[float]]) -> dict[str, float]:
    """Predictions per second through the socket endpoint (server in its own process) from 1 and 8 clients."""
    import socket
    import threading
    import time

    from edgeops_agent.server import recv_frame, send_frame

    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(data_dir), str(sock_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise SystemExit("the endpoint server did not start")
        out = {}
        for clients in (1, 8):
            per = 4000 // clients

            def work(per: int = per) -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(sock_path))
                    for i in range(per):
                        send_frame(sock, {"op": "predict", "features": rows[i % len(rows)]})
                        recv_frame(sock)

            threads = [threading.Thread(target=work) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"socket_{clients}"] = per * clients / (time.perf_counter() - start)
        return out
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def _py(code: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _build(target: str, home: Path) -> tuple[Path, Path]:
    env = {**os.environ, "EDGEOPS_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "edgeops_toolchain", "build", "-t", target, "-o", str(home / "dist"), "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"building {target} failed: {proc.stderr}")
    return Path(json.loads(proc.stdout)["bundle"]), home / "keys" / "dev-signing.pub.pem"


def _bench(bundle: Path, key: Path, tmp: Path) -> dict[str, float | str]:
    from edgeops_agent.install import install_bundle
    from edgeops_agent.store import DataDir
    from edgeops_core import Manifest, read_members

    members = read_members(bundle.read_bytes())
    m = Manifest.from_json(members["manifest.json"])
    data = DataDir(tmp / f"device-{m.target}")
    data.add_trusted_key(key)
    install_bundle(data, bundle, target=m.target)
    model_path = tmp / f"model-{m.target}"
    model_path.write_bytes(members[m.model_file])
    pre = m.preprocessing
    q_in, q_out = m.inputs[0].quantization, m.outputs[0].quantization
    spec = {
        "mean": list(pre.mean) if pre.kind == "standardize" else [0.0] * len(m.feature_names),
        "std": list(pre.std) if pre.kind == "standardize" else [1.0] * len(m.feature_names),
        "rows": [list(v.input) for v in m.self_test.vectors],
        "qin": [q_in.scale, q_in.zero_point] if q_in and m.inputs[0].dtype == "int8" else None,
        "qout": [q_out.scale, q_out.zero_point] if q_out and m.outputs[0].dtype == "int8" else None,
        "arena": int(m.metrics.get("arena_bytes", 1 << 20)) + 256,
    }
    threads = str(int(m.metrics.get("threads", 1)))
    raw_args = (m.runtime, str(model_path), threads, json.dumps(spec))
    lat = _py(_INTERLEAVED, *raw_args, str(data.root))
    agent = _py(_AGENT_ALONE, str(data.root))
    raw = _py(_RAW_ALONE, *raw_args)
    conc = _py(_CONCURRENCY, str(data.root))
    sock = _socket_rate(data.root, tmp / f"agent-{m.target}.sock", spec["rows"])  # type: ignore[arg-type]
    return {
        **{f"rate_{k}": v for k, v in {**conc, **sock}.items()},
        "agent_batch_row_us": lat["agent_batch"],
        "raw_batch_row_us": lat["raw_batch"],
        "batch_ratio": lat["agent_batch"] / lat["raw_batch"],
        "paced_raw_call_p50_us": lat["paced_call"],
        "target": m.target,
        "runtime": m.runtime,
        "agent_p50_us": lat["agent"],
        "raw_job_p50_us": lat["job"],
        "raw_call_p50_us": lat["call"],
        "p50_ratio_job": lat["agent"] / lat["job"],
        "p50_ratio_call": lat["agent"] / lat["call"],
        "paced_agent_p50_us": lat["paced_agent"],
        "paced_raw_job_p50_us": lat["paced_job"],
        "paced_ratio_job": lat["paced_agent"] / lat["paced_job"],
        "agent_rss_mib": agent["rss"] / 2**20,
        "raw_rss_mib": raw["rss"] / 2**20,
        "rss_ratio": agent["rss"] / raw["rss"],
        "agent_startup_s": agent["startup_s"],
        "raw_startup_s": raw["startup_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="bundle to measure (repeatable)")
    parser.add_argument("--key", type=Path, action="append", default=[], help="public key for each --bundle")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        pairs = list(zip(args.bundle, args.key, strict=True))
        if not pairs:
            pairs = [_build(t, tmp / "home") for t in ("ecu", "mobile", "wearable")]
        results = [_bench(b, k, tmp) for b, k in pairs]
    print("agent vs bare runtime: p50 of 5000 single-row predictions per side, interleaved in one interpreter;")
    print("RSS after 1000 predictions and start-up (process start to first prediction), each side in a fresh interpreter")
    print(f"{'target':<9}{'runtime':<13}{'agent p50':>10}{'raw job':>9}{'ratio':>7}{'raw call':>10}{'ratio':>7}"
          f"{'agent RSS':>11}{'raw RSS':>9}{'ratio':>7}{'start agent':>13}{'start raw':>11}")  # fmt: skip
    for r in results:
        print(
            f"{r['target']:<9}{r['runtime']:<13}{r['agent_p50_us']:>8.1f}us{r['raw_job_p50_us']:>7.1f}us{r['p50_ratio_job']:>7.2f}"
            f"{r['raw_call_p50_us']:>8.1f}us{r['p50_ratio_call']:>7.2f}{r['agent_rss_mib']:>8.1f}MiB{r['raw_rss_mib']:>6.1f}MiB"
            f"{r['rss_ratio']:>7.2f}{r['agent_startup_s']:>12.3f}s{r['raw_startup_s']:>10.3f}s"
        )
    print("paced at one prediction per millisecond (a sensor loop; thread pools go idle between calls):")
    for r in results:
        print(
            f"{r['target']:<9}agent p50 {r['paced_agent_p50_us']:.1f}us, raw job p50 {r['paced_raw_job_p50_us']:.1f}us, "
            f"ratio {r['paced_ratio_job']:.2f}; raw call alone {r['paced_raw_call_p50_us']:.1f}us "
            f"({r['paced_raw_call_p50_us'] / r['raw_call_p50_us']:.1f}x its back-to-back p50)"
        )
    print("predict_batch (64 rows; the runtime is called per row: every exported model has batch 1), per row:")
    for r in results:
        print(
            f"{r['target']:<9}agent {r['agent_batch_row_us']:.1f}us/row, raw batched job {r['raw_batch_row_us']:.1f}us/row, "
            f"ratio {r['batch_ratio']:.2f}"
        )
    print("throughput, predictions/s (4000 calls): in-process 1 thread | 8 threads, one interpreter under a lock | "
          "8 threads, pool of 2 interpreters | socket 1 client | socket 8 clients (server in its own process)")  # fmt: skip
    for r in results:
        print(
            f"{r['target']:<9}{r['rate_inproc_1']:>9.0f} |{r['rate_lock_8']:>9.0f} |{r['rate_pool2_8']:>9.0f} |"
            f"{r['rate_socket_1']:>9.0f} |{r['rate_socket_8']:>9.0f}"
        )
    ok = all(
        float(r["p50_ratio_job"]) <= 1.05
        and float(r["paced_ratio_job"]) <= 1.05
        and float(r["batch_ratio"]) <= 1.2
        and float(r["rss_ratio"]) <= 1.30
        for r in results
    )
    print(f"targets (p50 and paced vs raw same job <= 1.05, batch per row <= 1.2, RSS <= 1.30): {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
