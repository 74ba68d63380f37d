"""``edgeops-agent run``: the agent as a long-running process.

Wires the pieces: the :class:`Agent` (model, drift), the outbox, the MQTT link, the local
socket endpoint and a telemetry timer. Everything the device says goes through the outbox:
the retained ``state`` (on every (re)connect and after every change), ``telemetry`` every
``interval_s``, ``events`` as they happen, ``samples`` on request.

SIGTERM/SIGINT stop it cleanly: a final ``online: false`` state is queued and given a moment
to leave, then the client disconnects. A kill -9 leaves the broker to publish the Last Will.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from edgeops_agent.agent import Agent
from edgeops_agent.config import AgentConfig
from edgeops_agent.errors import ConfigError
from edgeops_agent.mqtt import MqttLink
from edgeops_agent.outbox import Outbox, Pending
from edgeops_agent.server import EndpointServer
from edgeops_agent.store import DataDir
from edgeops_core import MESSAGE_SCHEMA, CommandError, device_topic, parse_command, utc_now_text

__all__ = ["Daemon"]

log = logging.getLogger(__name__)


class Daemon:
    """One running agent process."""

    def __init__(self, config: AgentConfig) -> None:
        """Open the data directory, the outbox and the active model.

        Raises:
            StateCorruptedError, BundleError, AgentError: the agent cannot start.
        """
        self.config = config
        self.data = DataDir(config.data_dir)
        state = self.data.load_state()
        if state.target is None:
            state.target = config.target
            self.data.save_state(state)
        elif state.target != config.target:
            raise ConfigError(
                f"agent config says target {config.target!r}, but {config.data_dir} belongs to a {state.target!r} device"
            )
        self.outbox = Outbox(self.data.outbox_path, cap=config.outbox_max_messages)
        self.agent = Agent(self.data, device_id=config.device_id, drift=config.drift, on_event=self._event)
        prefix, dev = config.mqtt.prefix, config.device_id
        self.topics = {leaf: device_topic(prefix, dev, leaf) for leaf in ("state", "telemetry", "events", "samples")}
        # The Last Will is composed now and published by the broker later: no time, no seq.
        offline = {**self.agent.state_message(online=False), "ts": None, "seq": None}
        self.link = MqttLink(
            config.mqtt,
            dev,
            self.outbox,
            offline_state=offline,
            on_command=self._command,
            on_quarantine=self._quarantined,
            on_connected=self.publish_state,
        )
        self.server = EndpointServer(config.socket or self.data.socket_path, self.agent)
        self._stop = threading.Event()

    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        message = {
            "schema": MESSAGE_SCHEMA,
            "device_id": self.config.device_id,
            "ts": utc_now_text(),
            "type": kind,
            "detail": detail,
        }
        self.outbox.put(self.topics["events"], message)
        if kind in ("install_activated", "drift_alarm", "drift_cleared"):
            self.publish_state()

    def _quarantined(self, message: Pending, code: int, reason: str) -> None:
        # A refused report of a refusal would be refused again: count it, do not re-report.
        if message.topic == self.topics["events"] and b'"type":"outbox_quarantined"' in message.payload:
            return
        detail = {"seq": message.seq, "topic": message.topic, "reason_code": code, "reason": reason}
        self._event("outbox_quarantined", detail)

    def publish_state(self, *, online: bool = True) -> None:
        """Queue the retained state message."""
        self.outbox.put(self.topics["state"], self.agent.state_message(online=online), retain=True)

    def _command(self, payload: bytes) -> None:
        try:
            cmd = parse_command(payload)
        except CommandError as exc:
            self._event("command_rejected", {"error": type(exc).__name__, "message": str(exc)})
            return
        if not self.outbox.first_time(cmd.id):
            log.info("duplicate command %s ignored", cmd.id)
            return
        if cmd.type == "ping":
            self._event("command_done", {"id": cmd.id, "type": cmd.type})
        elif cmd.type == "status":
            self.publish_state()
            self._event("command_done", {"id": cmd.id, "type": cmd.type})
        elif cmd.type == "sample_upload":
            rows = self.agent.samples()
            limit = cmd.args.get("max_rows", len(rows))
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                self._event(
                    "command_rejected", {"id": cmd.id, "error": "CommandError", "message": "'max_rows' must be an integer >= 0"}
                )
                return
            model = self.agent.model
            message = {
                "schema": MESSAGE_SCHEMA,
                "device_id": self.config.device_id,
                "ts": utc_now_text(),
                "command_id": cmd.id,
                "model": {"name": model.manifest.name, "release": model.manifest.release} if model else None,
                "feature_names": list(model.manifest.feature_names) if model else [],
                "rows": rows[:limit],
            }
            self.outbox.put(self.topics["samples"], message)
            self._event("command_done", {"id": cmd.id, "type": cmd.type, "rows": min(limit, len(rows))})

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
            signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.server.start()
        self.link.start()
        interval = self.config.telemetry_interval_s
        try:
            while not self._stop.wait(interval):
                self.agent.flush_drift()
                self.outbox.put(self.topics["telemetry"], {**self.agent.telemetry(interval), "outbox": _stats(self.outbox)})
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def shutdown(self) -> None:
        """Say goodbye (state offline), stop serving, disconnect."""
        self.server.stop()
        self.publish_state(online=False)
        if self.link.connected.is_set():
            for _ in range(40):  # up to 2 s for the outbox to drain
                if self.outbox.stats().pending == 0:
                    break
                time.sleep(0.05)
        self.link.stop()
        self.outbox.close()


def _stats(outbox: Outbox) -> dict[str, int]:
    s = outbox.stats()
    return {"pending": s.pending, "dropped": s.dropped, "quarantined": s.quarantined}
