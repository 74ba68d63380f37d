"""``agent.toml``: the daemon's configuration, validated into frozen dataclasses.

::

    device_id = "ecu-0042"            # one MQTT topic level: letters, digits, . _ -
    target = "ecu"                    # the device's target profile name
    data_dir = "data"                 # relative paths are relative to this file's folder

    [mqtt]
    host = "127.0.0.1"
    port = 1883
    prefix = "edgeops/v1"
    keepalive_s = 10
    reconnect_min_s = 0.5             # backoff doubles from here...
    reconnect_max_s = 30.0            # ...up to here
    # username = "ecu-0042"  password = "..."
    tls = { ca = "tls/ca.crt", cert = "tls/client.crt", key = "tls/client.key" }
                                      # optional: mutual TLS (TLS 1.2+, the broker's name checked
                                      # against host; no plaintext once set). Also warn_days = 14
                                      # (cert_expiring events) and renew_days = 30 (ask the
                                      # console for a new certificate; 0: only on renew_cert)
    session_expiry_s = 604800         # the broker keeps commands for an absent device this long
                                      # (7 days; below the 30-day window of command ids)

    [telemetry]
    interval_s = 10.0                 # 0.5 .. 86400 (a day)
    anomaly_event_s = 10.0            # anomaly models: at most one `anomaly` event this often
                                      # (it carries the count since the previous one; 0.5 .. 86400)

    [outbox]
    max_messages = 10000              # the cap; past it the oldest are dropped and counted

    [drift]
    window = 500  cusum_k = 0.25  cusum_h = 40.0  reservoir = 256  prediction_psi_alarm = 0.25
    input_ring = 1024                 # raw inputs of the latest predictions, so a late label keeps
                                      # its row (0..16384; 0: labels keep no rows)
    labelled_rows = 256               # the newest labelled rows kept for sample_upload (0..2048)

    [endpoint]
    socket = "agent.sock"             # the local inference socket: a name in data_dir, or an
                                      # absolute path; either way it ends in ".sock"

    [ota]                             # over-the-air updates (docs/agent.md, ADR 0012)
    health_inferences = 20            # live inferences a trial must answer without error...
    trial_timeout_s = 600.0           # ...within this, or it is rolled back
    latency_budget_ms = 1.0           # their p99 must stay within this (default: see OtaConfig)
    max_boots = 3                     # start-ups during a trial before it is rolled back (crash loop)
    window = 8                        # blocks requested and not yet arrived, at most
    retry_initial_s = 1.0             # wait before asking again for a block (doubles, up to 30 s)
    deadline_s = 3600.0               # a transfer must finish within this...
    min_bytes_per_s = 256.0           # ...and not fall below this over a minute

    [tags]                            # optional: reported in the retained state; the fleet
    site = "plant-a"                  # console groups devices by target and tags. At most 32;
    line = "3"                        # keys and values [A-Za-z0-9_.-]{1,64}, strings only

    [metrics]                         # optional: Prometheus /metrics and /healthz over HTTP
    listen = "127.0.0.1:9108"         # HOST:PORT or [IPv6]:PORT (this is the default);
                                      # needs the extra edgeops[metrics] (prometheus_client)

``data_dir`` must exist (a typo must not start an agent on a new, empty device), and the
socket path is one the agent may replace at start-up, so it can never name the state, a
slot or a file outside the data directory. Without a ``[metrics]`` table the agent never
imports ``prometheus_client``. Unknown keys are errors; every error names the file, the field, what was expected and
what was found (:class:`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgeops_agent.agent import ANOMALY_EVENT_S, MAX_INTERVAL_S
from edgeops_agent.drift import MAX_INPUT_RING, DriftConfig
from edgeops_agent.errors import ConfigError
from edgeops_agent.identity import TlsSettings
from edgeops_agent.mqtt import MqttSettings
from edgeops_core import COMMAND_WINDOW_S, FieldReader, InputError, MessageError, check_device_id, load_toml
from edgeops_core.messages import MAX_SAMPLE_ROWS, MAX_TAGS, check_tags

__all__ = ["DEFAULT_METRICS_LISTEN", "AgentConfig", "MetricsConfig", "OtaConfig", "load_config"]

_TOP = {"device_id", "target", "data_dir", "mqtt", "telemetry", "outbox", "drift", "endpoint", "metrics", "ota", "tags"}
_OTA = {
    "health_inferences", "trial_timeout_s", "latency_budget_ms", "max_boots",
    "window", "retry_initial_s", "deadline_s", "min_bytes_per_s",
}  # fmt: skip
#: Telemetry more often than this is a flood, not monitoring.
MIN_TELEMETRY_INTERVAL_S = 0.5
_SOCKET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.sock")
#: ``[metrics] listen`` when the table is there without it.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"
_LISTEN = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port6>[0-9]{1,5})|(?P<host>[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_MQTT = {
    "host", "port", "prefix", "keepalive_s", "username", "password",
    "reconnect_min_s", "reconnect_max_s", "inflight", "session_expiry_s", "tls",
}  # fmt: skip


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where the Prometheus ``/metrics`` and ``/healthz`` listener binds.

    Raises:
        ConfigError: ``host`` is empty or ``port`` is not 1-65535.
    """

    host: str = "127.0.0.1"
    port: int = 9108

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"metrics host must be an IP address or a host name, got {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"metrics port must be 1-65535, got {self.port}")

    @property
    def listen(self) -> str:
        """``HOST:PORT`` (``[HOST]:PORT`` for IPv6), as written in agent.toml."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class OtaConfig:
    """``[ota]``: how the agent fetches, trials and commits an over-the-air update.

    Attributes:
        health_inferences: K, the live inferences a trial must answer (after the self-test
            vectors) with no error and a p99 latency within the budget; 0 commits right
            after the self-test vectors.
        trial_timeout_s: a trial that has not seen K live inferences by then is rolled back.
        latency_budget_ms: the p99 budget; ``None``: the manifest's ``metrics.latency_budget_ms``
            if the bundle has one, else 10 x its host-measured ``metrics.latency_p99_ms``,
            at least 1 ms (see docs/agent.md).
        max_boots: start-ups during one trial before the agent rolls it back by itself.
        window, retry_initial_s, deadline_s, min_bytes_per_s: the transfer engine's policy
            (:class:`~edgeops_agent.ota.TransferPolicy`).

    Raises:
        ConfigError: a value is out of range.
    """

    health_inferences: int = 20
    trial_timeout_s: float = 600.0
    latency_budget_ms: float | None = None
    max_boots: int = 3
    window: int = 8
    retry_initial_s: float = 1.0
    deadline_s: float = 3600.0
    min_bytes_per_s: float = 256.0

    def __post_init__(self) -> None:
        if not 0 <= self.health_inferences <= 4096:
            raise ConfigError(f"ota.health_inferences must be 0..4096, got {self.health_inferences}")
        if not 1 <= self.window <= 64:
            raise ConfigError(f"ota.window must be 1..64, got {self.window}")
        if self.max_boots < 1:
            raise ConfigError(f"ota.max_boots must be >= 1, got {self.max_boots}")
        for name in ("trial_timeout_s", "retry_initial_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ota.{name} must be > 0, got {getattr(self, name)}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ConfigError(f"ota.latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        if self.min_bytes_per_s < 0:
            raise ConfigError(f"ota.min_bytes_per_s must be >= 0, got {self.min_bytes_per_s}")


@dataclass(frozen=True)
class AgentConfig:
    """A validated agent configuration."""

    device_id: str
    target: str
    data_dir: Path
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    telemetry_interval_s: float = 10.0
    #: Seconds between two ``anomaly`` events at most (an anomaly model's).
    anomaly_event_s: float = ANOMALY_EVENT_S
    outbox_max_messages: int = 10_000
    drift: DriftConfig = field(default_factory=DriftConfig)
    socket: Path | None = None
    #: ``None`` without a ``[metrics]`` table: no listener, no prometheus_client.
    metrics: MetricsConfig | None = None
    ota: OtaConfig = field(default_factory=OtaConfig)
    #: ``[tags]``: reported in the retained state (``State.tags``).
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def load_config(path: Path) -> AgentConfig:
    """Load and validate ``agent.toml``.

    Raises:
        ConfigError: missing or malformed file, unknown key, invalid value.
    """
    data = load_toml(path, ConfigError, "agent config")
    r = FieldReader(ConfigError, str(path))
    r.only(data, _TOP, "")
    base = path.resolve().parent
    try:
        device_id = check_device_id(r.string(data, "device_id"))
    except InputError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    target = r.string(data, "target")
    data_dir = (base / r.string(data, "data_dir")).resolve()
    m = r.mapping(data.get("mqtt", {}), "mqtt")
    r.only(m, _MQTT, "mqtt")
    defaults = MqttSettings()
    port = r.integer(m, "port", "mqtt", minimum=1) if "port" in m else defaults.port
    if port > 65535:
        raise r.fail("mqtt.port", "a port number <= 65535", port)
    prefix = r.string(m, "prefix", "mqtt") if "prefix" in m else defaults.prefix
    if any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
        raise r.fail("mqtt.prefix", "topic levels without '+', '#' or a leading/trailing '/'", prefix)
    mqtt = MqttSettings(
        host=r.string(m, "host", "mqtt") if "host" in m else defaults.host,
        port=port,
        prefix=prefix,
        keepalive_s=r.integer(m, "keepalive_s", "mqtt", minimum=1) if "keepalive_s" in m else defaults.keepalive_s,
        username=r.string(m, "username", "mqtt") if "username" in m else None,
        password=r.string(m, "password", "mqtt", nonempty=False) if "password" in m else None,
        reconnect_min_s=r.number(m, "reconnect_min_s", "mqtt", minimum=0, exclusive_minimum=True)
        if "reconnect_min_s" in m
        else defaults.reconnect_min_s,
        reconnect_max_s=r.number(m, "reconnect_max_s", "mqtt", minimum=0, exclusive_minimum=True)
        if "reconnect_max_s" in m
        else defaults.reconnect_max_s,
        inflight=r.integer(m, "inflight", "mqtt", minimum=1) if "inflight" in m else defaults.inflight,
        session_expiry_s=_session_expiry(r, m, defaults.session_expiry_s),
        tls=_tls(r, m, base),
    )
    t = r.mapping(data.get("telemetry", {}), "telemetry")
    r.only(t, {"interval_s", "anomaly_event_s"}, "telemetry")
    o = r.mapping(data.get("outbox", {}), "outbox")
    r.only(o, {"max_messages"}, "outbox")
    d = r.mapping(data.get("drift", {}), "drift")
    r.only(d, {"window", "cusum_k", "cusum_h", "reservoir", "prediction_psi_alarm", "input_ring", "labelled_rows"}, "drift")
    dd = DriftConfig()
    drift = DriftConfig(
        window=r.integer(d, "window", "drift", minimum=10) if "window" in d else dd.window,
        cusum_k=r.number(d, "cusum_k", "drift", minimum=0, exclusive_minimum=True) if "cusum_k" in d else dd.cusum_k,
        cusum_h=r.number(d, "cusum_h", "drift", minimum=0, exclusive_minimum=True) if "cusum_h" in d else dd.cusum_h,
        reservoir=r.integer(d, "reservoir", "drift", minimum=0) if "reservoir" in d else dd.reservoir,
        prediction_psi_alarm=r.number(d, "prediction_psi_alarm", "drift", minimum=0, exclusive_minimum=True)
        if "prediction_psi_alarm" in d
        else dd.prediction_psi_alarm,
        input_ring=_bounded(r, d, "input_ring", MAX_INPUT_RING) if "input_ring" in d else dd.input_ring,
        labelled_rows=_bounded(r, d, "labelled_rows", MAX_SAMPLE_ROWS) if "labelled_rows" in d else dd.labelled_rows,
    )
    e = r.mapping(data.get("endpoint", {}), "endpoint")
    r.only(e, {"socket"}, "endpoint")
    socket = _socket_path(r, r.string(e, "socket", "endpoint") if "socket" in e else "agent.sock", data_dir)
    if not data_dir.exists():
        raise ConfigError(f"{path}: data_dir {data_dir} does not exist; create it (edgeops-agent trust add ... --data-dir) first")
    if not data_dir.is_dir():
        raise ConfigError(f"{path}: data_dir {data_dir} is not a directory")
    return AgentConfig(
        device_id=device_id,
        target=target,
        data_dir=data_dir,
        mqtt=mqtt,
        telemetry_interval_s=r.number(t, "interval_s", "telemetry", minimum=MIN_TELEMETRY_INTERVAL_S, maximum=MAX_INTERVAL_S)
        if "interval_s" in t
        else 10.0,
        anomaly_event_s=r.number(t, "anomaly_event_s", "telemetry", minimum=MIN_TELEMETRY_INTERVAL_S, maximum=MAX_INTERVAL_S)
        if "anomaly_event_s" in t
        else ANOMALY_EVENT_S,
        outbox_max_messages=r.integer(o, "max_messages", "outbox", minimum=1) if "max_messages" in o else 10_000,
        drift=drift,
        socket=socket,
        metrics=_metrics(r, data),
        ota=_ota(r, data),
        tags=_tags(r, data),
    )


def _tls(r: FieldReader, m: Mapping[str, Any], base: Path) -> TlsSettings | None:
    """``mqtt.tls``: three files that must exist, and the expiry thresholds."""
    if "tls" not in m:
        return None
    t = r.mapping(m["tls"], "mqtt.tls")
    r.only(t, {"ca", "cert", "key", "warn_days", "renew_days"}, "mqtt.tls")
    paths: list[Path] = []
    for name in ("ca", "cert", "key"):
        path = (base / r.string(t, name, "mqtt.tls")).resolve()
        if not path.is_file():
            raise r.fail(f"mqtt.tls.{name}", "an existing file", str(path))
        paths.append(path)
    ca, cert, key = paths
    defaults = TlsSettings(ca, cert, key)
    warn = r.integer(t, "warn_days", "mqtt.tls", minimum=0) if "warn_days" in t else defaults.warn_days
    renew = r.integer(t, "renew_days", "mqtt.tls", minimum=0) if "renew_days" in t else defaults.renew_days
    if max(warn, renew) > 3650:
        raise r.fail("mqtt.tls.warn_days" if warn > 3650 else "mqtt.tls.renew_days", "at most 3650 days", max(warn, renew))
    return TlsSettings(ca, cert, key, warn_days=warn, renew_days=renew)


def _bounded(r: FieldReader, d: Mapping[str, Any], key: str, maximum: int) -> int:
    """``[drift] key``: an integer 0..``maximum``."""
    value = r.integer(d, key, "drift", minimum=0)
    if value > maximum:
        raise r.fail(f"drift.{key}", f"an integer 0..{maximum}", value)
    return value


def _tags(r: FieldReader, data: Mapping[str, Any]) -> Mapping[str, str]:
    """``[tags]``: at most :data:`MAX_TAGS` string values; keys and values ``[A-Za-z0-9_.-]{1,64}``."""
    t = r.mapping(data.get("tags", {}), "tags")
    if len(t) > MAX_TAGS:
        raise ConfigError(f"{r.source}: [tags] must have at most {MAX_TAGS} tags, got {len(t)}")
    for key, value in t.items():
        try:
            check_tags({key: value}, "tags")
        except MessageError as exc:
            raise ConfigError(f"{r.source}: {exc}") from exc  # names the key: "tags.site must be ..."
    return MappingProxyType(dict(t))


def _ota(r: FieldReader, data: Mapping[str, Any]) -> OtaConfig:
    """``[ota]``: every key optional (:class:`OtaConfig`'s defaults)."""
    t = r.mapping(data.get("ota", {}), "ota")
    r.only(t, _OTA, "ota")
    d = OtaConfig()
    ints = {k: r.integer(t, k, "ota", minimum=0) for k in ("health_inferences", "max_boots", "window") if k in t}
    nums = {
        k: r.number(t, k, "ota", minimum=0)
        for k in ("trial_timeout_s", "latency_budget_ms", "retry_initial_s", "deadline_s", "min_bytes_per_s")
        if k in t
    }
    try:
        return OtaConfig(**{**vars(d), **ints, **nums})
    except ConfigError as exc:
        raise ConfigError(f"{r.source}: {exc}") from exc


def _metrics(r: FieldReader, data: Mapping[str, Any]) -> MetricsConfig | None:
    """``[metrics]``: ``None`` without the table; ``listen`` defaults to :data:`DEFAULT_METRICS_LISTEN`."""
    if "metrics" not in data:
        return None
    mt = r.mapping(data["metrics"], "metrics")
    r.only(mt, {"listen"}, "metrics")
    text = r.string(mt, "listen", "metrics") if "listen" in mt else DEFAULT_METRICS_LISTEN
    expected = 'HOST:PORT or [IPv6]:PORT with a port 1-65535, e.g. "127.0.0.1:9108" or "[::1]:9108"'
    match = _LISTEN.fullmatch(text)
    if match is None:
        raise r.fail("metrics.listen", expected, text)
    host, port = (match["v6"], match["port6"]) if match["v6"] else (match["host"], match["port"])
    if match["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise r.fail("metrics.listen", expected, text) from None
    elif _HOSTNAME.fullmatch(host) is None:
        raise r.fail("metrics.listen", expected, text)
    if not 1 <= int(port) <= 65535:
        raise r.fail("metrics.listen", expected, text)
    return MetricsConfig(host=host, port=int(port))


def _socket_path(r: FieldReader, text: str, data_dir: Path) -> Path:
    """The endpoint socket: ``NAME.sock`` inside ``data_dir``, or an absolute ``/…/NAME.sock``.

    Start-up replaces a stale socket there, so the rule keeps that from ever naming the
    state file, a slot, the outbox or a file outside the data directory by accident.
    """
    candidate = Path(text)
    ok = _SOCKET_NAME.fullmatch(candidate.name) is not None and ".." not in candidate.parts
    if not candidate.is_absolute():
        ok = ok and len(candidate.parts) == 1
    if not ok:
        raise r.fail(
            "endpoint.socket", "a file name ending in '.sock' (inside data_dir) or an absolute path ending in '.sock'", text
        )
    return candidate if candidate.is_absolute() else data_dir / candidate


def _session_expiry(r: FieldReader, m: Mapping[str, Any], default: int) -> int:
    """``mqtt.session_expiry_s``: under the command-id window, so a command the broker kept is still known as seen."""
    if "session_expiry_s" not in m:
        return default
    value = r.integer(m, "session_expiry_s", "mqtt", minimum=0)
    if value >= COMMAND_WINDOW_S:
        raise r.fail("mqtt.session_expiry_s", f"an integer < {COMMAND_WINDOW_S} (the command-id window of 30 days)", value)
    return value
