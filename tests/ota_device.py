"""A device for the console's OTA tests and benchmark: the agent's real transfer code over paho.

It connects as the agent does (its device id as client id, a persistent session, QoS 1
subscriptions to ``cmd`` and ``ota_block``, a retained ``state`` with a Last Will), takes a
``deploy`` command, refuses another target before fetching (``ota_failed wrong_target``),
pulls the bundle with the agent's own :class:`~edgeops_agent.ota.Staging` and
:class:`~edgeops_agent.ota.TransferEngine`, and reports exactly one final event per deploy
id: ``ota_committed`` once the whole file hashes to the announced sha256 (it does not
install: the daemon's install, trial and commit are tested with the real agent).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from edgeops_agent.ota import OtaError, Staging, TransferEngine, TransferPolicy
from edgeops_agent.transport import PahoTransport
from edgeops_core import (
    DEFAULT_PREFIX,
    BlockRequest,
    BundleInfo,
    Deploy,
    Event,
    OtaOutcome,
    OtaProgress,
    State,
    device_topic,
    utc_now_text,
)
from edgeops_core.messages import deploy_args


class OtaDevice:
    """One simulated device (see the module docstring)."""

    def __init__(
        self,
        device_id: str,
        port: int,
        data: Path,
        *,
        target: str = "ecu",
        release: int = 1,
        policy: TransferPolicy | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.id, self.target, self.release, self.data = device_id, target, release, data
        self.policy = policy or TransferPolicy(window=8, retry_initial_s=1.0, retry_max_s=2.0, deadline_s=60)
        self.transport = PahoTransport(host, port, device_id, reconnect_min_s=0.2, reconnect_max_s=0.5, inflight=64)
        self.transport.on_connect = self._connected
        self.transport.on_message = self._message
        self.topic = {leaf: device_topic(DEFAULT_PREFIX, device_id, leaf) for leaf in ("cmd", "ota_block", "ota_request")}
        self.connected = threading.Event()
        self.finished = threading.Event()
        self.staging: Staging | None = None
        self.engine: TransferEngine | None = None
        self.outcomes: list[OtaOutcome] = []
        self.seen_deploys: set[str] = set()
        #: ``time.perf_counter()`` when the deploy command arrived, the first block was asked
        #: for, and the whole file was verified (for the benchmark).
        self.times: dict[str, float] = {}
        self._ota: OtaProgress | None = None
        self._sha = "0" * 64
        self.transport.set_will(*self._state_args(online=False), qos=1, retain=True)

    def _state_args(self, *, online: bool) -> tuple[str, bytes]:
        bundle = BundleInfo(
            name="vibration-classifier", version="1.0.0", release=self.release, sha256=self._sha, slot="a",
            expires="2030-01-01T00:00:00Z", expired=False,
        )  # fmt: skip
        state = State(
            device_id=self.id, ts=utc_now_text(), online=online, agent_version="sim", target=self.target,
            runtime="onnxruntime", bundle=bundle, health="ok", last_error=None, ota=self._ota,
        )  # fmt: skip
        return device_topic(DEFAULT_PREFIX, self.id, "state"), state.to_json()

    def start(self) -> None:
        self.transport.connect(clean_start=False, session_expiry_s=3600)

    def stop(self) -> None:
        self.transport.disconnect()

    def _publish_state(self) -> None:
        topic, payload = self._state_args(online=True)
        self.transport.publish(topic, payload, qos=1, retain=True, seq=0)

    def _event(self, event: Event) -> None:
        self.transport.publish(device_topic(DEFAULT_PREFIX, self.id, "events"), event.to_json(), qos=1, retain=False, seq=0)

    def _connected(self, present: bool) -> None:
        self.transport.subscribe(self.topic["cmd"], qos=1)
        self.transport.subscribe(self.topic["ota_block"], qos=1)
        self._publish_state()
        self.connected.set()

    def _message(self, topic: str, payload: bytes) -> None:
        if topic == self.topic["ota_block"]:
            engine = self.engine
            if engine is not None:
                engine.offer(payload)  # written by the engine's thread, in batches, as the agent does
        elif topic == self.topic["cmd"]:
            doc = json.loads(payload)
            if doc.get("type") == "deploy" and doc["id"] not in self.seen_deploys:
                self.times["command"] = time.perf_counter()
                self.seen_deploys.add(doc["id"])
                deploy, _ = deploy_args(doc["args"])  # a fake device ignores retry_bad and hold_s
                threading.Thread(target=self._run, args=(deploy,), daemon=True).start()

    def _finish(self, outcome: OtaOutcome) -> None:
        self.outcomes.append(outcome)
        self._event(outcome.to_event(self.id, utc_now_text()))
        self.finished.set()

    def _run(self, deploy: Deploy) -> None:
        if deploy.target != self.target:
            self._finish(
                OtaOutcome(type="ota_failed", deploy_id=deploy.deploy_id, release=deploy.release, reason="wrong_target",
                           message=f"the bundle is for {deploy.target}, this device is {self.target}")
            )  # fmt: skip
            return
        self.staging = Staging(self.data / "ota", deploy)

        def request(indexes: tuple[int, ...]) -> None:
            self.times.setdefault("first_request", time.perf_counter())
            req = BlockRequest(device_id=self.id, ts=utc_now_text(), deploy_id=deploy.deploy_id, blocks=indexes)
            self.transport.publish(self.topic["ota_request"], req.to_json(), qos=1, retain=False, seq=0)

        self.engine = TransferEngine(self.staging, request, policy=self.policy)
        self._ota = self.staging.progress("fetching")
        self._publish_state()
        try:
            self.engine.run()
        except OtaError as exc:
            self._finish(
                OtaOutcome(type="ota_failed", deploy_id=deploy.deploy_id, release=deploy.release, reason=exc.reason,
                           message=str(exc))
            )  # fmt: skip
            return
        self.times["verified"] = time.perf_counter()
        self.release, self._sha = deploy.release, deploy.sha256
        self._ota = OtaProgress(deploy.deploy_id, deploy.release, "committed", deploy.block_count, deploy.block_count)
        self._publish_state()
        self._finish(OtaOutcome(type="ota_committed", deploy_id=deploy.deploy_id, release=deploy.release))
