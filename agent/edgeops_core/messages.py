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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar, Self

from edgeops_core._json import load_untrusted_json
from edgeops_core.errors import InputError
from edgeops_core.topics import MESSAGE_SCHEMA, check_device_id

__all__ = [
    "COMMAND_TYPES",
    "COMMAND_WINDOW_S",
    "EVENT_TYPES",
    "HEALTH_STATES",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_DEPTH",
    "BundleInfo",
    "Command",
    "CommandError",
    "Event",
    "MessageError",
    "ModelRef",
    "Samples",
    "State",
    "Telemetry",
    "parse_command",
]

#: Commands the agent understands (``deploy``/``rollback`` arrive with over-the-air updates).
COMMAND_TYPES = ("ping", "status", "sample_upload")
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
)
#: The ``health`` values of the retained state (``degraded``: the outbox cannot write, e.g. a
#: full disk; the model keeps serving).
HEALTH_STATES = ("ok", "drift", "expired", "no_model", "degraded")
_RUNTIMES = ("onnxruntime", "litert", "tflite-micro")
_COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


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

    _KIND: ClassVar[str] = "state"
    _BODY: ClassVar[tuple[str, ...]] = ("online", "agent_version", "target", "runtime", "bundle", "health", "last_error")

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

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "bundle": _ref_dict(self.bundle)}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "bundle": BundleInfo.parse(raw["bundle"])}


_INFERENCE = ("count", "window_count", "errors", "error_count")
_LATENCY = ("p50", "p95", "p99", "max")
_DRIFT = ("alarm", "samples", "max_psi", "max_feature", "max_cusum", "prediction_psi")
_RESOURCES = ("rss_bytes", "cpu_percent")
_OUTBOX = ("pending", "dropped", "quarantined", "superseded")


@dataclass(frozen=True, kw_only=True)
class Telemetry(_Header):
    """One periodic ``telemetry`` record: counters, latency percentiles, drift, resources, outbox."""

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
        inf = _obj("telemetry.inference", self.inference, _INFERENCE)
        for k in ("count", "window_count", "error_count"):
            _int(f"telemetry.inference.{k}", inf[k])
        errors = inf["errors"]
        if not isinstance(errors, Mapping) or not all(isinstance(k, str) for k in errors):
            raise _fail(MessageError, "telemetry.inference.errors", "an object of counts", errors)
        for k, v in errors.items():
            _int(f"telemetry.inference.errors.{k}", v, minimum=1)
        lat = _obj("telemetry.latency_ms", self.latency_ms, _LATENCY)
        for k in _LATENCY:
            _num(f"telemetry.latency_ms.{k}", lat[k], nullable=True)
        if self.drift is not None:
            d = _obj("telemetry.drift", self.drift, _DRIFT)
            if not isinstance(d["alarm"], bool):
                raise _fail(MessageError, "telemetry.drift.alarm", "a boolean", d["alarm"])
            _int("telemetry.drift.samples", d["samples"])
            _str("telemetry.drift.max_feature", d["max_feature"])
            for k in ("max_psi", "max_cusum", "prediction_psi"):
                _num(f"telemetry.drift.{k}", d[k])
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
        object.__setattr__(self, "inference", _frozen({**self.inference, "errors": _frozen(errors)}))

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "model": _ref_dict(self.model)}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "model": ModelRef.parse(raw["model"])}


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
    """The drift reservoir sent in answer to ``sample_upload``."""

    command_id: str
    model: ModelRef | None
    feature_names: tuple[str, ...]
    rows: tuple[tuple[float, ...], ...]

    _KIND: ClassVar[str] = "samples"
    _BODY: ClassVar[tuple[str, ...]] = ("command_id", "model", "feature_names", "rows")

    def _check(self) -> None:
        if not (isinstance(self.command_id, str) and _COMMAND_ID.fullmatch(self.command_id)):
            raise _fail(MessageError, "samples.command_id", "a command id", self.command_id)
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise _fail(MessageError, "samples.model", "a ModelRef or null", self.model)
        if not isinstance(self.feature_names, list | tuple) or not all(isinstance(n, str) for n in self.feature_names):
            raise _fail(MessageError, "samples.feature_names", "a list of strings", self.feature_names)
        if not isinstance(self.rows, list | tuple):
            raise _fail(MessageError, "samples.rows", "a list of rows", self.rows)
        for i, row in enumerate(self.rows):
            if not isinstance(row, list | tuple):
                raise _fail(MessageError, f"samples.rows[{i}]", "a list of numbers", row)
            for v in row:
                if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)):
                    raise _fail(MessageError, f"samples.rows[{i}]", "finite numbers", v)
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        object.__setattr__(self, "rows", tuple(tuple(r) for r in self.rows))

    def _body(self) -> dict[str, Any]:
        return {**super()._body(), "model": _ref_dict(self.model)}

    @classmethod
    def _fields(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._fields(raw), "model": ModelRef.parse(raw["model"])}


# -- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A validated console → device command.

    Attributes:
        id: unique per command; the agent acts on an id once (see the module docstring).
        type: one of :data:`COMMAND_TYPES`.
        args: the command's arguments (``sample_upload``: ``max_rows``).
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
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise _fail(CommandError, "sample_upload 'max_rows'", "an integer >= 0", limit)
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
