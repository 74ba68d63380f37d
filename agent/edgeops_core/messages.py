"""The MQTT wire contract: one frozen, self-validating type per message.

Every payload on the wire is built by one of these types (``to_dict``/``to_json``) and read
back by the same type (``from_json``), so the agent, the fleet console and the simulator
cannot drift apart. ``docs/asyncapi.json`` documents the same payloads as JSON Schema; a
test checks that every payload these types produce validates against it and that the
schema's required fields are exactly the types' fields.

Device → console messages share a header: ``schema`` (1), ``device_id``, ``ts`` (UTC text)
and ``seq`` (the outbox sequence number, filled in by the outbox when the message is
queued; ``None`` until then, and in the Last Will, which the broker publishes).

Invariant: constructing a message validates it; a message that exists is valid. Parsing
untrusted bytes raises :class:`MessageError` (an :class:`~edgeops_core.errors.InputError`)
and never anything else -- not ``RecursionError`` for deep nesting, not ``KeyError``.

Commands (console → device) carry an ``id`` and, optionally, ``issued_at``: the agent acts
on an id once. It remembers every id it has seen for :data:`COMMAND_WINDOW_S` seconds
(longer than any broker session can redeliver) and refuses a command whose ``issued_at``
is older than that window, so a command that carries ``issued_at`` is acted on at most
once, ever; one without it is acted on at most once within the window.

Over-the-air transfer (ADR 0012): :class:`Deploy` (a ``deploy`` command's args, with the
sha256 of every block), :class:`BlockRequest` (JSON, device → console, ``ota_request``),
:class:`BlockFrame` (binary, console → device, ``ota_block``), :class:`OtaProgress` (the
retained state's ``ota`` and ``ota_progress`` events) and :class:`OtaOutcome` (the one
final event of each deploy). A frame is refused with a :class:`BlockError` whose
``reason`` says why.

Held trials (issue 9): a ``deploy`` may carry ``hold_s``; a device whose health check passed
then stays in phase ``held`` (floor not raised, old slot kept) until a ``commit`` or
``rollback`` command (:func:`commit_command`, :func:`rollback_command`) for that deploy id
arrives, or commits on its own when ``hold_s`` has passed (``ota_committed`` with reason
``hold_expired``), so a console that vanished never strands a device.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar, Self

from edgeops_core._json import load_untrusted_json
from edgeops_core.bundle import MAX_BUNDLE_BYTES
from edgeops_core.digest import sha256_new
from edgeops_core.errors import InputError, TrustError
from edgeops_core.topics import MESSAGE_SCHEMA, check_device_id, utc_now_text
from edgeops_core.trust import trust_update_args

__all__ = [
    "BLOCK_HEADER_BYTES",
    "BLOCK_MAGIC",
    "BLOCK_REFUSALS",
    "COMMAND_TYPES",
    "COMMAND_WINDOW_S",
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_SAMPLE_ROWS",
    "DEPLOY_COMMAND",
    "DEPLOY_OPTIONS",
    "EVENT_TYPES",
    "HEALTH_STATES",
    "MAX_BLOCKS",
    "MAX_BLOCK_BYTES",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_DEPTH",
    "MAX_HOLD_S",
    "MAX_PEM_CHARS",
    "MAX_PREDICTED_LABELS",
    "MAX_REQUEST_BLOCKS",
    "MAX_REQUEST_BYTES",
    "MAX_SAMPLE_FEATURES",
    "MAX_SAMPLE_ROWS",
    "MAX_TAGS",
    "MIN_BLOCK_BYTES",
    "OTA_FINAL_EVENTS",
    "OTA_PHASES",
    "OTA_REASONS",
    "BlockError",
    "BlockFrame",
    "BlockRequest",
    "BundleInfo",
    "CertificateRequest",
    "Command",
    "CommandError",
    "Deploy",
    "Event",
    "MessageError",
    "ModelRef",
    "OtaOutcome",
    "OtaProgress",
    "Samples",
    "State",
    "Telemetry",
    "check_tags",
    "choose_block_size",
    "commit_command",
    "deploy_args",
    "deploy_command",
    "deploy_hold_s",
    "install_cert_command",
    "parse_command",
    "renew_cert_command",
    "rollback_command",
    "trust_update_command",
]

#: Commands the agent understands (``deploy``: an over-the-air update, ADR 0012; ``commit`` and
#: ``rollback``: end a held deploy, args ``{"deploy_id"}``).
#: ``trust_update``: a root-signed list of release keys (and root rotations), docs/security.md;
#: ``renew_cert``: make a new key and CSR; ``install_cert``: the console's answer to a CSR.
COMMAND_TYPES = ("ping", "status", "sample_upload", "deploy", "commit", "rollback", "trust_update", "renew_cert", "install_cert")
#: Most tags in a state (``[tags]`` in agent.toml).
MAX_TAGS = 32
#: Most labels whose prediction counts a telemetry record carries (``inference.predicted``).
MAX_PREDICTED_LABELS = 4096
#: Most rows in one ``samples`` message (and the most a ``sample_upload`` may ask for). A full
#: upload of the example's 106 features is about 2.3 MB of JSON: far within what Mosquitto
#: passes (no limit by default; MQTT's own is 256 MB) and parsed in well under a second.
MAX_SAMPLE_ROWS = 2048
#: Rows a ``sample_upload`` asks for when its ``max_rows`` is absent or 0.
DEFAULT_SAMPLE_ROWS = 512
#: Most feature names a ``samples`` upload may carry (a flattened input of 128 x 128).
MAX_SAMPLE_FEATURES = 16384
#: Largest command payload the agent reads (bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Deepest JSON nesting accepted in a command (``args`` values are flat today).
MAX_COMMAND_DEPTH = 8
#: How long the agent remembers a command id (seconds): 30 days. It must exceed how long the
#: broker keeps the device's session (``mqtt.session_expiry_s``, 7 days by default), so no
#: redelivery can outlive the agent's memory of the id.
COMMAND_WINDOW_S = 30 * 24 * 3600
#: Every event ``type`` an agent publishes.
EVENT_TYPES = (
    "install_started",
    "install_activated",
    "install_rejected",
    "drift_alarm",
    "drift_cleared",
    "command_done",
    "command_failed",
    "command_rejected",
    "commands_overloaded",
    "outbox_quarantined",
    "ota_progress",
    "ota_blocks_refused",
    "ota_committed",
    "ota_rolled_back",
    "ota_failed",
    "trust_updated",
    "trust_update_refused",
    "cert_expiring",
    "cert_renewal_requested",
    "cert_renewed",
    "cert_renewal_failed",
    "anomaly",
)
#: The ``health`` values of the retained state (``degraded``: the outbox cannot write, e.g. a
#: full disk; the model keeps serving).
HEALTH_STATES = ("ok", "drift", "expired", "no_model", "degraded")
_RUNTIMES = ("onnxruntime", "litert", "tflite-micro")
_COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MessageError(InputError):
    """A message is malformed or violates the wire contract (says which field, expected, got)."""


class CommandError(MessageError):
    """A command payload is malformed (not JSON, missing id, unknown type, too deep...)."""


# -- field checks -------------------------------------------------------------------------


def _fail(cls: type[MessageError], where: str, expected: str, got: object) -> MessageError:
    text = repr(got)
    return cls(f"{where} must be {expected}, got {text[:80] + '...' if len(text) > 80 else text}")


def _int(where: str, value: object, *, minimum: int = 0, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(MessageError, where, f"an integer >= {minimum}" + (" or null" if nullable else ""), value)


def _num(where: str, value: object, *, nullable: bool = False, positive: bool = False) -> None:
    if value is None and nullable:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        raise _fail(MessageError, where, "a finite number " + ("> 0" if positive else ">= 0"), value)


def _str(where: str, value: object, *, nullable: bool = False) -> None:
    if not (isinstance(value, str) or (nullable and value is None)):
        raise _fail(MessageError, where, "a string" + (" or null" if nullable else ""), value)


def _obj(where: str, value: object, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """``value`` as a mapping with exactly ``keys``."""
    if not isinstance(value, Mapping):
        raise _fail(MessageError, where, "an object", value)
    missing, extra = sorted(set(keys) - set(value)), sorted(set(value) - set(keys))
    if missing or extra:
        raise MessageError(f"{where} must have exactly the fields {', '.join(keys)}; missing {missing}, unknown {extra}")
    return value


def _frozen(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


def _plain(value: Any) -> Any:
    """Mapping proxies and tuples back to JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _load(data: bytes | str, what: str, error: type[MessageError] = MessageError) -> Mapping[str, Any]:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        doc = load_untrusted_json(raw)
    except ValueError as exc:  # UnicodeDecodeError, bad JSON, too deep, huge integer
        raise error(f"{what} payload is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise error(f"{what} payload must be a JSON object, got {type(doc).__name__}")
    return doc


def check_tags(tags: object, where: str = "state.tags") -> dict[str, str]:
    """Validate device tags: at most :data:`MAX_TAGS`, keys and values ``[A-Za-z0-9_.-]{1,64}``.

    Returns:
        The tags as a plain dict.

    Raises:
        MessageError: not a mapping of strings, a key or value outside the pattern, too many.
    """
    if not isinstance(tags, Mapping):
        raise _fail(MessageError, where, "an object of strings", tags)
    if len(tags) > MAX_TAGS:
        raise MessageError(f"{where} must have at most {MAX_TAGS} tags, got {len(tags)}")
    for key, value in tags.items():
        if not (isinstance(key, str) and _TAG.fullmatch(key)):
            raise _fail(MessageError, f"{where} key", "1-64 characters [A-Za-z0-9_.-]", key)
        if not (isinstance(value, str) and _TAG.fullmatch(value)):
            raise _fail(MessageError, f"{where}.{key}", "a string of 1-64 characters [A-Za-z0-9_.-]", value)
    return dict(tags)


# -- the header shared by device → console messages ------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Header:
    """``device_id``, ``ts`` and ``seq``; ``schema`` is always :data:`MESSAGE_SCHEMA`."""

    device_id: str
    ts: str | None
    seq: int | None = None

    _KIND: ClassVar[str] = "message"
    _BODY: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        try:
            check_device_id(self.device_id)
        except InputError as exc:
            raise MessageError(f"{self._KIND}.device_id: {exc}") from exc
        if self.ts is not None and not (isinstance(self.ts, str) and _TS.fullmatch(self.ts)):
            raise _fail(MessageError, f"{self._KIND}.ts", "UTC text YYYY-MM-DDTHH:MM:SS.ffffffZ or null", self.ts)
        _int(f"{self._KIND}.seq", self.seq, minimum=1, nullable=True)
        self._check()

    def _check(self) -> None:
        """Validate the body fields (each subclass)."""

    def _body(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self._BODY}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as it goes on the wire."""
        return {"schema": MESSAGE_SCHEMA, "device_id": self.device_id, "ts": self.ts, "seq": self.seq, **self._body()}

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Body field values from a parsed payload (subclasses convert nested types)."""
        return {name: raw[name] for name in cls._BODY}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Validate a parsed payload (``seq`` optional: a message not yet queued has none).

        Raises:
            MessageError: a field is missing, unknown or invalid.
        """
        if not isinstance(raw, Mapping):
            raise _fail(MessageError, cls._KIND, "an object", raw)
        keys = ("schema", "device_id", "ts", *cls._BODY)
        missing = [k for k in keys if k not in raw]
        extra = sorted(set(raw) - {*keys, "seq"})
        if missing or extra:
            raise MessageError(f"{cls._KIND} message: missing fields {missing}, unknown fields {extra}")
        if raw["schema"] != MESSAGE_SCHEMA:
            raise _fail(MessageError, f"{cls._KIND}.schema", str(MESSAGE_SCHEMA), raw["schema"])
        if not isinstance(raw["device_id"], str):
            raise _fail(MessageError, f"{cls._KIND}.device_id", "a string", raw["device_id"])
        return cls(device_id=raw["device_id"], ts=raw["ts"], seq=raw.get("seq"), **cls._fields(raw))

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse and validate a payload from the wire.

        Raises:
            MessageError: not UTF-8 JSON, nested too deep, or :meth:`from_dict` refuses it.
        """
        return cls.from_dict(_load(data, cls._KIND))


@dataclass(frozen=True)
class ModelRef:
    """The model a message is about: bundle name and release."""

    name: str
    release: int

    def __post_init__(self) -> None:
        _str("model.name", self.name)
        _int("model.release", self.release, minimum=1)

    @classmethod
    def parse(cls, raw: object) -> ModelRef | None:
        """From a payload's ``model`` (``None`` stays ``None``)."""
        if raw is None:
            return None
        m = _obj("model", raw, ("name", "release"))
        return cls(name=m["name"], release=m["release"])


@dataclass(frozen=True)
class BundleInfo:
    """The active bundle, as the retained state reports it."""

    name: str
    version: str
    release: int
    sha256: str
    slot: str
    expires: str
    expired: bool

    def __post_init__(self) -> None:
        for name in ("name", "version", "expires"):
            _str(f"bundle.{name}", getattr(self, name))
        _int("bundle.release", self.release, minimum=1)
        if not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise _fail(MessageError, "bundle.sha256", "64 lowercase hex digits", self.sha256)
        if self.slot not in ("a", "b"):
            raise _fail(MessageError, "bundle.slot", "'a' or 'b'", self.slot)
        if not isinstance(self.expired, bool):
            raise _fail(MessageError, "bundle.expired", "a boolean", self.expired)

    @classmethod
    def parse(cls, raw: object) -> BundleInfo | None:
        """From a payload's ``bundle`` (``None`` stays ``None``)."""
        if raw is None:
            return None
        b = _obj("bundle", raw, ("name", "version", "release", "sha256", "slot", "expires", "expired"))
        return cls(**b)


def _ref_dict(ref: ModelRef | BundleInfo | None) -> dict[str, Any] | None:
    return None if ref is None else {k: getattr(ref, k) for k in ref.__dataclass_fields__}


OTA_PHASES = ("fetching", "verifying", "installing", "trial", "held", "committed", "rolled_back", "failed")
"""The ``phase`` of an over-the-air update (``state.ota.phase``, ``ota_progress`` events).

``held``: the new model passed the device's health check and serves, not yet committed
(floor not raised, old slot kept): it waits for the console's ``commit`` or ``rollback``,
at most the deploy's ``hold_s``.
"""


@dataclass(frozen=True)
class OtaProgress:
    """The update in progress, as the retained state's ``ota`` reports it (ADR 0012).

    Attributes:
        deploy_id: the deploy this is about.
        release: the release being deployed.
        phase: one of :data:`OTA_PHASES`.
        blocks_received: blocks verified and on disk; never more than ``blocks_total``.
        blocks_total: the deploy's block count.
    """

    deploy_id: str
    release: int
    phase: str
    blocks_received: int
    blocks_total: int

    def __post_init__(self) -> None:
        if not (isinstance(self.deploy_id, str) and _COMMAND_ID.fullmatch(self.deploy_id)):
            raise _fail(MessageError, "ota.deploy_id", "1-64 characters [A-Za-z0-9._:-]", self.deploy_id)
        _int("ota.release", self.release, minimum=1)
        if self.phase not in OTA_PHASES:
            raise _fail(MessageError, "ota.phase", f"one of {', '.join(OTA_PHASES)}", self.phase)
        _int("ota.blocks_total", self.blocks_total, minimum=1)
        _int("ota.blocks_received", self.blocks_received)
        if self.blocks_received > self.blocks_total:
            raise MessageError(f"ota.blocks_received ({self.blocks_received}) must be <= blocks_total ({self.blocks_total})")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``state.ota``, or an ``ota_progress`` event's detail)."""
        return {k: getattr(self, k) for k in _PROGRESS}

    @classmethod
    def parse(cls, raw: object) -> OtaProgress | None:
        """From a payload's ``ota`` or an ``ota_progress`` detail (``None`` stays ``None``).

        Raises:
            MessageError: not an object with exactly the fields, or a field is invalid.
        """
        if raw is None:
            return None
        return cls(**_obj("ota", raw, _PROGRESS))

    def to_event(self, device_id: str, ts: str | None) -> Event:
        """The rate-limited ``ota_progress`` event."""
        return Event(device_id=device_id, ts=ts, type="ota_progress", detail=self.to_dict())


_PROGRESS = ("deploy_id", "release", "phase", "blocks_received", "blocks_total")


@dataclass(frozen=True, kw_only=True)
class State(_Header):
    """The retained ``state``: what runs, its health, the last error; ``online`` false in the Last Will."""

    online: bool
    agent_version: str
    target: str | None
    runtime: str | None
    bundle: BundleInfo | None
    health: str
    last_error: str | None
    #: The update in progress or the last one's end (ADR 0012); ``None`` when none ran.
    ota: OtaProgress | None = None
    #: ``[tags]`` of agent.toml (see :func:`check_tags`); the console groups devices by them.
    tags: Mapping[str, str] = field(default_factory=dict)

    _KIND: ClassVar[str] = "state"
    _BODY: ClassVar[tuple[str, ...]] = (
        "online",
        "agent_version",
        "target",
        "runtime",
        "bundle",
        "health",
        "last_error",
        "ota",
        "tags",
    )

    def _check(self) -> None:
        if not isinstance(self.online, bool):
            raise _fail(MessageError, "state.online", "a boolean", self.online)
        _str("state.agent_version", self.agent_version)
        _str("state.target", self.target, nullable=True)
        if self.runtime is not None and self.runtime not in _RUNTIMES:
            raise _fail(MessageError, "state.runtime", f"one of {', '.join(_RUNTIMES)} or null", self.runtime)
        if self.bundle is not None and not isinstance(self.bundle, BundleInfo):
            raise _fail(MessageError, "state.bundle", "a BundleInfo or null", self.bundle)
        if self.health not in HEALTH_STATES:
            raise _fail(MessageError, "state.health", f"one of {', '.join(HEALTH_STATES)}", self.health)
        _str("state.last_error", self.last_error, nullable=True)
        if self.ota is not None and not isinstance(self.ota, OtaProgress):
            raise _fail(MessageError, "state.ota", "an OtaProgress or null", self.ota)
        object.__setattr__(self, "tags", _frozen(check_tags(self.tags)))

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "bundle": _ref_dict(self.bundle), "ota": None if self.ota is None else self.ota.to_dict()}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "bundle": BundleInfo.parse(raw["bundle"]), "ota": OtaProgress.parse(raw["ota"])}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """As :meth:`_Header.from_dict`; an absent ``ota`` (an agent before OTA) reads as ``null``,
        absent ``tags`` (an agent before issue 9) as no tags.

        Raises:
            MessageError: a field is missing, unknown or invalid.
        """
        if isinstance(raw, Mapping):
            defaults: dict[str, Any] = {"ota": None, "tags": {}}
            raw = {**{k: v for k, v in defaults.items() if k not in raw}, **raw}
        return super().from_dict(raw)


_INFERENCE = ("count", "window_count", "errors", "error_count")
_LATENCY = ("p50", "p95", "p99", "max")
_DRIFT = ("alarm", "samples", "max_psi", "max_feature", "max_cusum", "prediction_psi")
_RESOURCES = ("rss_bytes", "cpu_percent")
_OUTBOX = ("pending", "dropped", "quarantined", "superseded")
_FEEDBACK = ("labelled", "correct", "rejected")
_INFERENCE_OPTIONAL = ("predicted", "feedback", "task", "anomaly")
_DRIFT_OPTIONAL = ("output_psi",)
#: What a model does (``edgeops_core.manifest.TASKS``); telemetry ``inference.task``.
_TASKS = ("classification", "regression", "anomaly")


def _predicted(value: object) -> tuple[int, ...] | None:
    """``telemetry.inference.predicted``: at most :data:`MAX_PREDICTED_LABELS` counts, or null."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) > MAX_PREDICTED_LABELS:
        raise _fail(
            MessageError, "telemetry.inference.predicted", f"a list of at most {MAX_PREDICTED_LABELS} counts or null", value
        )
    for i, n in enumerate(value):
        _int(f"telemetry.inference.predicted[{i}]", n)
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class Telemetry(_Header):
    """One periodic ``telemetry`` record: counters, latency percentiles, drift, resources, outbox.

    ``inference.predicted`` (optional: older agents leave it out; ``null`` without a model):
    per label index of the model in ``model``, how many of this interval's predictions chose
    it (since the interval began, or since that model was activated within it).

    ``inference.feedback`` (optional, likewise): the ground-truth labels attached to
    predictions this interval (``labelled``), how many of them the prediction got right
    (``correct`` ≤ ``labelled``) and how many labels were refused (``rejected``: unknown or
    expired prediction ids, labels the model does not have).

    ``inference.task`` (optional: agents before issue 12 leave it out): the model's task,
    ``classification``, ``regression`` or ``anomaly`` (``null`` without a model). A regression's
    or anomaly model's ``predicted`` is ``null`` (its answers are not classes).
    ``inference.anomaly`` (anomaly models only): this interval's anomalies (``count``) and
    their share of the interval's predictions (``rate``, ``null`` without a prediction).
    ``drift.output_psi`` (regression and anomaly models only): the PSI of each output over the
    drift window against ``drift_reference.outputs``, by output name; ``drift.prediction_psi``
    is then the largest of them.
    """

    interval_s: float
    model: ModelRef | None
    inference: Mapping[str, Any]
    latency_ms: Mapping[str, float | None]
    drift: Mapping[str, Any] | None
    resources: Mapping[str, float]
    outbox: Mapping[str, int]

    _KIND: ClassVar[str] = "telemetry"
    _BODY: ClassVar[tuple[str, ...]] = ("interval_s", "model", "inference", "latency_ms", "drift", "resources", "outbox")

    def _check(self) -> None:
        _num("telemetry.interval_s", self.interval_s, positive=True)
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise _fail(MessageError, "telemetry.model", "a ModelRef or null", self.model)
        present = self.inference if isinstance(self.inference, Mapping) else {}
        keys = (*_INFERENCE, *(k for k in _INFERENCE_OPTIONAL if k in present))
        inf = _obj("telemetry.inference", self.inference, keys)
        for k in ("count", "window_count", "error_count"):
            _int(f"telemetry.inference.{k}", inf[k])
        predicted = _predicted(inf.get("predicted"))
        if "feedback" in inf:
            _feedback(inf["feedback"])
        _task_fields(inf)
        errors = inf["errors"]
        if not isinstance(errors, Mapping) or not all(isinstance(k, str) for k in errors):
            raise _fail(MessageError, "telemetry.inference.errors", "an object of counts", errors)
        for k, v in errors.items():
            _int(f"telemetry.inference.errors.{k}", v, minimum=1)
        lat = _obj("telemetry.latency_ms", self.latency_ms, _LATENCY)
        for k in _LATENCY:
            _num(f"telemetry.latency_ms.{k}", lat[k], nullable=True)
        if self.drift is not None:
            _drift(self.drift)
        res = _obj("telemetry.resources", self.resources, _RESOURCES)
        for k in _RESOURCES:
            _num(f"telemetry.resources.{k}", res[k])
        box = _obj("telemetry.outbox", self.outbox, _OUTBOX)
        for k in _OUTBOX:
            _int(f"telemetry.outbox.{k}", box[k])
        # Frozen all the way down: a message that exists stays valid.
        for name in ("inference", "latency_ms", "drift", "resources", "outbox"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _frozen(value))
        inference = {**self.inference, "errors": _frozen(errors)}
        if "predicted" in inference:
            inference["predicted"] = predicted
        if "anomaly" in inference:
            inference["anomaly"] = _frozen(inference["anomaly"])
        object.__setattr__(self, "inference", _frozen(inference))
        if self.drift is not None and "output_psi" in self.drift:
            object.__setattr__(self, "drift", _frozen({**self.drift, "output_psi": _frozen(self.drift["output_psi"])}))

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "model": _ref_dict(self.model)}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "model": ModelRef.parse(raw["model"])}


def _drift(drift: Any) -> None:
    """``telemetry.drift`` (not null)."""
    given = drift if isinstance(drift, Mapping) else {}
    d = _obj("telemetry.drift", drift, (*_DRIFT, *(k for k in _DRIFT_OPTIONAL if k in given)))
    if "output_psi" in d:
        _output_psi(d["output_psi"])
    if not isinstance(d["alarm"], bool):
        raise _fail(MessageError, "telemetry.drift.alarm", "a boolean", d["alarm"])
    _int("telemetry.drift.samples", d["samples"])
    _str("telemetry.drift.max_feature", d["max_feature"])
    for k in ("max_psi", "max_cusum", "prediction_psi"):
        _num(f"telemetry.drift.{k}", d[k])


def _task_fields(inf: Mapping[str, Any]) -> None:
    """``telemetry.inference.task`` and ``.anomaly``, when present."""
    if "task" in inf and inf["task"] is not None and inf["task"] not in _TASKS:
        raise _fail(MessageError, "telemetry.inference.task", f"one of {', '.join(_TASKS)} or null", inf["task"])
    if "anomaly" in inf:
        _anomaly(inf["anomaly"])


def _output_psi(psi: Any) -> None:
    if not isinstance(psi, Mapping) or len(psi) > MAX_PREDICTED_LABELS or not all(isinstance(k, str) for k in psi):
        raise _fail(MessageError, "telemetry.drift.output_psi", "an object of PSI values by output name", psi)
    for k, v in psi.items():
        _num(f"telemetry.drift.output_psi.{k}", v)


def _anomaly(raw: Any) -> None:
    a = _obj("telemetry.inference.anomaly", raw, ("count", "rate"))
    _int("telemetry.inference.anomaly.count", a["count"])
    _num("telemetry.inference.anomaly.rate", a["rate"], nullable=True)
    if a["rate"] is not None and not 0 <= a["rate"] <= 1:
        raise _fail(MessageError, "telemetry.inference.anomaly.rate", "a share in [0, 1] or null", a["rate"])


def _feedback(raw: Any) -> None:
    fb = _obj("telemetry.inference.feedback", raw, _FEEDBACK)
    for k in _FEEDBACK:
        _int(f"telemetry.inference.feedback.{k}", fb[k])
    if fb["correct"] > fb["labelled"]:
        raise _fail(MessageError, "telemetry.inference.feedback.correct", "at most labelled", fb["correct"])


@dataclass(frozen=True, kw_only=True)
class Event(_Header):
    """One ``events`` message: a ``type`` from :data:`EVENT_TYPES` and a flat ``detail`` object."""

    type: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    _KIND: ClassVar[str] = "event"
    _BODY: ClassVar[tuple[str, ...]] = ("type", "detail")

    def _check(self) -> None:
        if self.type not in EVENT_TYPES:
            raise _fail(MessageError, "event.type", f"one of {', '.join(EVENT_TYPES)}", self.type)
        if not isinstance(self.detail, Mapping) or not all(isinstance(k, str) for k in self.detail):
            raise _fail(MessageError, "event.detail", "an object", self.detail)
        try:
            json.dumps(_plain(self.detail), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise MessageError(f"event.detail must be JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "detail", _frozen(self.detail))


@dataclass(frozen=True, kw_only=True)
class Samples(_Header):
    """Field samples sent in answer to ``sample_upload``: raw input rows, the labelled ones first.

    Attributes:
        command_id: the ``sample_upload`` this answers.
        model: the model whose inputs these are (``None``: no model, and no rows).
        feature_names: the model's features; every row has one value per name.
        rows: at most :data:`MAX_SAMPLE_ROWS` raw input rows (before preprocessing).
        labels: per row, its ground-truth label (one of ``label_names``), or ``None`` for a
            row nobody labelled.
        label_names: the model's labels.
        scores: per row, a finite number >= 0 saying why it was picked (the agent's rarity
            under the drift reference plus the model's uncertainty; 0 when not scored).

    An agent before issue 11 sends neither ``labels``, ``label_names`` nor ``scores``:
    :meth:`from_dict` reads such a payload as unlabelled rows (labels all ``None``, no label
    names, scores 0).
    """

    command_id: str
    model: ModelRef | None
    feature_names: tuple[str, ...]
    rows: tuple[tuple[float, ...], ...]
    labels: tuple[str | None, ...]
    label_names: tuple[str, ...]
    scores: tuple[float, ...]

    _KIND: ClassVar[str] = "samples"
    _BODY: ClassVar[tuple[str, ...]] = ("command_id", "model", "feature_names", "rows", "labels", "label_names", "scores")

    def _check(self) -> None:
        if not (isinstance(self.command_id, str) and _COMMAND_ID.fullmatch(self.command_id)):
            raise _fail(MessageError, "samples.command_id", "a command id", self.command_id)
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise _fail(MessageError, "samples.model", "a ModelRef or null", self.model)
        features = _names("samples.feature_names", self.feature_names, limit=MAX_SAMPLE_FEATURES)
        label_names = _names("samples.label_names", self.label_names, limit=MAX_PREDICTED_LABELS)
        if len(set(label_names)) != len(label_names):
            raise _fail(MessageError, "samples.label_names", "distinct names", self.label_names)
        if not isinstance(self.rows, list | tuple) or len(self.rows) > MAX_SAMPLE_ROWS:
            raise _fail(MessageError, "samples.rows", f"a list of at most {MAX_SAMPLE_ROWS} rows", _brief(self.rows))
        width = len(features)
        for i, row in enumerate(self.rows):
            if not isinstance(row, list | tuple) or len(row) != width:
                raise _fail(MessageError, f"samples.rows[{i}]", f"a list of {width} numbers (one per feature name)", _brief(row))
            # A row of floats whose sum is finite is checked at C speed (a NaN or inf makes the sum
            # non-finite); any other row (integers, an overflowing sum, a bad value) value by value.
            if not (all(v.__class__ is float for v in row) and math.isfinite(sum(row))):
                for v in row:
                    if not (isinstance(v, int | float) and not isinstance(v, bool) and _finite(v)):
                        raise _fail(MessageError, f"samples.rows[{i}]", "finite numbers", v)
        n = len(self.rows)
        if not isinstance(self.labels, list | tuple) or len(self.labels) != n:
            raise _fail(MessageError, "samples.labels", f"a list of {n} labels (one per row)", _brief(self.labels))
        known = set(label_names)
        for i, label in enumerate(self.labels):
            if label is not None and not (isinstance(label, str) and label in known):
                raise _fail(MessageError, f"samples.labels[{i}]", "one of label_names or null", label)
        if not isinstance(self.scores, list | tuple) or len(self.scores) != n:
            raise _fail(MessageError, "samples.scores", f"a list of {n} scores (one per row)", _brief(self.scores))
        for i, score in enumerate(self.scores):
            _num(f"samples.scores[{i}]", score)
        object.__setattr__(self, "feature_names", features)
        object.__setattr__(self, "label_names", label_names)
        object.__setattr__(self, "rows", tuple(tuple(r) for r in self.rows))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "scores", tuple(self.scores))

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "model": _ref_dict(self.model)}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "model": ModelRef.parse(raw["model"])}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """As :meth:`_Header.from_dict`; a payload without ``labels``, ``label_names`` and
        ``scores`` (an agent before issue 11) reads as unlabelled, unscored rows.

        Raises:
            MessageError: a field is missing, unknown or invalid.
        """
        if isinstance(raw, Mapping) and not {"labels", "label_names", "scores"} & set(raw):
            rows = raw.get("rows")
            n = len(rows) if isinstance(rows, list | tuple) else 0
            raw = {**raw, "labels": [None] * n, "label_names": [], "scores": [0] * n}
        return super().from_dict(raw)


def _names(where: str, value: object, *, limit: int | None = None) -> tuple[str, ...]:
    """A list of strings as a tuple (at most ``limit`` of them)."""
    if not isinstance(value, list | tuple) or not all(isinstance(n, str) for n in value):
        raise _fail(MessageError, where, "a list of strings", _brief(value))
    if limit is not None and len(value) > limit:
        raise MessageError(f"{where} must have at most {limit} names, got {len(value)}")
    return tuple(value)


def _finite(value: float) -> bool:
    """``math.isfinite``, false (not ``OverflowError``) for an integer beyond any float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _brief(value: object) -> object:
    """``value`` for an error message: a long list is shown by its length, not its repr."""
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"<a list of {len(value)}>"
    return value


# -- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A validated console → device command.

    Attributes:
        id: unique per command; the agent acts on an id once (see the module docstring).
        type: one of :data:`COMMAND_TYPES`.
        args: the command's arguments (``sample_upload``: ``max_rows``, 0..:data:`MAX_SAMPLE_ROWS`;
            absent or 0 asks for :data:`DEFAULT_SAMPLE_ROWS`).
        issued_at: when the console issued it (UTC text), if it says so.
    """

    id: str
    type: str
    args: Mapping[str, Any] = field(default_factory=dict)
    issued_at: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.id, str) and _COMMAND_ID.fullmatch(self.id)):
            raise _fail(CommandError, "command 'id'", "1-64 characters [A-Za-z0-9._:-]", self.id)
        if self.type not in COMMAND_TYPES:
            raise _fail(CommandError, "command 'type'", f"one of {', '.join(COMMAND_TYPES)}", self.type)
        if not isinstance(self.args, Mapping):
            raise _fail(CommandError, "command 'args'", "an object", self.args)
        if self.type == "sample_upload":
            extra = sorted(set(self.args) - {"max_rows"})
            limit = self.args.get("max_rows", 0)
            if extra:
                raise CommandError(f"sample_upload has unknown argument {extra[0]!r}")
            if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_SAMPLE_ROWS:
                expected = f"an integer 0..{MAX_SAMPLE_ROWS} (0: {DEFAULT_SAMPLE_ROWS})"
                raise _fail(CommandError, "sample_upload 'max_rows'", expected, limit)
        if self.type == DEPLOY_COMMAND:
            deploy_args(self.args)
            deploy_hold_s(self.args)
        if self.type in ("commit", "rollback"):
            _deploy_id_args(self.type, self.args)
        if self.type == "renew_cert" and self.args:
            raise CommandError(f"renew_cert takes no arguments, got {sorted(self.args)[0]!r}")
        if self.type == "install_cert":
            _install_cert_args(self.args)
        if self.type == "trust_update":
            _trust_update_args(self.args)
        if self.issued_at is not None and self.issued_time() is None:
            raise _fail(CommandError, "command 'issued_at'", "UTC text YYYY-MM-DDTHH:MM:SS.ffffffZ", self.issued_at)
        object.__setattr__(self, "args", _frozen(self.args))

    def issued_time(self) -> float | None:
        """``issued_at`` as a POSIX timestamp (``None`` if absent or malformed)."""
        if not isinstance(self.issued_at, str) or not _TS.fullmatch(self.issued_at):
            return None
        return datetime.strptime(self.issued_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as it goes on the wire."""
        out: dict[str, Any] = {"id": self.id, "type": self.type, "args": _plain(self.args)}
        if self.issued_at is not None:
            out["issued_at"] = self.issued_at
        return out

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Command:
        """Same as :func:`parse_command`."""
        return parse_command(payload)


#: Longest PEM text of a certificate signing request or a certificate on the wire (a P-256
#: leaf is about 700 characters; room for long names and extensions, not for a chain of junk).
MAX_PEM_CHARS = 8192


def _install_cert_args(args: Mapping[str, Any]) -> None:
    extra = sorted(set(args) - {"certificate"})
    if extra:
        raise CommandError(f"install_cert has unknown argument {extra[0]!r}")
    pem = args.get("certificate")
    if not isinstance(pem, str) or not pem.startswith("-----BEGIN CERTIFICATE-----") or len(pem) > MAX_PEM_CHARS:
        expected = f"PEM certificate text of at most {MAX_PEM_CHARS} characters"
        raise _fail(CommandError, "install_cert 'certificate'", expected, _brief(pem))


def install_cert_command(certificate_pem: str, *, command_id: str | None = None) -> bytes:
    """The ``install_cert`` command: the console's answer to a :class:`CertificateRequest`.

    Raises:
        CommandError: not PEM certificate text, or too long.
    """
    cid = _check_command_id(f"install_cert-{os.urandom(8).hex()}" if command_id is None else command_id)
    return Command(id=cid, type="install_cert", args={"certificate": certificate_pem}, issued_at=utc_now_text()).to_json()


def _trust_update_args(args: Mapping[str, Any]) -> None:
    """Structure only; the device verifies the signatures (:mod:`edgeops_core.trust`)."""
    try:
        trust_update_args(args)
    except TrustError as exc:
        raise CommandError(f"trust_update: {exc}") from exc


def trust_update_command(
    roots: Sequence[Mapping[str, Any]], release_keys: Mapping[str, Any] | None, *, command_id: str | None = None
) -> bytes:
    """The ``trust_update`` command: root documents (oldest first) and/or a release-key list.

    Raises:
        CommandError: a malformed document, nothing to send, or over :data:`MAX_COMMAND_BYTES`
            (send fewer roots).
    """
    cid = _check_command_id(f"trust_update-{os.urandom(8).hex()}" if command_id is None else command_id)
    args: dict[str, Any] = {"root": list(roots)}
    if release_keys is not None:
        args["release_keys"] = release_keys
    payload = Command(id=cid, type="trust_update", args=args, issued_at=utc_now_text()).to_json()
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"trust_update command is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}: send fewer roots")
    return payload


def renew_cert_command(*, command_id: str | None = None) -> bytes:
    """The ``renew_cert`` command: the device makes a new key and answers with a :class:`CertificateRequest`."""
    cid = _check_command_id(f"renew_cert-{os.urandom(8).hex()}" if command_id is None else command_id)
    return Command(id=cid, type="renew_cert", issued_at=utc_now_text()).to_json()


def parse_command(payload: bytes | str) -> Command:
    """Validate a ``cmd`` payload: ``{"id", "type", "args"?, "issued_at"?}``.

    Size is checked before parsing and nesting is bounded, so no payload can make the parser
    recurse or allocate without bound.

    Raises:
        CommandError: anything else, with what was expected and what arrived.
    """
    raw_bytes = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw_bytes) > MAX_COMMAND_BYTES:
        raise CommandError(f"command payload is {len(raw_bytes)} bytes, the limit is {MAX_COMMAND_BYTES}")
    try:
        raw = load_untrusted_json(raw_bytes, max_depth=MAX_COMMAND_DEPTH)
    except ValueError as exc:
        raise CommandError(f"command payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CommandError(f"command payload must be a JSON object, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"id", "type", "args", "issued_at"})
    if extra:
        raise CommandError(f"command has unknown field {extra[0]!r}")
    issued = raw.get("issued_at")
    if issued is not None and not isinstance(issued, str):
        raise _fail(CommandError, "command 'issued_at'", "UTC text", issued)
    return Command(id=raw.get("id"), type=raw.get("type"), args=raw.get("args", {}), issued_at=issued)  # type: ignore[arg-type]


# -- over-the-air transfer (ADR 0012) ----------------------------------------------------------
#
# The device pulls a bundle in fixed-size blocks: the console announces a deploy in a ``deploy``
# command (:class:`Deploy`, with the sha256 of every block), the device asks for the blocks it
# lacks on ``ota_request`` (:class:`BlockRequest`, JSON) and the console publishes each block
# on ``ota_block`` as one binary MQTT payload (:class:`BlockFrame`: a 20-byte header, then the
# bytes). Both topics sit in the device's own subtree.

#: The command ``type`` of a deploy (one of :data:`COMMAND_TYPES`).
DEPLOY_COMMAND = "deploy"
#: Smallest and largest block (bytes); a block size is a power of two between them.
MIN_BLOCK_BYTES = 4 * 1024
MAX_BLOCK_BYTES = 1024 * 1024
#: The block size a sender uses unless the bundle is too large for it (:func:`choose_block_size`).
DEFAULT_BLOCK_BYTES = 64 * 1024
#: Most blocks in one deploy. Their digests travel inside the deploy command: 512 x 67 bytes
#: of JSON is 34 KiB, well under :data:`MAX_COMMAND_BYTES`; 512 blocks of 1 MiB cover the
#: 256 MiB bundle cap (:data:`~edgeops_core.bundle.MAX_BUNDLE_BYTES`).
MAX_BLOCKS = 512
#: Most block indexes in one request.
MAX_REQUEST_BLOCKS = 64
#: Largest ``ota_request`` payload read (bytes): 64 indexes and the header fit in 1 KiB.
MAX_REQUEST_BYTES = 4 * 1024
#: First bytes of every block frame: "edgeops OTA block", frame format 1.
BLOCK_MAGIC = b"EOB1"
_FRAME = struct.Struct(">4s8sII")  # magic, deploy tag, index, length; big-endian
#: Size of the fixed block frame header.
BLOCK_HEADER_BYTES = _FRAME.size
#: Why a device refuses a block (the ``reason`` of :class:`BlockError`).
BLOCK_REFUSALS = ("malformed", "foreign", "out_of_range", "wrong_length", "corrupt", "duplicate", "unrequested")
#: The final events: each deploy id ends with exactly one of them.
OTA_FINAL_EVENTS = ("ota_committed", "ota_rolled_back", "ota_failed")
#: The ``reason`` of ``ota_rolled_back`` / ``ota_failed`` (and of a refused deploy).
OTA_REASONS = (
    "bad_deploy",  # the deploy command is malformed
    "wrong_target",  # built for another target
    "not_newer",  # release not above the device's floor
    "too_large",  # size over the bundle cap
    "no_space",  # the disk cannot hold the staging file (checked before fetching; or it filled)
    "busy",  # another deploy runs and this one does not supersede it
    "superseded",  # a newer release replaced this deploy mid-transfer
    "deadline",  # the transfer did not finish in time (the sender disappeared)
    "too_slow",  # below the minimum throughput
    "digest_mismatch",  # the complete file does not hash to the announced sha256
    "storage",  # the staging file could not be written (an I/O error)
    "install_rejected",  # the install code refused the bundle (signature, expiry, self-test...)
    "health_check",  # the trial failed its health check
    "crash_loop",  # the trial crashed on start-up too often
    "marked_bad",  # this sha256 was rolled back on this device before
    "console_rollback",  # a held deploy was rolled back by the console's ``rollback`` command
    "hold_expired",  # ota_committed only: the hold ran out with no command, the device committed by itself
)


class BlockError(MessageError):
    """A block frame is refused; :attr:`reason` is one of :data:`BLOCK_REFUSALS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def choose_block_size(size: int, preferred: int = DEFAULT_BLOCK_BYTES) -> int:
    """The block size for a bundle of ``size`` bytes: ``preferred``, doubled until at most :data:`MAX_BLOCKS` blocks.

    Raises:
        MessageError: ``size`` is not 1..MAX_BUNDLE_BYTES, or ``preferred`` is not a valid block size.
    """
    _check_block_size(preferred)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_BUNDLE_BYTES:
        raise _fail(MessageError, "deploy size", f"an integer 1..{MAX_BUNDLE_BYTES}", size)
    block = preferred
    while -(-size // block) > MAX_BLOCKS:
        block *= 2
    return block


def _check_block_size(block_size: object) -> None:
    ok = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not ok or not MIN_BLOCK_BYTES <= block_size <= MAX_BLOCK_BYTES or block_size & (block_size - 1):  # type: ignore[operator]
        raise _fail(MessageError, "deploy block_size", f"a power of two {MIN_BLOCK_BYTES}..{MAX_BLOCK_BYTES}", block_size)


_DEPLOY = ("deploy_id", "name", "version", "release", "target", "size", "sha256", "block_size", "block_count", "block_sha256")


def _text(where: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        raise _fail(CommandError, where, f"1-{limit} printable characters", value)


@dataclass(frozen=True, kw_only=True)
class Deploy:
    """The arguments of a ``deploy`` command: what to fetch and how it is cut into blocks.

    Block ``i`` is bytes ``[i * block_size, min(size, (i + 1) * block_size))`` of the bundle
    file; ``block_sha256[i]`` is its sha256. The list is bound to ``sha256`` twice: a device
    keys its staging file on (deploy id, sha256, digest of the list), so a resumed transfer
    never mixes blocks checked against two lists; and the complete file must hash to
    ``sha256`` before anything is installed, so a list that does not describe that file
    fails the deploy instead of installing anything (ADR 0012).

    Raises:
        CommandError: a field is missing, unknown or invalid, or the fields disagree.
    """

    deploy_id: str
    name: str
    version: str
    release: int
    target: str
    size: int
    sha256: str
    block_size: int
    block_count: int
    block_sha256: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.deploy_id, str) and _COMMAND_ID.fullmatch(self.deploy_id)):
            raise _fail(CommandError, "deploy deploy_id", "1-64 characters [A-Za-z0-9._:-]", self.deploy_id)
        _text("deploy name", self.name, 128)
        _text("deploy version", self.version, 64)
        _text("deploy target", self.target, 64)
        try:
            _int("deploy release", self.release, minimum=1)
            _check_block_size(self.block_size)
        except MessageError as exc:
            raise CommandError(str(exc)) from exc
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 1 <= self.size <= MAX_BUNDLE_BYTES:
            raise _fail(CommandError, "deploy size", f"an integer 1..{MAX_BUNDLE_BYTES}", self.size)
        if not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise _fail(CommandError, "deploy sha256", "64 lowercase hex digits", self.sha256)
        expected = -(-self.size // self.block_size)
        if not isinstance(self.block_count, int) or isinstance(self.block_count, bool) or self.block_count != expected:
            raise _fail(CommandError, "deploy block_count", f"{expected} (size / block_size, rounded up)", self.block_count)
        if expected > MAX_BLOCKS:
            raise CommandError(f"deploy has {expected} blocks, the limit is {MAX_BLOCKS}: use a larger block_size")
        if not isinstance(self.block_sha256, list | tuple) or len(self.block_sha256) != expected:
            got = len(self.block_sha256) if isinstance(self.block_sha256, list | tuple) else self.block_sha256
            raise _fail(CommandError, "deploy block_sha256", f"a list of {expected} digests", got)
        for i, digest in enumerate(self.block_sha256):
            if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
                raise _fail(CommandError, f"deploy block_sha256[{i}]", "64 lowercase hex digits", digest)
        object.__setattr__(self, "block_sha256", tuple(self.block_sha256))

    def block_length(self, index: int) -> int:
        """The length of block ``index`` (the last one may be short)."""
        return min(self.block_size, self.size - index * self.block_size)

    @property
    def tag(self) -> bytes:
        """The 8 bytes that mark this deploy's block frames: sha256 of deploy id and bundle sha256."""
        return bytes(sha256_new(f"edgeops-ota\0{self.deploy_id}\0{self.sha256}".encode()).digest()[:8])

    @property
    def blocks_digest(self) -> str:
        """sha256 over the raw block digests in order: the identity of the block list."""
        return str(sha256_new(bytes.fromhex("".join(self.block_sha256))).hexdigest())

    def to_args(self) -> dict[str, Any]:
        """The command's ``args`` object."""
        return {**{k: getattr(self, k) for k in _DEPLOY}, "block_sha256": list(self.block_sha256)}

    @classmethod
    def from_args(cls, args: object) -> Deploy:
        """Validate a ``deploy`` command's ``args``.

        Raises:
            CommandError: not an object with exactly the fields, or a field is invalid.
        """
        if not isinstance(args, Mapping):
            raise _fail(CommandError, "deploy args", "an object", args)
        missing, extra = sorted(set(_DEPLOY) - set(args)), sorted(set(args) - set(_DEPLOY))
        if missing or extra:
            raise CommandError(
                f"deploy args must have exactly the fields {', '.join(_DEPLOY)}; missing {missing}, unknown {extra}"
            )
        return cls(**args)

    def check_frame(self, frame: BlockFrame) -> None:
        """Refuse a frame that is not a valid block of this deploy (the digest is checked too).

        Raises:
            BlockError: ``foreign`` (another deploy), ``out_of_range``, ``wrong_length`` or ``corrupt``.
        """
        if frame.tag != self.tag:
            raise BlockError("foreign", f"block {frame.index} belongs to another deploy (tag {frame.tag.hex()})")
        if frame.index >= self.block_count:
            raise BlockError("out_of_range", f"block index {frame.index} is out of range 0..{self.block_count - 1}")
        want = self.block_length(frame.index)
        if len(frame.data) != want:
            raise BlockError("wrong_length", f"block {frame.index} must be {want} bytes, got {len(frame.data)}")
        if sha256_new(frame.data).hexdigest() != self.block_sha256[frame.index]:
            raise BlockError("corrupt", f"block {frame.index} does not match its sha256")

    def frame(self, index: int, data: bytes) -> BlockFrame:
        """Block ``index`` of this deploy as a frame (the sender side).

        Raises:
            BlockError: the index is out of range or the length is wrong.
        """
        frame = BlockFrame(tag=self.tag, index=index, data=data)
        if index >= self.block_count:
            raise BlockError("out_of_range", f"block index {index} is out of range 0..{self.block_count - 1}")
        if len(data) != self.block_length(index):
            raise BlockError("wrong_length", f"block {index} must be {self.block_length(index)} bytes, got {len(data)}")
        return frame


#: Options a ``deploy`` command's ``args`` may carry beside the :class:`Deploy` fields:
#: ``retry_bad`` (boolean) fetches a bundle whose sha256 this device rolled back before;
#: ``hold_s`` (integer 0..:data:`MAX_HOLD_S`) keeps a deploy that passed its health check
#: ``held`` for up to that many seconds, waiting for ``commit`` or ``rollback``.
DEPLOY_OPTIONS = ("retry_bad", "hold_s")
#: Longest hold a deploy may ask for (seconds): 7 days.
MAX_HOLD_S = 7 * 86400


def deploy_args(args: object) -> tuple[Deploy, bool]:
    """Validate a ``deploy`` command's ``args``: the :class:`Deploy` and ``retry_bad``.

    Raises:
        CommandError: not an object with exactly the deploy's fields (plus the options), or invalid.
    """
    if not isinstance(args, Mapping):
        raise _fail(CommandError, "deploy args", "an object", args)
    retry = args.get("retry_bad", False)
    if not isinstance(retry, bool):
        raise _fail(CommandError, "deploy retry_bad", "a boolean", retry)
    return Deploy.from_args({k: v for k, v in args.items() if k not in DEPLOY_OPTIONS}), retry


def _check_hold(hold_s: object) -> int:
    if not isinstance(hold_s, int) or isinstance(hold_s, bool) or not 0 <= hold_s <= MAX_HOLD_S:
        raise _fail(CommandError, "deploy hold_s", f"an integer 0..{MAX_HOLD_S} (seconds)", hold_s)
    return hold_s


def deploy_hold_s(args: Mapping[str, Any]) -> int:
    """A ``deploy`` command's ``hold_s`` (0 when absent: commit right after the health check).

    Raises:
        CommandError: not an integer 0..:data:`MAX_HOLD_S`.
    """
    return _check_hold(args.get("hold_s", 0))


def _command_bytes(doc: dict[str, Any], what: str) -> bytes:
    payload = json.dumps(doc, separators=(",", ":")).encode()
    if len(payload) > MAX_COMMAND_BYTES:  # unreachable with MAX_BLOCKS; kept as the contract's guard
        raise CommandError(f"{what} command is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}")
    return payload


def _check_command_id(cid: object) -> str:
    if not (isinstance(cid, str) and _COMMAND_ID.fullmatch(cid)):
        raise _fail(CommandError, "command 'id'", "1-64 characters [A-Za-z0-9._:-]", cid)
    return cid


def deploy_command(
    deploy: Deploy,
    *,
    command_id: str | None = None,
    issued_at: str | None = None,
    retry_bad: bool = False,
    hold_s: int = 0,
) -> bytes:
    """The ``cmd`` payload announcing ``deploy`` (``id`` defaults to the deploy id).

    ``retry_bad`` asks the device to fetch the bundle even if it rolled this sha256 back
    before (the console's explicit retry). ``hold_s > 0`` asks the device to stay ``held``
    after its health check, for up to ``hold_s`` seconds, until a :func:`commit_command` or
    :func:`rollback_command` arrives; then it commits on its own.

    Raises:
        CommandError: the id, ``issued_at`` or ``hold_s`` is invalid, or the payload exceeds
            :data:`MAX_COMMAND_BYTES`.
    """
    cid = _check_command_id(deploy.deploy_id if command_id is None else command_id)
    args = {**deploy.to_args(), "retry_bad": True} if retry_bad else deploy.to_args()
    if _check_hold(hold_s):
        args["hold_s"] = hold_s
    doc: dict[str, Any] = {"id": cid, "type": DEPLOY_COMMAND, "args": args}
    if issued_at is not None:
        if not (isinstance(issued_at, str) and _TS.fullmatch(issued_at)):
            raise _fail(CommandError, "command 'issued_at'", "UTC text YYYY-MM-DDTHH:MM:SS.ffffffZ", issued_at)
        doc["issued_at"] = issued_at
    return _command_bytes(doc, "deploy")


def _deploy_id_args(kind: str, args: Mapping[str, Any]) -> str:
    """The ``deploy_id`` of a ``commit`` / ``rollback`` command's args (exactly that field)."""
    extra = sorted(set(args) - {"deploy_id"})
    if extra:
        raise CommandError(f"{kind} has unknown argument {extra[0]!r}")
    deploy_id = args.get("deploy_id")
    if not (isinstance(deploy_id, str) and _COMMAND_ID.fullmatch(deploy_id)):
        raise _fail(CommandError, f"{kind} 'deploy_id'", "1-64 characters [A-Za-z0-9._:-]", deploy_id)
    return deploy_id


def _end_hold_command(kind: str, deploy_id: str, command_id: str | None) -> bytes:
    _deploy_id_args(kind, {"deploy_id": deploy_id})
    # A fresh id by default: a commit or rollback refused because the deploy was not held yet
    # must be able to go again, and the device acts on a command id only once.
    # os.urandom, not secrets: importing secrets loads hmac and _hashlib, which the serving
    # agent keeps out of memory (test_serving_agent_does_not_load_the_signature_stack).
    cid = _check_command_id(f"{kind}-{os.urandom(8).hex()}" if command_id is None else command_id)
    return _command_bytes({"id": cid, "type": kind, "args": {"deploy_id": deploy_id}}, kind)


def commit_command(deploy_id: str, *, command_id: str | None = None) -> bytes:
    """The ``cmd`` payload committing a held deploy (``id``: a fresh one unless given).

    The device answers ``ota_committed`` (floor raised, old slot freed for the next update),
    or ``command_rejected`` when that deploy is not held there (unknown, still running, ended).

    Raises:
        CommandError: the deploy id or the command id is invalid.
    """
    return _end_hold_command("commit", deploy_id, command_id)


def rollback_command(deploy_id: str, *, command_id: str | None = None) -> bytes:
    """The ``cmd`` payload rolling a held deploy back (``id``: a fresh one unless given).

    The device serves its previous model again, marks the bundle's sha256 bad and answers
    ``ota_rolled_back`` with reason ``console_rollback``; or ``command_rejected`` when that
    deploy is not held there (a rollback after a commit is refused: the floor was raised).

    Raises:
        CommandError: the deploy id or the command id is invalid.
    """
    return _end_hold_command("rollback", deploy_id, command_id)


@dataclass(frozen=True)
class BlockFrame:
    """One block on ``ota_block``: a fixed header, then the bytes (never base64, never JSON).

    Header (20 bytes, big-endian): ``magic`` 4 bytes :data:`BLOCK_MAGIC`; ``tag`` 8 bytes
    (:attr:`Deploy.tag`); ``index`` uint32; ``length`` uint32, which must equal the number of
    bytes that follow.
    """

    tag: bytes
    index: int
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.tag, bytes) or len(self.tag) != 8:
            raise BlockError("malformed", f"block tag must be 8 bytes, got {self.tag!r}")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or not 0 <= self.index < 2**32:
            raise BlockError("malformed", f"block index must be an integer 0..2**32-1, got {self.index!r}")
        if not isinstance(self.data, bytes) or len(self.data) > MAX_BLOCK_BYTES:
            raise BlockError("malformed", f"block data must be at most {MAX_BLOCK_BYTES} bytes")

    def to_bytes(self) -> bytes:
        """The payload as it goes on the wire."""
        return _FRAME.pack(BLOCK_MAGIC, self.tag, self.index, len(self.data)) + self.data

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> BlockFrame:
        """Read a frame strictly (the deploy-specific checks are :meth:`Deploy.check_frame`).

        Raises:
            BlockError: ``malformed``: shorter than the header, wrong magic, a length that is
                not the number of bytes that follow, or larger than :data:`MAX_BLOCK_BYTES`.
        """
        view = memoryview(payload)
        if len(view) < _FRAME.size:
            raise BlockError("malformed", f"block frame is {len(view)} bytes, shorter than its {_FRAME.size}-byte header")
        magic, tag, index, length = _FRAME.unpack_from(view)
        if magic != BLOCK_MAGIC:
            raise BlockError("malformed", f"block frame magic must be {BLOCK_MAGIC!r}, got {bytes(magic)!r}")
        if length != len(view) - _FRAME.size:
            raise BlockError("malformed", f"block frame says {length} bytes, carries {len(view) - _FRAME.size}")
        if length > MAX_BLOCK_BYTES:
            raise BlockError("malformed", f"block frame carries {length} bytes, over the {MAX_BLOCK_BYTES}-byte limit")
        return cls(tag=bytes(tag), index=index, data=bytes(view[_FRAME.size :]))


@dataclass(frozen=True, kw_only=True)
class BlockRequest(_Header):
    """The device asks for blocks of a deploy on ``ota_request``: strictly increasing indexes."""

    deploy_id: str
    blocks: tuple[int, ...]

    _KIND: ClassVar[str] = "ota_request"
    _BODY: ClassVar[tuple[str, ...]] = ("deploy_id", "blocks")

    def _check(self) -> None:
        if not (isinstance(self.deploy_id, str) and _COMMAND_ID.fullmatch(self.deploy_id)):
            raise _fail(MessageError, "ota_request.deploy_id", "1-64 characters [A-Za-z0-9._:-]", self.deploy_id)
        blocks = self.blocks
        if not isinstance(blocks, list | tuple) or not 1 <= len(blocks) <= MAX_REQUEST_BLOCKS:
            raise _fail(MessageError, "ota_request.blocks", f"a list of 1..{MAX_REQUEST_BLOCKS} indexes", blocks)
        for i, index in enumerate(blocks):
            _int(f"ota_request.blocks[{i}]", index)
            if index >= MAX_BLOCKS or (i and index <= blocks[i - 1]):
                raise _fail(MessageError, f"ota_request.blocks[{i}]", f"increasing indexes below {MAX_BLOCKS}", index)
        object.__setattr__(self, "blocks", tuple(blocks))

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a request (at most :data:`MAX_REQUEST_BYTES`).

        Raises:
            MessageError: too large, not JSON, or invalid.
        """
        if len(data) > MAX_REQUEST_BYTES:
            raise MessageError(f"ota_request payload is {len(data)} bytes, the limit is {MAX_REQUEST_BYTES}")
        return super().from_json(data)


@dataclass(frozen=True, kw_only=True)
class CertificateRequest(_Header):
    """The device asks for a new certificate on ``csr``: a PKCS#10 request for its own id.

    ``reason``: ``expiring`` (the agent's own check) or ``requested`` (a ``renew_cert``
    command, whose id is ``command_id``). The console checks the request's common name
    against the topic's device id; the broker's ACL checks the topic against the connection's
    certificate, so a device can only ask for itself.
    """

    csr: str
    reason: str
    command_id: str | None = None

    _KIND: ClassVar[str] = "csr"
    _BODY: ClassVar[tuple[str, ...]] = ("csr", "reason", "command_id")

    def _check(self) -> None:
        if (
            not isinstance(self.csr, str)
            or not self.csr.startswith("-----BEGIN CERTIFICATE REQUEST-----")
            or len(self.csr) > MAX_PEM_CHARS
        ):
            raise _fail(
                MessageError, "csr.csr", f"PEM certificate request text of at most {MAX_PEM_CHARS} characters", _brief(self.csr)
            )
        if self.reason not in ("expiring", "requested"):
            raise _fail(MessageError, "csr.reason", "'expiring' or 'requested'", self.reason)
        if self.command_id is not None and not (isinstance(self.command_id, str) and _COMMAND_ID.fullmatch(self.command_id)):
            raise _fail(MessageError, "csr.command_id", "1-64 characters [A-Za-z0-9._:-] or null", self.command_id)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a request (at most :data:`MAX_COMMAND_BYTES`).

        Raises:
            MessageError: too large, not JSON, or invalid.
        """
        if len(data) > MAX_COMMAND_BYTES:
            raise MessageError(f"csr payload is {len(data)} bytes, the limit is {MAX_COMMAND_BYTES}")
        return super().from_json(data)


_OUTCOME = ("deploy_id", "release", "reason", "message")


@dataclass(frozen=True, kw_only=True)
class OtaOutcome:
    """How a deploy ended: the detail of its one final event (:data:`OTA_FINAL_EVENTS`).

    ``reason`` (one of :data:`OTA_REASONS`) and ``message`` are ``None`` for ``ota_committed``
    and required otherwise; except that an ``ota_committed`` the device decided by itself at
    the end of a hold carries reason ``hold_expired`` and a message saying so.
    """

    type: str
    deploy_id: str
    release: int
    reason: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.type not in OTA_FINAL_EVENTS:
            raise _fail(MessageError, "ota outcome type", f"one of {', '.join(OTA_FINAL_EVENTS)}", self.type)
        if not (isinstance(self.deploy_id, str) and _COMMAND_ID.fullmatch(self.deploy_id)):
            raise _fail(MessageError, f"{self.type}.deploy_id", "1-64 characters [A-Za-z0-9._:-]", self.deploy_id)
        _int(f"{self.type}.release", self.release, minimum=1)
        if self.type == "ota_committed":
            if self.reason is None and self.message is None:
                return
            if self.reason != "hold_expired":
                raise MessageError("ota_committed carries no reason or message, except reason 'hold_expired' with a message")
        elif self.reason == "hold_expired":
            raise MessageError(f"{self.type}.reason 'hold_expired' belongs to ota_committed only")
        if self.reason not in OTA_REASONS:
            raise _fail(MessageError, f"{self.type}.reason", f"one of {', '.join(OTA_REASONS)}", self.reason)
        if not isinstance(self.message, str) or not self.message:
            raise _fail(MessageError, f"{self.type}.message", "a non-empty string", self.message)

    def to_event(self, device_id: str, ts: str | None) -> Event:
        """The final event."""
        return Event(device_id=device_id, ts=ts, type=self.type, detail={k: getattr(self, k) for k in _OUTCOME})

    @classmethod
    def from_event(cls, event: Event) -> OtaOutcome:
        """Read a final event's detail.

        Raises:
            MessageError: not a final event, or its detail is not exactly the outcome's fields.
        """
        if event.type not in OTA_FINAL_EVENTS:
            raise _fail(MessageError, "event.type", f"one of {', '.join(OTA_FINAL_EVENTS)}", event.type)
        return cls(type=event.type, **_obj(f"{event.type}.detail", event.detail, _OUTCOME))
