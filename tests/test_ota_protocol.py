"""The OTA wire contract (ADR 0012): deploy, block frames, block requests, progress, outcomes, topics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import struct
from typing import Any

import jsonschema
import pytest

from conftest import REPO
from edgeops_core import (
    BLOCK_HEADER_BYTES,
    BLOCK_MAGIC,
    BLOCK_REFUSALS,
    DEFAULT_PREFIX,
    EVENT_TYPES,
    LEAVES,
    MAX_BLOCK_BYTES,
    MAX_BLOCKS,
    MAX_BUNDLE_BYTES,
    MAX_REQUEST_BLOCKS,
    OTA_FINAL_EVENTS,
    OTA_PHASES,
    OTA_REASONS,
    BlockError,
    BlockFrame,
    BlockRequest,
    CommandError,
    Deploy,
    Event,
    InputError,
    MessageError,
    OtaOutcome,
    OtaProgress,
    State,
    choose_block_size,
    deploy_command,
    device_topic,
    parse_topic,
)
from edgeops_core.messages import MAX_COMMAND_BYTES, MAX_REQUEST_BYTES

ASYNCAPI = json.loads((REPO / "docs" / "asyncapi.json").read_text())
SCHEMAS = ASYNCAPI["components"]["schemas"]
TS = "2026-12-01T05:00:00.000001Z"


def _validate(kind: str, payload: Any) -> None:
    jsonschema.validate(payload, {**SCHEMAS[kind], "components": ASYNCAPI["components"]})


def make_deploy(data: bytes, *, block_size: int = 4096, deploy_id: str = "d-1", release: int = 2, target: str = "ecu") -> Deploy:
    """A deploy describing ``data`` (the tests' stand-in for ``edgeops_fleet.announce``)."""
    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
    return Deploy(
        deploy_id=deploy_id,
        name="sensor",
        version=f"1.{release}.0",
        release=release,
        target=target,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        block_size=block_size,
        block_count=len(blocks),
        block_sha256=tuple(hashlib.sha256(b).hexdigest() for b in blocks),
    )


DATA = random.Random(7).randbytes(10_496)  # 10 496 bytes: 2 full blocks of 4 KiB and a short one of 2 304
DEPLOY = make_deploy(DATA)


# -- deploy ------------------------------------------------------------------------------------


def test_deploy_round_trips_through_the_command_and_matches_asyncapi() -> None:
    payload = deploy_command(DEPLOY, issued_at=TS)
    doc = json.loads(payload)
    assert doc["id"] == "d-1" and doc["type"] == "deploy" and doc["issued_at"] == TS
    _validate("DeployArgs", doc["args"])
    again = Deploy.from_args(doc["args"])
    assert again == DEPLOY and again.block_sha256 == DEPLOY.block_sha256
    assert set(SCHEMAS["DeployArgs"]["required"]) == {f.name for f in dataclasses.fields(Deploy)}
    assert [DEPLOY.block_length(i) for i in range(3)] == [4096, 4096, 2304]
    assert json.loads(deploy_command(DEPLOY, command_id="c-9"))["id"] == "c-9"


def test_the_largest_bundle_fits_one_command() -> None:
    """256 MiB at the default block size would be 4096 blocks: the size doubles until 512 fit in 64 KiB."""
    assert choose_block_size(1024 * 1024) == 64 * 1024
    block = choose_block_size(MAX_BUNDLE_BYTES)
    assert block == 512 * 1024 and MAX_BUNDLE_BYTES // block == MAX_BLOCKS
    longest = {"deploy_id": "x" * 64, "name": "n" * 128, "version": "v" * 64, "target": "t" * 64}
    sizes = {"size": MAX_BUNDLE_BYTES, "block_size": block, "block_count": MAX_BLOCKS, "block_sha256": ("f" * 64,) * MAX_BLOCKS}
    big = Deploy.from_args({**DEPLOY.to_args(), **longest, **sizes})
    assert len(deploy_command(big, issued_at=TS)) < MAX_COMMAND_BYTES
    for bad in (0, MAX_BUNDLE_BYTES + 1, True):
        with pytest.raises(MessageError, match="size"):
            choose_block_size(bad)
    with pytest.raises(MessageError, match="power of two"):
        choose_block_size(100, 5000)


BAD_DEPLOY = [
    ({"deploy_id": "bad id"}, "deploy_id"),
    ({"deploy_id": ""}, "deploy_id"),
    ({"name": ""}, "name"),
    ({"name": "a\nb"}, "name"),
    ({"version": 3}, "version"),
    ({"target": "x" * 65}, "target"),
    ({"release": 0}, "release"),
    ({"release": True}, "release"),
    ({"release": 1.5}, "release"),
    ({"size": 0}, "size"),
    ({"size": MAX_BUNDLE_BYTES + 1}, "size"),
    ({"sha256": "AB" * 32}, "sha256"),
    ({"sha256": "ab" * 31}, "sha256"),
    ({"block_size": 5000}, "block_size"),
    ({"block_size": 2048}, "block_size"),
    ({"block_size": 2 * MAX_BLOCK_BYTES}, "block_size"),
    ({"block_count": 4}, "block_count"),
    ({"block_count": 2}, "block_count"),
    ({"block_count": 3.0}, "block_count"),
    ({"size": 10_496.0}, "size"),
    ({"block_sha256": DEPLOY.block_sha256[:2]}, "block_sha256"),
    ({"block_sha256": "ab" * 32}, "block_sha256"),
    ({"block_sha256": (*DEPLOY.block_sha256[:2], "zz" * 32)}, r"block_sha256\[2\]"),
    ({"size": 4096 * (MAX_BLOCKS + 1), "block_count": MAX_BLOCKS + 1}, "limit is 512"),
]


@pytest.mark.parametrize(("change", "fragment"), BAD_DEPLOY)
def test_malformed_deploy_is_refused(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CommandError, match=fragment):
        Deploy.from_args({**DEPLOY.to_args(), **change})


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "an object"),
        ({k: v for k, v in DEPLOY.to_args().items() if k != "sha256"}, r"missing \['sha256'\]"),
        ({**DEPLOY.to_args(), "url": "http://x"}, r"unknown \['url'\]"),
    ],
)
def test_deploy_args_must_be_exactly_the_fields(args: Any, fragment: str) -> None:
    with pytest.raises(CommandError, match=fragment):
        Deploy.from_args(args)


def test_deploy_command_refuses_a_bad_id_or_time() -> None:
    with pytest.raises(CommandError, match="'id'"):
        deploy_command(DEPLOY, command_id="no spaces")
    with pytest.raises(CommandError, match="issued_at"):
        deploy_command(DEPLOY, issued_at="yesterday")


# -- block frames ------------------------------------------------------------------------------


def test_block_frame_round_trips_with_a_fixed_binary_header() -> None:
    frame = DEPLOY.frame(2, DATA[8192:])
    wire = frame.to_bytes()
    assert len(wire) == BLOCK_HEADER_BYTES + 2304 == 20 + 2304
    assert wire[:4] == BLOCK_MAGIC and wire[4:12] == DEPLOY.tag and struct.unpack(">II", wire[12:20]) == (2, 2304)
    assert wire[20:] == DATA[8192:]  # the bytes themselves, not base64
    parsed = BlockFrame.parse(wire)
    assert parsed == frame
    DEPLOY.check_frame(parsed)  # no error
    assert BlockFrame.parse(memoryview(bytearray(wire))) == frame


def _header(magic: bytes = BLOCK_MAGIC, tag: bytes = DEPLOY.tag, index: int = 0, length: int = 4096) -> bytes:
    return struct.pack(">4s8sII", magic, tag, index, length)


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        (b"", "shorter than its 20-byte header"),
        (_header()[:19], "shorter"),
        (_header(magic=b"EOB2") + DATA[:4096], "magic"),
        (_header(length=4095) + DATA[:4096], "says 4095 bytes, carries 4096"),
        (_header(length=4097) + DATA[:4096], "says 4097"),
        (_header(length=MAX_BLOCK_BYTES + 1) + b"\0" * (MAX_BLOCK_BYTES + 1), "limit"),
    ],
)
def test_malformed_frames_are_refused(wire: bytes, fragment: str) -> None:
    with pytest.raises(BlockError, match=fragment) as info:
        BlockFrame.parse(wire)
    assert info.value.reason == "malformed" and isinstance(info.value, MessageError)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (BlockFrame(tag=make_deploy(DATA, deploy_id="d-2").tag, index=0, data=DATA[:4096]), "foreign"),
        (BlockFrame(tag=make_deploy(DATA[:-1]).tag, index=0, data=DATA[:4096]), "foreign"),  # same id, other bundle
        (BlockFrame(tag=DEPLOY.tag, index=3, data=DATA[:4096]), "out_of_range"),
        (BlockFrame(tag=DEPLOY.tag, index=2**32 - 1, data=b""), "out_of_range"),
        (BlockFrame(tag=DEPLOY.tag, index=2, data=DATA[:4096]), "wrong_length"),  # the last block is short
        (BlockFrame(tag=DEPLOY.tag, index=0, data=DATA[:4095]), "wrong_length"),
        (BlockFrame(tag=DEPLOY.tag, index=1, data=DATA[:4096]), "corrupt"),  # block 0's bytes at index 1
        (BlockFrame(tag=DEPLOY.tag, index=0, data=b"\1" + DATA[1:4096]), "corrupt"),
    ],
)
def test_frames_that_are_not_this_deploys_block_are_refused_with_their_reason(frame: BlockFrame, reason: str) -> None:
    with pytest.raises(BlockError) as info:
        DEPLOY.check_frame(BlockFrame.parse(frame.to_bytes()))
    assert info.value.reason == reason and reason in BLOCK_REFUSALS


def test_sender_side_frame_checks() -> None:
    with pytest.raises(BlockError, match="out of range"):
        DEPLOY.frame(3, b"")
    with pytest.raises(BlockError, match="must be 2304 bytes"):
        DEPLOY.frame(2, DATA[:4096])
    for bad in ({"tag": b"short"}, {"index": -1}, {"index": True}, {"data": "text"}):
        with pytest.raises(BlockError, match="block"):
            BlockFrame(**{"tag": DEPLOY.tag, "index": 0, "data": b"", **bad})  # type: ignore[arg-type]


# -- block requests ----------------------------------------------------------------------------


def test_block_request_round_trips_and_matches_asyncapi() -> None:
    request = BlockRequest(device_id="ecu-1", ts=TS, deploy_id="d-1", blocks=[0, 5, 511])
    assert request.blocks == (0, 5, 511)
    payload = request.to_dict()
    _validate("BlockRequest", payload)
    assert BlockRequest.from_json(request.to_json()) == request
    assert set(SCHEMAS["BlockRequest"]["required"]) == {"deploy_id", "blocks"}
    full = BlockRequest(device_id="ecu-1", ts=TS, deploy_id="x" * 64, blocks=tuple(range(MAX_REQUEST_BLOCKS)))
    assert len(full.to_json()) < MAX_REQUEST_BYTES // 2


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"blocks": []}, "1..64"),
        ({"blocks": list(range(65))}, "1..64"),
        ({"blocks": [3, 2]}, "increasing"),
        ({"blocks": [2, 2]}, "increasing"),
        ({"blocks": [-1]}, ">= 0"),
        ({"blocks": [True]}, ">= 0"),
        ({"blocks": [512]}, "below 512"),
        ({"blocks": "0-4"}, "a list"),
        ({"deploy_id": "a b"}, "deploy_id"),
        ({"deploy_id": None}, "deploy_id"),
        ({"schema": 2}, "schema"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_malformed_block_request_is_refused(change: dict[str, Any], fragment: str) -> None:
    raw = {"schema": 1, "device_id": "ecu-1", "ts": TS, "seq": None, "deploy_id": "d-1", "blocks": [1], **change}
    with pytest.raises(MessageError, match=fragment):
        BlockRequest.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [(b"[" * 100_000, "limit is 4096"), (b"\xff{}", "UTF-8"), (b"[1]", "JSON object"), (b"{" + b" " * 5000 + b"}", "limit")],
)
def test_hostile_block_request_bytes_are_refused(payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        BlockRequest.from_json(payload)


# -- progress and outcomes ---------------------------------------------------------------------


def _state(**extra: Any) -> State:
    return State(
        device_id="ecu-1", ts=TS, seq=3, online=True, agent_version="0.1.0", target="ecu", runtime=None,
        bundle=None, health="no_model", last_error=None, **extra,
    )  # fmt: skip


def test_state_carries_ota_progress_and_validates_against_asyncapi() -> None:
    progress = OtaProgress(deploy_id="d-1", release=2, phase="fetching", blocks_received=1, blocks_total=3)
    for state in (_state(ota=progress), _state()):
        payload = state.to_dict()
        _validate("State", payload)
        assert State.from_json(state.to_json()) == state
    assert _state().to_dict()["ota"] is None
    old = {k: v for k, v in _state().to_dict().items() if k != "ota"}  # an agent from before OTA
    assert State.from_dict(old).ota is None
    assert SCHEMAS["OtaProgress"]["properties"]["phase"]["enum"] == list(OTA_PHASES)
    event = progress.to_event("ecu-1", TS)
    _validate("Event", event.to_dict())
    _validate("OtaProgress", dict(event.detail))
    assert OtaProgress.parse(Event.from_json(event.to_json()).detail) == progress


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"blocks_received": 4}, "<= blocks_total"),
        ({"phase": "downloading"}, "phase"),
        ({"blocks_total": 0}, "blocks_total"),
        ({"release": 0}, "release"),
        ({"deploy_id": ""}, "deploy_id"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_malformed_progress_is_refused(raw: dict[str, Any], fragment: str) -> None:
    base = {"deploy_id": "d-1", "release": 2, "phase": "fetching", "blocks_received": 1, "blocks_total": 3}
    with pytest.raises(MessageError, match=fragment):
        State.from_dict({**_state().to_dict(), "ota": {**base, **raw}})


def test_final_events_round_trip_and_match_asyncapi() -> None:
    assert set(OTA_FINAL_EVENTS) < set(EVENT_TYPES) and "ota_progress" in EVENT_TYPES
    assert SCHEMAS["OtaOutcome"]["properties"]["reason"]["enum"] == [*OTA_REASONS, None]
    outcomes = [
        OtaOutcome(type="ota_committed", deploy_id="d-1", release=2),
        OtaOutcome(type="ota_rolled_back", deploy_id="d-1", release=2, reason="health_check", message="p99 3 ms > 2 ms"),
        OtaOutcome(type="ota_failed", deploy_id="d-1", release=2, reason="deadline", message="not complete after 60 s"),
    ]
    for outcome in outcomes:
        event = outcome.to_event("ecu-1", TS)
        _validate("Event", event.to_dict())
        _validate("OtaOutcome", dict(event.detail))
        assert OtaOutcome.from_event(Event.from_json(event.to_json())) == outcome


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"type": "ota_done"}, "outcome type"),
        ({"type": "ota_committed", "reason": "deadline", "message": "x"}, "no reason"),
        ({"type": "ota_failed"}, "reason"),
        ({"type": "ota_failed", "reason": "because", "message": "x"}, "reason"),
        ({"type": "ota_failed", "reason": "deadline", "message": ""}, "message"),
        ({"type": "ota_failed", "reason": "deadline", "message": "x", "release": 0}, "release"),
    ],
)
def test_malformed_outcome_is_refused(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        OtaOutcome(**{"deploy_id": "d-1", "release": 2, **fields})


def test_outcome_from_a_foreign_event_is_refused() -> None:
    with pytest.raises(MessageError, match=r"event\.type"):
        OtaOutcome.from_event(Event(device_id="ecu-1", ts=TS, type="drift_alarm"))
    with pytest.raises(MessageError, match="missing"):
        OtaOutcome.from_event(Event(device_id="ecu-1", ts=TS, type="ota_failed", detail={"deploy_id": "d-1"}))


# -- topics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("leaf", ["ota_request", "ota_block", "cmd"])
def test_ota_topics_stay_in_the_devices_subtree(leaf: str) -> None:
    topic = device_topic(DEFAULT_PREFIX, "ecu-7", leaf)
    assert topic == f"edgeops/v1/ecu-7/{leaf}"  # matched by the ACL `pattern readwrite edgeops/v1/%u/#`
    assert parse_topic(DEFAULT_PREFIX, topic) == ("ecu-7", leaf)
    assert leaf in LEAVES
    assert ASYNCAPI["channels"][leaf]["address"] == f"edgeops/v1/{{device_id}}/{leaf}"


@pytest.mark.parametrize("topic", ["edgeops/v1/ecu-7/ota_block/x", "edgeops/v1/ota_block", "edgeops/v1/ecu 7/ota_request"])
def test_bad_ota_topics_are_refused(topic: str) -> None:
    with pytest.raises(InputError):
        parse_topic(DEFAULT_PREFIX, topic)
