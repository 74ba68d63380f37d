"""OTA benchmark: bundle transfer throughput against raw paho QoS-1 publishing, in one run.

    .venv/bin/python bench/ota.py [--bundle B --key PUB.pem] [--devices 1 10] [--repeat 3]
                                  [--nagle] [--device-nodelay] [--window N]

Without ``--bundle`` it builds the example for ``ecu`` (in a temporary EDGEOPS_HOME) and
pads its model to about 1 MiB (an ONNX doc string), signed again with that home's
development key. One Mosquitto (tests/broker.py, ``set_tcp_nodelay true`` unless
``--nagle``) serves both sides, alternately, each device or subscriber in its own fresh
interpreter (as devices are):

* **ota** — the console's :class:`~edgeops_fleet.Deployer` (deploy command, block server,
  events) in this process, and N devices running the agent's own transfer code:
  ``Staging`` (preallocated part file, journal, two ``fdatasync`` per batch of blocks) and
  ``TransferEngine`` (the agent's default window, or ``--window``) over the agent's ``PahoTransport``
  (tests/ota_device.py). Timed from ``Deployer.start`` to the last device's verified file
  (its whole-file sha256 checked): what an operator waits for, minus the install. Also
  reported: "blocks only", from the first block request to that moment.
* **raw** — one paho client publishing the same bytes as the same frames (the deploy's
  block size, the 20-byte header included) at QoS 1, one copy per device topic, to N
  subscriber processes; timed from the first publish to the last byte received.

Throughput = bundle bytes x N / seconds; the ratio is ota / raw (median of ``--repeat``
alternated runs of each). Goal: >= 0.5. ``--device-nodelay`` forces TCP_NODELAY on the
device side's sockets; the agent's ``PahoTransport`` sets it itself now, so it changes nothing
for the current agent (kept to compare with older ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test broker and the device of the OTA tests

from broker import Broker  # noqa: E402


def _bundle(home: Path, size: int) -> tuple[Path, Path]:
    """Build the example, pad its model to reach ``size`` bytes, sign again with the dev key."""
    import onnx

    from edgeops_core import Manifest, pack_bundle, read_members
    from edgeops_toolchain.signing import sign_members

    env = {**os.environ, "EDGEOPS_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "edgeops_toolchain", "build", "-t", "ecu", "-o", str(home / "dist"), "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"building ecu failed: {proc.stderr}")
    built = Path(json.loads(proc.stdout)["bundle"])
    members = read_members(built.read_bytes())
    proto = onnx.load_from_string(members["model.onnx"])
    proto.doc_string = random.Random(1).randbytes(max(0, size - len(built.read_bytes())) // 2).hex()
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), release=2)
    body = {"manifest.json": manifest.to_json(), "model.onnx": proto.SerializeToString()}
    path = home / "ota-bench.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, home / "keys" / "dev-signing.pem", subject="bench")}))
    return path, home / "keys" / "dev-signing.pub.pem"


_WORKER = r"""
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, name, port, arg, nodelay = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
if nodelay:  # --device-nodelay: force TCP_NODELAY (the current agent sets it itself)
    import socket
    import paho.mqtt.client as mqtt
    _create = mqtt.Client._create_socket
    def _nodelay(self):
        sock = _create(self)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    mqtt.Client._create_socket = _nodelay
if mode == "ota":
    from ota_device import OtaDevice
    from edgeops_agent.config import OtaConfig
    from edgeops_agent.ota import TransferPolicy
    window = int(sys.argv[7]) if len(sys.argv) > 7 else OtaConfig().window  # the agent's default unless --window
    policy = TransferPolicy(window=window, retry_initial_s=1.0, retry_max_s=2.0, deadline_s=60)
    d = OtaDevice(name, port, Path(arg), policy=policy)
    d.start()
    assert d.connected.wait(10)
    print("ready", flush=True)
    assert d.finished.wait(60)
    print(json.dumps({"outcomes": [o.type for o in d.outcomes], **d.times}), flush=True)
    time.sleep(0.5)  # let the final event reach the console
    d.stop()
else:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    total, got, done, ready = int(arg), [0], threading.Event(), threading.Event()
    def on_message(c, u, m):
        got[0] += len(m.payload)
        if got[0] >= total:
            done.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port)
    c.subscribe("raw/" + name, qos=1)
    c.loop_start()
    assert ready.wait(10)
    print("ready", flush=True)
    assert done.wait(60)
    print(json.dumps({"done": time.perf_counter()}), flush=True)
    c.disconnect()
    c.loop_stop()
"""


DEVICE_NODELAY = ["0"]
DEVICE_WINDOW: list[str] = []  # --window: the devices' window instead of the agent's default


def _workers(mode: str, names: list[str], port: int, args: list[str]) -> list[subprocess.Popen[str]]:
    """One fresh interpreter per device (or raw subscriber), as devices are; each prints ``ready``."""
    cmd = [sys.executable, "-c", _WORKER, str(REPO / "tests"), mode]
    procs = [
        subprocess.Popen([*cmd, n, str(port), a, DEVICE_NODELAY[0], *DEVICE_WINDOW], stdout=subprocess.PIPE, text=True)
        for n, a in zip(names, args, strict=True)
    ]
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a {mode} worker did not start")
    time.sleep(0.2)  # every subscription in place
    return procs


def _results(procs: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    out = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        p.wait(timeout=30)
        if not line:
            raise SystemExit("a worker failed")
        out.append(json.loads(line))
    return out


def _ota(bundle: Path, key: Path, port: int, n: int, tmp: Path, run: int) -> tuple[float, float, int]:
    """Seconds from ``Deployer.start`` to the last verified file, and from the first block request to it."""
    from edgeops_core import load_public_key, verify_bundle_file
    from edgeops_fleet import Deployer, parse_broker_url

    verified = verify_bundle_file(bundle, [load_public_key(key)])
    names = [f"bench-{run}-{i}" for i in range(n)]
    procs = _workers("ota", names, port, [str(tmp / f"ota-{run}-{i}") for i in range(n)])
    deployer = Deployer(verified, names, parse_broker_url(f"mqtt://127.0.0.1:{port}"))
    started = time.perf_counter()
    deployer.start()
    try:
        results = _results(procs)
        deployer.wait(10)  # the console saw every final event
    finally:
        deployer.close()
    if any(r["outcomes"] != ["ota_committed"] for r in results):
        raise SystemExit(f"a transfer failed: {results}")
    last = max(float(r["verified"]) for r in results)  # type: ignore[arg-type]
    first = min(float(r["first_request"]) for r in results)  # type: ignore[arg-type]
    return last - started, last - first, deployer.deploy.block_size


def _raw(bundle: Path, block_size: int, port: int, n: int, run: int) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    data = bundle.read_bytes()
    header = 20  # the block frame's header: the same bytes on the wire
    frames = [b"\0" * header + data[i : i + block_size] for i in range(0, len(data), block_size)]
    total = sum(len(f) for f in frames)
    names = [f"raw-{run}-{i}" for i in range(n)]
    procs = _workers("raw", names, port, [str(total)] * n)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{run}", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(64)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.2)
    started = time.perf_counter()
    for frame in frames:
        for name in names:
            pub.publish(f"raw/{name}", frame, qos=1)
    results = _results(procs)
    pub.disconnect()
    pub.loop_stop()
    return max(float(r["done"]) for r in results) - started  # type: ignore[arg-type]


def main() -> None:
    """Run the benchmark and print one JSON object (and a table)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--size", type=int, default=1024 * 1024, help="bytes to pad the built bundle to")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nagle", action="store_true", help="leave Mosquitto's set_tcp_nodelay at its default (false)")
    parser.add_argument("--window", type=int, help="the devices' request window (default: the agent's [ota] window default)")
    parser.add_argument("--device-nodelay", action="store_true", help="devices (and raw subscribers) set TCP_NODELAY")
    args = parser.parse_args()
    DEVICE_NODELAY[0] = "1" if args.device_nodelay else "0"
    if args.window is not None:
        DEVICE_WINDOW[:] = [str(args.window)]
    with tempfile.TemporaryDirectory(prefix="edgeops-ota-bench-") as name:
        tmp = Path(name)
        if args.bundle:
            bundle, key = args.bundle, args.key
        else:
            bundle, key = _bundle(tmp / "home", args.size)
        broker = Broker(tmp / "broker", persistence=False)
        if not args.nagle:  # what an OTA broker should run with (docs/benchmarks.md); both sides get it
            broker.conf.write_text(broker.conf.read_text() + "set_tcp_nodelay true\n")
        broker.start()
        results = []
        try:
            size = bundle.stat().st_size
            run = 0
            for n in args.devices:
                ota_s, xfer_s, raw_s = [], [], []
                for _ in range(args.repeat):
                    run += 1
                    seconds, transfer, block = _ota(bundle, key, broker.port, n, tmp, run)
                    ota_s.append(seconds)
                    xfer_s.append(transfer)
                    raw_s.append(_raw(bundle, block, broker.port, n, run))
                ota, xfer, raw = statistics.median(ota_s), statistics.median(xfer_s), statistics.median(raw_s)
                results.append({
                    "devices": n, "bundle_bytes": size, "block_bytes": block,
                    "ota_s": round(ota, 4), "raw_s": round(raw, 4),
                    "ota_mib_s": round(size * n / ota / 2**20, 2), "raw_mib_s": round(size * n / raw / 2**20, 2),
                    "ratio": round(raw / ota, 3), "transfer_s": round(xfer, 4),
                    "transfer_ratio": round(raw / xfer, 3), "ota_runs_s": [round(s, 4) for s in ota_s],
                    "raw_runs_s": [round(s, 4) for s in raw_s],
                })  # fmt: skip
        finally:
            broker.stop()
    for r in results:
        print(
            f"{r['devices']:>3} device(s), {r['bundle_bytes']} B in {r['block_bytes']} B blocks: "
            f"ota {r['ota_s']:.3f} s ({r['ota_mib_s']} MiB/s), raw paho QoS 1 {r['raw_s']:.3f} s "
            f"({r['raw_mib_s']} MiB/s), ratio {r['ratio']:.2f} (goal >= 0.5); blocks only (first request to "
            f"verified file) {r['transfer_s']:.3f} s, ratio {r['transfer_ratio']:.2f}",
            file=sys.stderr,
        )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
