"""Root and release-key metadata (edgeops_core.trust): thresholds, replay, expiry, rotation, revocation, bounds.

Pure functions on documents signed here with fresh keys; no agent, no build.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeops_core import CommandError, ManifestError, TrustedKey, TrustError, parse_command
from edgeops_core.messages import MAX_COMMAND_BYTES, trust_update_command
from edgeops_core.trust import (
    MAX_METADATA_BYTES,
    MAX_ROOT_CHAIN,
    TrustState,
    canonical_bytes,
    load_metadata,
    parse_release_keys,
    parse_root,
    plan_update,
    trust_update_args,
    trusted_release_keys,
    verify_release_keys,
    verify_root,
    verify_root_update,
)
from test_manifest import make_manifest

NOW = datetime(2026, 6, 1, tzinfo=UTC)
LATER = "2027-06-01T00:00:00Z"
PAST = "2026-05-01T00:00:00Z"


@dataclass(frozen=True)
class Key:
    private: ec.EllipticCurvePrivateKey
    pem: str
    id: str


def key() -> Key:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(private, pem.decode(), TrustedKey.from_pem(pem).fingerprint)


def sign(signed: dict[str, Any], *signers: Key) -> dict[str, Any]:
    message = canonical_bytes(signed)
    sigs = [
        {"keyid": k.id, "sig": base64.b64encode(k.private.sign(message, ec.ECDSA(hashes.SHA256()))).decode()} for k in signers
    ]
    return {"signed": signed, "signatures": sigs}


def root_doc(version: int, keys: list[Key], threshold: int, *signers: Key, expires: str = LATER) -> dict[str, Any]:
    body = {"_type": "root", "spec_version": 1, "version": version, "expires": expires,
            "keys": {k.id: k.pem for k in keys}, "threshold": threshold}  # fmt: skip
    return sign(body, *signers)


def list_doc(version: int, keys: list[Key], *signers: Key, revoked: tuple[str, ...] = (), expires: str = LATER) -> dict[str, Any]:
    body = {"_type": "release-keys", "spec_version": 1, "version": version, "expires": expires,
            "keys": {k.id: k.pem for k in keys}, "revoked": list(revoked)}  # fmt: skip
    return sign(body, *signers)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {name: key() for name in ("r1", "r2", "r3", "n1", "n2", "a", "b", "c")}


@pytest.fixture(scope="module")
def root1(keys: dict[str, Key]) -> Any:
    """Root v1: two keys, threshold 2."""
    k = keys
    return parse_root(root_doc(1, [k["r1"], k["r2"]], 2, k["r1"], k["r2"]))


def _state(root1: Any, keys: dict[str, Key], version: int = 4) -> TrustState:
    k = keys
    doc = parse_release_keys(list_doc(version, [k["a"]], k["r1"], k["r2"]))
    return TrustState(root=root1, release_keys=doc, revoked=frozenset())


def test_canonical_bytes_are_the_documented_json() -> None:
    signed = {"b": [1, "é"], "a": {"y": 1, "x": "\n"}}
    assert canonical_bytes(signed) == json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_bytes(signed) == '{"a":{"x":"\\n","y":1},"b":[1,"é"]}'.encode()


def test_a_list_signed_by_a_threshold_of_root_keys_is_trusted(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    verify_root(root1, NOW)
    doc = parse_release_keys(list_doc(1, [k["a"], k["b"]], k["r1"], k["r2"]))
    verify_release_keys(root1, doc, None, NOW)
    state = plan_update(TrustState(root=root1), (), doc, NOW).state
    assert [t.fingerprint for t in trusted_release_keys(state, NOW)] == sorted([k["a"].id, k["b"].id])


def test_a_list_signed_below_the_threshold_is_refused(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    cases = {
        "one root key": list_doc(5, [k["a"]], k["r1"]),
        "a root key and a stranger": list_doc(5, [k["a"]], k["r1"], k["c"]),
        "the release key itself": list_doc(5, [k["a"]], k["a"]),
    }
    for why, raw in cases.items():
        doc = parse_release_keys(raw)
        with pytest.raises(TrustError, match=r"^release-key list has 1 valid root signature, threshold is 2$"
                           if why != "the release key itself" else r"has 0 valid root signatures, threshold is 2"):  # fmt: skip
            verify_release_keys(root1, doc, 4, NOW)
    # A signature by the same root key twice is malformed, never counted twice.
    twice = list_doc(5, [k["a"]], k["r1"], k["r1"])
    with pytest.raises(TrustError, match="two signatures by key"):
        parse_release_keys(twice)


def test_extra_signatures_and_invalid_ones_count_for_nothing(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    raw = list_doc(5, [k["a"]], k["c"], k["r1"], k["r2"], k["n1"])  # two strangers beside the threshold
    verify_release_keys(root1, parse_release_keys(raw), 4, NOW)
    tampered = copy.deepcopy(raw)
    sig = bytearray(base64.b64decode(tampered["signatures"][1]["sig"]))
    sig[-1] ^= 0x01
    tampered["signatures"][1]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(TrustError, match="has 1 valid root signature, threshold is 2"):
        verify_release_keys(root1, parse_release_keys(tampered), 4, NOW)
    changed = copy.deepcopy(raw)
    changed["signed"]["keys"][k["b"].id] = k["b"].pem  # a key slipped in after signing
    with pytest.raises(TrustError, match="has 0 valid root signatures"):
        verify_release_keys(root1, parse_release_keys(changed), 4, NOW)
    # The same bytes spelled with non-zero padding bits (not canonical base64). ECDSA signatures vary
    # in length, so the test makes one whose encoding is padded, and sets the last character's unused bits.
    sig_bytes = base64.b64decode(raw["signatures"][1]["sig"])
    sig_bytes = sig_bytes if len(sig_bytes) % 3 else sig_bytes[:-1]
    canonical = base64.b64encode(sig_bytes).decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = len(canonical.rstrip("=")) - 1
    loose = canonical[:last] + alphabet[alphabet.index(canonical[last]) + 1] + canonical[last + 1 :]
    assert base64.b64decode(loose) == sig_bytes and loose != canonical
    padded = copy.deepcopy(raw)
    padded["signatures"][1]["sig"] = loose
    with pytest.raises(TrustError, match=r"signatures\[1\]\.sig is not canonical base64"):
        parse_release_keys(padded)


def test_replayed_older_and_same_version_lists_are_refused(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    state = _state(root1, keys)
    older = parse_release_keys(list_doc(3, [k["a"], k["b"]], k["r1"], k["r2"]))
    with pytest.raises(TrustError, match=r"^release-key list version 3 is not newer than the trusted version 4 \(replay\)$"):
        plan_update(state, (), older, NOW)
    same_version = parse_release_keys(list_doc(4, [k["b"]], k["r1"], k["r2"]))
    with pytest.raises(TrustError, match="version 4 is not newer than the trusted version 4"):
        plan_update(state, (), same_version, NOW)
    # The very document again (a redelivered command) is a success that changes nothing.
    again = plan_update(state, (), state.release_keys, NOW)
    assert not again.changed and again.state == state and again.detail()["changed"] is False


def test_expired_metadata_stops_new_installs_but_not_revocations(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    state = _state(root1, keys)
    stale = parse_release_keys(list_doc(5, [k["b"]], k["r1"], k["r2"], revoked=(k["a"].id,), expires=PAST))
    with pytest.raises(TrustError, match=r"^release-key list version 5 expired on 2026-05-01T00:00:00Z"):
        plan_update(state, (), stale, NOW)
    # Trusted metadata that expires later: no key for a new install (freeze attack) ...
    later = NOW + timedelta(days=400)
    with pytest.raises(TrustError, match=r"root version 1 expired on 2027-06-01T00:00:00Z.*installed model keeps serving"):
        trusted_release_keys(state, later)
    # ... and the expiry of the list alone does the same.
    short = parse_release_keys(list_doc(5, [k["b"]], k["r1"], k["r2"], expires="2026-07-01T00:00:00Z"))
    state5 = plan_update(state, (), short, NOW).state
    with pytest.raises(TrustError, match="release-key list version 5 expired on 2026-07-01"):
        trusted_release_keys(state5, NOW + timedelta(days=60))


def test_root_rotation_must_be_signed_by_the_old_root_and_itself(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    new = [k["n1"], k["n2"]]
    good = parse_root(root_doc(2, new, 1, k["r1"], k["r2"], k["n1"]))
    verify_root_update(root1, good, NOW)
    only_new = parse_root(root_doc(2, new, 1, k["n1"], k["n2"]))
    with pytest.raises(TrustError, match=r"^root version 2 is not signed by the previous root \(TUF 5\.3\.4\): 0 valid"):
        verify_root_update(root1, only_new, NOW)
    half_old = parse_root(root_doc(2, new, 1, k["r1"], k["n1"]))
    with pytest.raises(
        TrustError,
        match=r"not signed by the previous root \(TUF 5\.3\.4\): 1 valid signature\(s\) of root version 1's keys, threshold is 2",
    ):
        verify_root_update(root1, half_old, NOW)
    only_old = parse_root(root_doc(2, new, 1, k["r1"], k["r2"]))
    with pytest.raises(TrustError, match="root version 2 has 0 valid signatures by its own keys, threshold is 1"):
        verify_root_update(root1, only_old, NOW)
    skipped = parse_root(root_doc(3, new, 1, k["r1"], k["r2"], k["n1"]))
    with pytest.raises(TrustError, match="root version 3 does not follow the trusted version 1"):
        verify_root_update(root1, skipped, NOW)
    with pytest.raises(TrustError, match=r"root version 1 is not newer than the trusted version 1 \(replay\)"):
        verify_root_update(root1, root1, NOW)


def test_a_root_chain_applies_in_one_update_and_old_roots_are_skipped(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    state = _state(root1, keys)
    # v2 expired long ago (the device was offline): fine as an intermediate step (TUF 5.3.10).
    v2 = parse_root(root_doc(2, [k["n1"]], 1, k["r1"], k["r2"], k["n1"], expires=PAST))
    v3 = parse_root(root_doc(3, [k["n2"]], 1, k["n1"], k["n2"]))
    listed = parse_release_keys(list_doc(5, [k["b"]], k["n2"], revoked=(k["a"].id,)))
    update = plan_update(state, (v2, v3), listed, NOW)
    assert [r.version for r in update.roots] == [2, 3] and update.newly_revoked == (k["a"].id,)
    assert update.state.root == v3 and update.detail() == {
        "root_version": 3, "keys_version": 5, "revoked": [k["a"].id], "revoked_total": 1, "changed": True,
    }  # fmt: skip
    # The whole history again (what a console sends): roots already trusted are skipped.
    assert not plan_update(update.state, (root1, v2, v3), listed, NOW).changed
    # A chain ending below the trusted root is a replay; a root of the trusted version must be it.
    with pytest.raises(TrustError, match=r"root version 2 is not newer than the trusted version 3 \(replay\)"):
        plan_update(update.state, (root1, v2), None, NOW)
    other_v3 = parse_root(root_doc(3, [k["n1"]], 1, k["n1"], k["n2"]))
    with pytest.raises(TrustError, match="root version 3 differs from the trusted root"):
        plan_update(update.state, (other_v3,), None, NOW)
    # The last root must not be expired.
    v3_stale = parse_root(root_doc(3, [k["n2"]], 1, k["n1"], k["n2"], expires=PAST))
    with pytest.raises(TrustError, match="root version 3 expired on"):
        plan_update(state, (v2, v3_stale), listed, NOW)


def test_a_root_rotation_needs_a_list_the_new_root_signed(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    state = _state(root1, keys)
    v2 = parse_root(root_doc(2, [k["n1"]], 1, k["r1"], k["r2"], k["n1"]))
    with pytest.raises(TrustError, match="send a release-key list signed by the new root in the same trust_update"):
        plan_update(state, (v2,), None, NOW)
    # A rotation that keeps the root keys keeps the list valid.
    same_keys = parse_root(root_doc(2, [k["r1"], k["r2"]], 1, k["r1"], k["r2"]))
    assert plan_update(state, (same_keys,), None, NOW).state.release_keys == state.release_keys


def test_a_revoked_key_is_never_trusted_again(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    state = _state(root1, keys)
    revoke = parse_release_keys(list_doc(5, [k["b"]], k["r1"], k["r2"], revoked=(k["a"].id,)))
    state = plan_update(state, (), revoke, NOW).state
    forgets = parse_release_keys(list_doc(6, [k["a"], k["b"]], k["r1"], k["r2"]))  # lists a again, revokes nothing
    state = plan_update(state, (), forgets, NOW).state
    assert state.revoked == {k["a"].id}
    assert [t.fingerprint for t in trusted_release_keys(state, NOW)] == [k["b"].id]
    only_revoked = parse_release_keys(list_doc(7, [k["a"]], k["r1"], k["r2"]))
    with pytest.raises(TrustError, match="release-key list version 7 trusts no key: every key it lists is revoked"):
        trusted_release_keys(plan_update(state, (), only_revoked, NOW).state, NOW)
    with pytest.raises(TrustError, match="both lists and revokes key"):
        parse_release_keys(list_doc(8, [k["a"]], k["r1"], revoked=(k["a"].id,)))


def test_a_key_listed_under_another_keys_id_is_refused(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    raw = list_doc(5, [k["a"]], k["r1"], k["r2"])
    body = raw["signed"]
    body["keys"] = {k["b"].id: k["a"].pem}  # a's key under b's id
    doc = parse_release_keys(sign(body, k["r1"], k["r2"]))
    with pytest.raises(TrustError, match=r"lists a key under id .*but that key's id"):
        verify_release_keys(root1, doc, 4, NOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["signed"].update(extra=1), r"must have exactly the fields .*unknown \['extra'\]"),
        (lambda d: d["signed"].pop("revoked"), r"missing \['revoked'\]"),
        (lambda d: d["signed"].update(version=0), "version must be an integer 1.."),
        (lambda d: d["signed"].update(version=True), "version must be an integer"),
        (lambda d: d["signed"].update(spec_version=2), "spec_version must be an integer 1..1"),
        (lambda d: d["signed"].update(expires="tomorrow"), "expires must be UTC text"),
        (lambda d: d["signed"].update(expires="2026-02-30T00:00:00Z"), "is not a date"),
        (lambda d: d["signed"].update(_type="root"), "must have _type 'release-keys'"),
        (lambda d: d["signed"]["keys"].update({"ab": "-----BEGIN PUBLIC KEY-----"}), "must be a key id"),
        (lambda d: d["signed"].update(revoked=["0" * 64] * 2), "revokes a key id twice"),
        (lambda d: d.update(extra=[]), "release-key list document must have exactly the fields"),
        (lambda d: d.update(signatures={}), "signatures must be a list"),
        (lambda d: d["signatures"].append({"keyid": "0" * 64}), r"signatures\[2\] must have exactly the fields"),
        (lambda d: d["signatures"].append({"keyid": "0" * 64, "sig": "!!"}), "is not valid base64"),
    ],
)
def test_malformed_lists_are_refused_with_one_line(keys: dict[str, Key], change: Any, message: str) -> None:
    k = keys
    raw = list_doc(5, [k["a"]], k["r1"], k["r2"])
    change(raw)
    with pytest.raises(TrustError, match=message) as info:
        parse_release_keys(raw)
    assert "\n" not in str(info.value)


def test_huge_and_deep_documents_are_typed_errors(keys: dict[str, Key]) -> None:
    with pytest.raises(TrustError, match=f"is {MAX_METADATA_BYTES + 1} bytes, the limit is {MAX_METADATA_BYTES}"):
        load_metadata(b" " * (MAX_METADATA_BYTES + 1))
    with pytest.raises(TrustError, match="nested"):
        load_metadata(b"[" * 10_000 + b"]" * 10_000)
    with pytest.raises(TrustError, match="nested"):
        load_metadata(json.dumps({"signed": {"keys": {"a": {"b": {"c": 1}}}}}).encode())
    with pytest.raises(TrustError, match="not valid JSON"):
        load_metadata(b"\xff\xfe")
    k = keys
    many = list_doc(5, [k["a"]], k["r1"], k["r2"])
    many["signatures"] += [{"keyid": f"{i:064x}", "sig": "AA=="} for i in range(31)]
    with pytest.raises(TrustError, match="has 33 signatures, at most 32"):
        parse_release_keys(many)
    huge_key = list_doc(5, [k["a"]], k["r1"])
    huge_key["signed"]["keys"][k["a"].id] = "-----BEGIN PUBLIC KEY-----" + "A" * 2000
    with pytest.raises(TrustError, match="must be a PEM public key of at most 1024 characters"):
        parse_release_keys(huge_key)


def test_a_pem_that_has_no_utf8_form_is_a_refusal_not_a_crash(root1: Any, keys: dict[str, Key]) -> None:
    """A lone surrogate ("\\ud800" is valid JSON) passed the structure checks, then broke the canonical bytes."""
    k = keys
    bad = list_doc(5, [k["a"]], k["r1"], k["r2"])
    bad["signed"]["keys"][k["a"].id] += "\ud800"
    with pytest.raises(TrustError, match="ASCII only"):
        parse_release_keys(bad)
    with pytest.raises(TrustError, match="ASCII only"):
        parse_release_keys(load_metadata(json.dumps(bad).encode()))  # as it arrives: an escape in JSON text
    with pytest.raises(CommandError, match="ASCII only"):
        parse_command(json.dumps({"id": "t-1", "type": "trust_update", "args": {"release_keys": bad}}))
    with pytest.raises(TrustError, match="no canonical form"):
        canonical_bytes({"keys": {"x": "\ud800"}})


def test_a_document_with_a_field_twice_is_refused(root1: Any, keys: dict[str, Key]) -> None:
    """json.loads keeps the last of two equal names: a signer and a verifier could read two documents."""
    text = json.dumps(list_doc(5, [keys["a"]], keys["r1"], keys["r2"]))
    twice = text.replace('"revoked": []', '"revoked": ["' + "a" * 64 + '"], "revoked": []')
    assert twice != text
    with pytest.raises(TrustError, match="object has the name 'revoked' twice"):
        load_metadata(twice.encode())
    with pytest.raises(CommandError, match="twice"):
        parse_command(b'{"id": "t-1", "id": "t-2", "type": "ping"}')


def test_trust_update_command_args_are_checked_on_the_wire(root1: Any, keys: dict[str, Key]) -> None:
    k = keys
    listed = list_doc(5, [k["a"]], k["r1"], k["r2"])
    payload = trust_update_command([root1.to_dict()], listed, command_id="t-1")
    cmd = parse_command(payload)
    roots, doc = trust_update_args(cmd.args)
    assert roots == (root1,) and doc is not None and doc.version == 5
    for args, message in [
        ({}, "carries neither a root nor a release-key list"),
        ({"root": [], "extra": 1}, "unknown argument 'extra'"),
        ({"root": [root1.to_dict(), root1.to_dict()]}, "oldest first"),
        ({"release_keys": {"signed": {}, "signatures": []}}, "release-key list document must have _type"),
    ]:
        with pytest.raises(CommandError, match=f"trust_update: .*{message}"):
            parse_command(json.dumps({"id": "t-2", "type": "trust_update", "args": args}))
    # The chain bound; on the wire the command's 64 KiB usually binds first.
    with pytest.raises(TrustError, match=f"at most {MAX_ROOT_CHAIN} root documents"):
        trust_update_args({"root": [root1.to_dict()] * (MAX_ROOT_CHAIN + 1)})
    deep: Any = "x"
    for _ in range(10):
        deep = [deep]
    with pytest.raises(CommandError, match="nested"):
        parse_command(json.dumps({"id": "t-3", "type": "trust_update", "args": {"release_keys": deep}}))
    with pytest.raises(CommandError, match="the limit is"):
        parse_command(b'{"id":"t-4","type":"trust_update","args":{"root":[' + b" " * MAX_COMMAND_BYTES + b"]}}")


def test_a_manifest_carries_a_structurally_valid_list_only(keys: dict[str, Key]) -> None:
    k = keys
    listed = list_doc(5, [k["a"]], k["r1"], k["r2"])
    m = make_manifest(release_keys=listed)
    assert type(m).from_json(m.to_json()).release_keys == listed
    assert b'"release_keys"' not in make_manifest().to_json()  # absent unless set: old manifests are unchanged
    with pytest.raises(ManifestError, match="field 'release_keys': release-key list"):
        make_manifest(release_keys={"signed": {}, "signatures": []})


def test_trust_update_args_match_the_asyncapi_schema(root1: Any, keys: dict[str, Key]) -> None:
    import jsonschema

    from conftest import REPO

    asyncapi = json.loads((REPO / "docs" / "asyncapi.json").read_text())
    schema = {**asyncapi["components"]["schemas"]["TrustUpdateArgs"], "components": asyncapi["components"]}
    k = keys
    args = parse_command(trust_update_command([root1.to_dict()], list_doc(5, [k["a"]], k["r1"], k["r2"]))).to_dict()["args"]
    jsonschema.validate(args, schema)
    assert "trust_update" in asyncapi["components"]["schemas"]["Command"]["properties"]["type"]["enum"]
