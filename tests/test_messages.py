"""The wire contract: message types, topic helpers, docs/asyncapi.json, the command journal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import REPO
from edgeops_agent.commands import CommandJournal, JournalFullError, StaleCommandError
from edgeops_core import (
    COMMAND_TYPES,
    COMMAND_WINDOW_S,
    EVENT_TYPES,
    HEALTH_STATES,
    BundleInfo,
    Command,
    CommandError,
    Event,
    InputError,
    MessageError,
    ModelRef,
    Samples,
    State,
    Telemetry,
    check_device_id,
    device_topic,
    parse_command,
    parse_topic,
    utc_now_text,
)
from edgeops_core.messages import MAX_COMMAND_BYTES, CertificateRequest

ASYNCAPI = json.loads((REPO / "docs" / "asyncapi.json").read_text())
SCHEMAS = ASYNCAPI["components"]["schemas"]
TS = "2026-11-28T15:00:00.123456Z"
_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMII=\n-----END CERTIFICATE REQUEST-----\n"
BUNDLE = BundleInfo(
    name="sensor", version="1.0.0", release=3, sha256="ab" * 32, slot="b", expires="2027-01-01T00:00:00Z", expired=False
)
TELEMETRY_BODY: dict[str, Any] = {
    "interval_s": 10.0,
    "model": ModelRef("sensor", 3),
    "inference": {"count": 12, "window_count": 2, "errors": {"TensorInputError": 1}, "error_count": 1},
    "latency_ms": {"p50": 0.04, "p95": 0.05, "p99": 0.06, "max": 0.1},
    "drift": {
        "alarm": False,
        "samples": 12,
        "max_psi": 0.1,
        "max_feature": "f0",
        "max_cusum": 1.5,
        "prediction_psi": 0.0,
    },
    "resources": {"rss_bytes": 50_000_000, "cpu_percent": 3.5},
    "outbox": {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
}


def _examples() -> list[tuple[str, Any]]:
    """One or more instances of every message type, edge values included."""
    head = {"device_id": "ecu-1", "ts": TS, "seq": 41}
    state = State(
        **head,
        online=True,
        agent_version="0.1.0",
        target="ecu",
        runtime="onnxruntime",
        bundle=BUNDLE,
        health="ok",
        last_error=None,
    )
    will = dataclasses.replace(state, online=False, ts=None, seq=None)
    empty = State(
        **head,
        online=True,
        agent_version="0.1.0",
        target=None,
        runtime=None,
        bundle=None,
        health="no_model",
        last_error="x",
    )
    quiet = {**TELEMETRY_BODY, "model": None, "drift": None, "latency_ms": dict.fromkeys(("p50", "p95", "p99", "max"))}
    tagged = dataclasses.replace(state, tags={"site": "plant-a", "line": "3", "x.y_z-1": "A.b_c-2"})
    counted = {**TELEMETRY_BODY, "inference": {**TELEMETRY_BODY["inference"], "predicted": [0, 2, 0]}}
    nomodel = {**quiet, "inference": {**TELEMETRY_BODY["inference"], "predicted": None}}
    out: list[tuple[str, Any]] = [("State", state), ("State", will), ("State", empty), ("State", tagged)]
    out += [("Telemetry", Telemetry(**head, **TELEMETRY_BODY)), ("Telemetry", Telemetry(**head, **quiet))]
    out += [("Telemetry", Telemetry(**head, **counted)), ("Telemetry", Telemetry(**head, **nomodel))]
    out += [("Event", Event(**head, type=t, detail={"id": "c-1", "n": 2})) for t in EVENT_TYPES]
    out += [
        (
            "Samples",
            Samples(
                **head,
                command_id="c-1",
                model=ModelRef("m", 1),
                feature_names=("a", "b"),
                rows=((1.0, 2), (0.5, -3.25)),
                labels=("x", None),
                label_names=("x", "y"),
                scores=(0.0, 31.5),
            ),
        ),
        (
            "Samples",
            Samples(**head, command_id="c-2", model=None, feature_names=(), rows=(), labels=(), label_names=(), scores=()),
        ),
    ]
    out += [
        ("Command", Command(id="c-1", type="ping")),
        ("Command", Command(id="c:2", type="sample_upload", args={"max_rows": 4}, issued_at=TS)),
        ("Command", Command(id="c.3", type="status")),
        ("Command", Command(id="c.4", type="commit", args={"deploy_id": "d-1"})),
        ("Command", Command(id="c.5", type="rollback", args={"deploy_id": "d-1"}, issued_at=TS)),
        ("Command", Command(id="c.6", type="renew_cert")),
        ("Command", Command(id="c.7", type="install_cert", args={"certificate": "-----BEGIN CERTIFICATE-----\nMII=\n"})),
        ("CertificateRequest", CertificateRequest(**head, csr=_CSR, reason="requested", command_id="c.6")),
        ("CertificateRequest", CertificateRequest(**head, csr=_CSR, reason="expiring")),
    ]
    return out


def _validate(kind: str, payload: dict[str, Any]) -> None:
    jsonschema.validate(payload, {**SCHEMAS[kind], "components": ASYNCAPI["components"]})


@pytest.mark.parametrize(("kind", "message"), _examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_message_validates_against_asyncapi_and_round_trips(kind: str, message: Any) -> None:
    payload = message.to_dict()
    _validate(kind, payload)
    again = type(message).from_json(message.to_json())
    assert again == message and again.to_dict() == payload


def test_asyncapi_required_fields_are_the_types_fields() -> None:
    header = set(SCHEMAS["Header"]["required"])
    assert header == {"schema", "device_id", "ts", "seq"}
    for kind, cls in (("State", State), ("Telemetry", Telemetry), ("Event", Event), ("Samples", Samples)):
        body = {f.name for f in dataclasses.fields(cls)} - {"device_id", "ts", "seq"}
        assert set(SCHEMAS[kind]["required"]) == body, kind
        assert set(SCHEMAS[kind]["properties"]) == body, kind
    assert set(SCHEMAS["Command"]["properties"]) == {f.name for f in dataclasses.fields(Command)}
    assert SCHEMAS["Command"]["properties"]["type"]["enum"] == list(COMMAND_TYPES)
    assert SCHEMAS["Event"]["properties"]["type"]["enum"] == list(EVENT_TYPES)
    assert SCHEMAS["State"]["properties"]["health"]["enum"] == list(HEALTH_STATES)
    bundle = SCHEMAS["State"]["properties"]["bundle"]
    assert set(bundle["required"]) == {f.name for f in dataclasses.fields(BundleInfo)}
    assert set(SCHEMAS["ModelRef"]["required"]) == {f.name for f in dataclasses.fields(ModelRef)}
    for name, sub in (("inference", None), ("latency_ms", None), ("resources", None), ("outbox", None), ("drift", None)):
        assert set(SCHEMAS["Telemetry"]["properties"][name]["required"]) == set(TELEMETRY_BODY[name]), (name, sub)
    documented = {op["channel"]["$ref"].rsplit("/", 1)[-1] for op in ASYNCAPI["operations"].values()}
    assert documented == {"state", "telemetry", "events", "samples", "cmd", "ota_request", "ota_block", "csr"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"id": "c", "type": "install_cert", "args": {}}, "certificate"),
        ({"id": "c", "type": "install_cert", "args": {"certificate": "not pem"}}, "certificate"),
        ({"id": "c", "type": "install_cert", "args": {"certificate": "-----BEGIN CERTIFICATE-----" + "A" * 9000}}, "certificate"),
        ({"id": "c", "type": "install_cert", "args": {"certificate": "-----BEGIN CERTIFICATE-----", "key": "x"}}, "'key'"),
        ({"id": "c", "type": "renew_cert", "args": {"days": 3}}, "'days'"),
    ],
)
def test_certificate_commands_are_checked_field_by_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(CommandError, match=field):
        parse_command(json.dumps(payload))


def test_a_certificate_request_names_what_is_wrong() -> None:
    head = {"device_id": "d", "ts": TS}
    with pytest.raises(MessageError, match=r"csr\.csr"):
        CertificateRequest(**head, csr="-----BEGIN CERTIFICATE-----", reason="expiring")
    with pytest.raises(MessageError, match=r"csr\.reason"):
        CertificateRequest(**head, csr=_CSR, reason="because")
    with pytest.raises(MessageError, match="limit"):
        CertificateRequest.from_json(b"{" + b" " * 70_000 + b"}")


def _tagged() -> State:
    return State(
        device_id="d", ts=TS, online=True, agent_version="1", target=None, runtime=None, bundle=None, health="ok",
        last_error=None, tags={"site": "a"},
    )  # fmt: skip


def test_state_without_tags_parses_as_no_tags_and_tags_are_frozen() -> None:
    state = _tagged()
    old = {k: v for k, v in state.to_dict().items() if k != "tags"}  # an agent from before issue 9
    assert dict(State.from_dict(old).tags) == {}
    with pytest.raises(TypeError):
        state.tags["site"] = "b"  # type: ignore[index]


def test_commit_and_rollback_builders_make_valid_commands_with_fresh_ids() -> None:
    from edgeops_core import commit_command, rollback_command

    first, second = parse_command(commit_command("d-1")), parse_command(commit_command("d-1"))
    assert (first.type, dict(first.args)) == ("commit", {"deploy_id": "d-1"})
    assert first.id != second.id  # a commit refused as early can go again
    back = parse_command(rollback_command("d" * 64, command_id="c-1"))
    assert (back.id, back.type, dict(back.args)) == ("c-1", "rollback", {"deploy_id": "d" * 64})
    _validate("Command", back.to_dict())
    with pytest.raises(CommandError, match="deploy_id"):
        commit_command("no spaces")
    with pytest.raises(CommandError, match="'id'"):
        rollback_command("d-1", command_id="")


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda: State(
                device_id="dev\n",
                ts=TS,
                online=True,
                agent_version="1",
                target=None,
                runtime=None,
                bundle=None,
                health="ok",
                last_error=None,
            ),
            "device id",
        ),
        (
            lambda: State(
                device_id="d",
                ts="yesterday",
                online=True,
                agent_version="1",
                target=None,
                runtime=None,
                bundle=None,
                health="ok",
                last_error=None,
            ),
            "state.ts",
        ),
        (
            lambda: State(
                device_id="d",
                ts=TS,
                online=1,
                agent_version="1",
                target=None,
                runtime=None,
                bundle=None,
                health="ok",
                last_error=None,
            ),
            "state.online",
        ),
        (
            lambda: State(
                device_id="d",
                ts=TS,
                online=True,
                agent_version="1",
                target=None,
                runtime="torch",
                bundle=None,
                health="ok",
                last_error=None,
            ),
            "state.runtime",
        ),
        (
            lambda: State(
                device_id="d",
                ts=TS,
                online=True,
                agent_version="1",
                target=None,
                runtime=None,
                bundle=None,
                health="fine",
                last_error=None,
            ),
            "state.health",
        ),
        (lambda: dataclasses.replace(BUNDLE, sha256="AB" * 32), "bundle.sha256"),
        (lambda: dataclasses.replace(BUNDLE, slot="c"), "bundle.slot"),
        (lambda: Telemetry(device_id="d", ts=TS, seq=0, **TELEMETRY_BODY), "telemetry.seq"),
        (lambda: Telemetry(device_id="d", ts=TS, **{**TELEMETRY_BODY, "interval_s": 0}), "interval_s"),
        (
            lambda: Telemetry(
                device_id="d", ts=TS, **{**TELEMETRY_BODY, "latency_ms": {"p50": float("nan"), "p95": 1, "p99": 1, "max": 1}}
            ),
            "latency_ms.p50",
        ),
        (lambda: Telemetry(device_id="d", ts=TS, **{**TELEMETRY_BODY, "outbox": {"pending": 0}}), "telemetry.outbox"),
        (lambda: Event(device_id="d", ts=TS, type="reboot"), "event.type"),
        (lambda: Event(device_id="d", ts=TS, type="command_done", detail={"x": object()}), "JSON"),
        (
            lambda: Samples(
                device_id="d",
                ts=TS,
                command_id="c",
                model=None,
                feature_names=("a",),
                rows=((float("inf"),),),
                labels=(None,),
                label_names=(),
                scores=(0,),
            ),
            "rows[0]",
        ),
        (lambda: Command(id="a b", type="ping"), "'id'"),
        (lambda: Command(id="a", type="reboot"), "'reboot'"),
        (lambda: Command(id="a", type="sample_upload", args={"max_rows": -1}), "max_rows"),
        (lambda: Command(id="a", type="sample_upload", args={"max_rows": 2049}), "'max_rows' must be an integer 0..2048"),
        (lambda: Command(id="a", type="sample_upload", args={"rows": 1}), "unknown argument"),
        (lambda: Command(id="a", type="ping", issued_at="now"), "issued_at"),
        (lambda: Command(id="a", type="commit"), "commit 'deploy_id'"),
        (lambda: Command(id="a", type="rollback", args={"deploy_id": "d 1"}), "rollback 'deploy_id'"),
        (lambda: Command(id="a", type="commit", args={"deploy_id": "d", "force": True}), "unknown argument"),
        (lambda: dataclasses.replace(_tagged(), tags={"site": "a b"}), "state.tags.site"),
        (lambda: dataclasses.replace(_tagged(), tags={"": "a"}), "state.tags key"),
        (lambda: dataclasses.replace(_tagged(), tags={"site": 3}), "state.tags.site"),
        (lambda: dataclasses.replace(_tagged(), tags={f"k{i}": "v" for i in range(33)}), "at most 32"),
        (lambda: dataclasses.replace(_tagged(), tags=["site"]), "state.tags"),
        (
            lambda: Telemetry(
                device_id="d", ts=TS, **{**TELEMETRY_BODY, "inference": {**TELEMETRY_BODY["inference"], "predicted": [1, -2]}}
            ),
            "predicted[1]",
        ),
        (
            lambda: Telemetry(
                device_id="d", ts=TS, **{**TELEMETRY_BODY, "inference": {**TELEMETRY_BODY["inference"], "predicted": [0] * 4097}}
            ),
            "at most 4096",
        ),
    ],
)
def test_constructing_an_invalid_message_raises_message_error(build: Any, fragment: str) -> None:
    with pytest.raises(MessageError) as info:
        build()
    assert fragment in str(info.value)
    assert isinstance(info.value, InputError)


def test_messages_are_frozen_all_the_way_down() -> None:
    event = Event(device_id="d", ts=TS, type="command_done", detail={"id": "x"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.type = "drift_alarm"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.detail["id"] = "y"  # type: ignore[index]
    telemetry = Telemetry(device_id="d", ts=TS, **TELEMETRY_BODY)
    with pytest.raises(TypeError):
        telemetry.inference["errors"]["X"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xff", "not valid UTF-8 JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested"),
        (b"[]", "must be a JSON object"),
        (b'{"schema":1,"device_id":"d","ts":null}', "missing fields"),
        (json.dumps({**Event(device_id="d", ts=TS, type="drift_alarm").to_dict(), "extra": 1}).encode(), "unknown fields"),
        (json.dumps({**Event(device_id="d", ts=TS, type="drift_alarm").to_dict(), "schema": 2}).encode(), "event.schema"),
        (
            b'{"schema":1,"device_id":"d","ts":null,"seq":1,"type":"drift_alarm","detail":{"n":' + b"9" * 400 + b"}}",
            "too large",
        ),
    ],
)
def test_parsing_hostile_payloads_raises_message_error_only(payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageError) as info:
        Event.from_json(payload)
    assert fragment in str(info.value)


def test_parse_command_bounds_nesting_and_size() -> None:
    """Defect 12: nested JSON under 64 KiB raised RecursionError instead of a CommandError."""
    deep = b'{"id":"x","type":"ping","args":{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}}"
    assert len(deep) < MAX_COMMAND_BYTES
    with pytest.raises(CommandError, match="nested"):
        parse_command(deep)
    with pytest.raises(CommandError, match="nested"):
        parse_command(b'{"id":"x","type":"ping","args":{"a":' + b"[" * 9 + b"]" * 9 + b"}}")
    with pytest.raises(CommandError, match="limit is 65536"):
        parse_command(b" " * (MAX_COMMAND_BYTES + 1))
    with pytest.raises(CommandError, match="unknown field 'when'"):
        parse_command(b'{"id":"x","type":"ping","when":1}')
    cmd = parse_command(b'{"id":"x","type":"sample_upload","args":{"max_rows":3},"issued_at":"' + TS.encode() + b'"}')
    assert cmd == Command(id="x", type="sample_upload", args={"max_rows": 3}, issued_at=TS)


def test_topics_build_and_parse() -> None:
    topic = device_topic("edgeops/v1", "ecu-1", "telemetry")
    assert topic == "edgeops/v1/ecu-1/telemetry"
    assert parse_topic("edgeops/v1", topic) == ("ecu-1", "telemetry")
    assert parse_topic("site/a/edgeops", "site/a/edgeops/d.2/cmd") == ("d.2", "cmd")
    for bad in ("edgeops/v1/ecu-1", "edgeops/v2/ecu-1/state", "edgeops/v1/ecu-1/state/x", "edgeops/v1/+/state",
                "edgeops/v1/ecu-1/nope", "edgeops/v1//state"):  # fmt: skip
        with pytest.raises(InputError):
            parse_topic("edgeops/v1", bad)
    with pytest.raises(InputError):
        device_topic("edgeops/v1", "a/b", "state")
    with pytest.raises(InputError):
        device_topic("edgeops/v1", "a", "logs")


@pytest.mark.parametrize("bad", ["dev\n", "dev\r", "", "-dev", "a" * 65, "a b", "a/b", "a+", "#", "dév"])
def test_check_device_id_refuses_what_a_broker_would(bad: str) -> None:
    """Defect 19: ``re.match`` with ``$`` accepted "dev\\n"; the broker then refused every CONNECT."""
    with pytest.raises(InputError, match="device id"):
        check_device_id(bad)
    assert check_device_id("a" * 64) == "a" * 64


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_journal_acts_once_within_the_window_and_refuses_stale_commands(tmp_path: Path) -> None:
    """Defect 13: ids were forgotten after 10 000 others; now each is kept for the whole window."""
    clock = _Clock()
    journal = CommandJournal(tmp_path / "commands.sqlite", clock=clock, cap=20_050)
    first = Command(id="c-0", type="ping")
    assert journal.receive(first)
    for i in range(1, 20_001):  # twice the old limit of remembered ids
        assert journal.receive(Command(id=f"c-{i}", type="ping"))
    assert not journal.receive(first)  # the replay is still recognised
    assert (tmp_path / "commands.sqlite").stat().st_mode & 0o777 == 0o600
    journal.mark("c-0", "running")
    journal.mark("c-0", "done")
    assert journal.status("c-0") == "done" and journal.status("c-1") == "received"
    clock.now += COMMAND_WINDOW_S / 2
    assert not journal.receive(first)
    # Old enough that its id may have been pruned: refused by its issued_at instead.
    old = Command(id="c-old", type="ping", issued_at="2026-01-01T00:00:00.000000Z")
    clock.now = Command(id="t", type="ping", issued_at=TS).issued_time() or 0.0
    with pytest.raises(StaleCommandError, match="issued at"):
        journal.receive(old)
    assert journal.receive(Command(id="c-new", type="ping", issued_at=utc_now_text()))
    journal.close()


def test_journal_full_refuses_new_ids_rather_than_forgetting(tmp_path: Path) -> None:
    clock = _Clock()
    journal = CommandJournal(tmp_path / "j.sqlite", clock=clock, cap=3, window_s=100)
    for i in range(3):
        assert journal.receive(Command(id=f"c{i}", type="ping"))
    with pytest.raises(JournalFullError):
        journal.receive(Command(id="c3", type="ping"))
    assert not journal.receive(Command(id="c0", type="ping"))
    clock.now += 101  # the window passed: old ids pruned, room again
    assert journal.receive(Command(id="c3", type="ping"))
    journal.mark("c3", "running")
    journal.close()
    reopened = CommandJournal(tmp_path / "j.sqlite", clock=clock, cap=3, window_s=100)
    assert reopened.interrupted() == [("c3", "ping")]  # a crash mid-command is seen at the next start
    assert reopened.status("c3") == "failed" and reopened.interrupted() == []
    reopened.close()


def test_deploy_hold_s_is_optional_bounded_and_documented() -> None:
    from edgeops_core import OTA_PHASES, OTA_REASONS, Deploy, OtaOutcome, OtaProgress, deploy_command
    from edgeops_core.messages import MAX_HOLD_S

    digest = "ab" * 32
    deploy = Deploy(
        deploy_id="d-1", name="m", version="1", release=2, target="ecu", size=10, sha256=digest,
        block_size=4096, block_count=1, block_sha256=(digest,),
    )  # fmt: skip
    plain = parse_command(deploy_command(deploy))
    assert "hold_s" not in plain.args  # hold_s=0 leaves the payload as older consoles sent it
    held = parse_command(deploy_command(deploy, hold_s=MAX_HOLD_S))
    assert held.args["hold_s"] == MAX_HOLD_S == 7 * 86400
    args = SCHEMAS["DeployArgs"]
    jsonschema.validate(dict(held.args), {**args, "components": ASYNCAPI["components"]})
    assert args["properties"]["hold_s"]["maximum"] == MAX_HOLD_S
    for bad in (-1, MAX_HOLD_S + 1, True, 1.5, "60"):
        with pytest.raises(CommandError, match="hold_s"):
            deploy_command(deploy, hold_s=bad)  # type: ignore[arg-type]
        with pytest.raises(CommandError, match="hold_s"):
            parse_command(json.dumps({"id": "c", "type": "deploy", "args": {**deploy.to_args(), "hold_s": bad}}))
    assert "held" in OTA_PHASES and SCHEMAS["OtaProgress"]["properties"]["phase"]["enum"] == list(OTA_PHASES)
    _validate("OtaProgress", OtaProgress("d-1", 2, "held", 1, 1).to_dict())
    assert {"console_rollback", "hold_expired"} <= set(OTA_REASONS)
    expired = OtaOutcome(type="ota_committed", deploy_id="d-1", release=2, reason="hold_expired", message="held 60 s")
    back = OtaOutcome(type="ota_rolled_back", deploy_id="d-1", release=2, reason="console_rollback", message="by the console")
    for outcome in (expired, back):
        _validate("OtaOutcome", dict(outcome.to_event("ecu-1", TS).detail))
    with pytest.raises(MessageError, match="no reason"):
        OtaOutcome(type="ota_committed", deploy_id="d-1", release=2, reason="console_rollback", message="x")
    with pytest.raises(MessageError, match="ota_committed only"):
        OtaOutcome(type="ota_failed", deploy_id="d-1", release=2, reason="hold_expired", message="x")
    with pytest.raises(MessageError, match="message"):
        OtaOutcome(type="ota_committed", deploy_id="d-1", release=2, reason="hold_expired")
