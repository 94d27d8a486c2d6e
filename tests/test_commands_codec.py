"""The signed command codec (DESIGN.md §6): exact bytes, signatures, round trips, garbage."""

from __future__ import annotations

import base64

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import example, given
from hypothesis import strategies as st

from protocols import command_keys as k
from protocols import command_results as r
from protocols import commands as c

# RFC 8032 §7.1, TEST 1: secret key, its public key, and the signature of the empty message.
RFC_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
    "6bd25bf5f0595bbe24655141438e7a100b")
KEY = Ed25519PrivateKey.from_private_bytes(RFC_SECRET)
PUB = KEY.public_key()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

T0 = 1_718_000_000_000
WRITE = c.make_command("c1", gw="gw-1", args=c.WritePoint("gas-1", "sample_interval_s", 30),
                       issued_at_ms=T0, ttl_ms=3_600_000)
# The canonical CBOR of WRITE, written out by hand: keys shortest first, then bytewise
# (RFC 8949 §4.2.3), shortest integer heads.
WRITE_BODY = bytes.fromhex("".join([
    "a7",  # map(7)
    "62" "6777" "64" "67772d31",  # "gw": "gw-1"
    "64" "61726773" "a3",  # "args": map(3)
    "65" "706f696e74" "71" "73616d706c655f696e74657276616c5f73",  # "point": "sample_interval_s"
    "65" "76616c7565" "181e",  # "value": 30
    "66" "646576696365" "65" "6761732d31",  # "device": "gas-1"
    "64" "6b696e64" "6b" "77726974655f706f696e74",  # "kind": "write_point"
    "66" "636d645f6964" "62" "6331",  # "cmd_id": "c1"
    "66" "746172676574" "77" "6761732d312f73616d706c655f696e74657276616c5f73",  # "target": ...
    "69" "6973737565645f6174" "1b" "0000019000c79c00",  # "issued_at": 1718000000000
    "6a" "657870697265735f6174" "1b" "0000019000fe8a80",  # "expires_at": 1718003600000
]))


def _resign(obj: object, key: Ed25519PrivateKey = KEY, *, canonical: bool = True) -> bytes:
    body = cbor2.dumps(obj, canonical=canonical)
    return c.encode_envelope(c.SignedCommand(body=body, sig=key.sign(body)))


def test_body_bytes_are_the_documented_canonical_map() -> None:
    """A write_point command encodes to exactly the hand-written canonical CBOR and back."""
    assert c.encode_body(WRITE) == WRITE_BODY
    assert c.decode_body(WRITE_BODY) == WRITE
    assert cbor2.loads(WRITE_BODY) == {
        "cmd_id": "c1", "issued_at": T0, "expires_at": T0 + 3_600_000, "gw": "gw-1",
        "target": "gas-1/sample_interval_s", "kind": "write_point",
        "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}}


def test_envelope_carries_body_and_ed25519_signature() -> None:
    """The envelope is {v, t:"cmd", body, sig} and sig is Ed25519 over the body bytes."""
    payload = c.sign_command(KEY, WRITE)
    wire = cbor2.loads(payload)
    assert set(wire) == {"v", "t", "body", "sig"}
    assert (wire["v"], wire["t"], wire["body"]) == (1, "cmd", WRITE_BODY)
    PUB.verify(wire["sig"], WRITE_BODY)  # raises if not a signature over exactly these bytes
    assert c.open_command(PUB, payload) == WRITE


def test_signature_is_checked_before_the_body_is_believed() -> None:
    """RFC 8032 TEST 1: a valid signature of an empty body passes, then the body fails to decode."""
    assert k.public_key_raw(k.parse_public_key(base64.b64encode(RFC_PUBLIC))) == RFC_PUBLIC
    signed = c.SignedCommand(body=b"", sig=RFC_SIG_EMPTY)
    with pytest.raises(c.MalformedCommandError):
        c.verify_command(PUB, signed)
    with pytest.raises(c.BadSignatureError):
        c.verify_command(OTHER.public_key(), signed)


def test_forged_and_tampered_commands_fail_the_signature() -> None:
    """Another key's signature, or one changed body byte, is a BadSignatureError naming the cmd_id."""
    forged = c.sign_command(OTHER, WRITE)
    with pytest.raises(c.BadSignatureError) as info:
        c.open_command(PUB, forged)
    assert info.value.cmd_id == "c1"
    wire = cbor2.loads(c.sign_command(KEY, WRITE))
    body = wire["body"].replace(b"\x18\x1e", b"\x18\x1f")  # value 30 -> 31
    tampered = c.encode_envelope(c.SignedCommand(body=body, sig=wire["sig"]))
    with pytest.raises(c.BadSignatureError):
        c.open_command(PUB, tampered)


def test_non_canonical_bodies_are_refused_even_when_signed() -> None:
    """A signed body in another key order or with a long integer head is NonCanonicalCommandError."""
    obj = cbor2.loads(WRITE_BODY)
    reordered = dict(sorted(obj.items()))  # alphabetical, not length-first
    with pytest.raises(c.NonCanonicalCommandError):
        c.open_command(PUB, _resign(reordered, canonical=False))
    long_head = WRITE_BODY.replace(b"\x18\x1e", b"\x19\x00\x1e")  # 30 as a 2-byte integer
    with pytest.raises(c.NonCanonicalCommandError):
        c.decode_body(long_head)


def test_duplicate_keys_cannot_hide_behind_the_signature() -> None:
    """A body with "value" twice decodes to one of them, so it is not canonical: refused."""
    dup = WRITE_BODY.replace(b"\xa3", b"\xa4", 1).replace(
        b"\x65value\x18\x1e", b"\x65value\x18\x1e\x65value\x18\x63", 1)
    with pytest.raises(c.CommandError):
        c.decode_body(dup)


@pytest.mark.parametrize(("change", "error", "field"), [
    ({"target": "gas-1"}, c.MalformedCommandError, "body.target"),
    ({"kind": "reboot"}, c.UnknownCommandKindError, None),
    ({"gw": "bad/gw"}, c.MalformedCommandError, "body.gw"),
    ({"cmd_id": ""}, c.MalformedCommandError, "body.cmd_id"),
    ({"expires_at": T0}, c.MalformedCommandError, "expires_at"),
    ({"expires_at": T0 + c.MAX_TTL_MS + 1}, c.MalformedCommandError, "expires_at"),
    ({"issued_at": "now"}, c.MalformedCommandError, "body.issued_at"),
    ({"args": {"device": "gas-1", "point": "x", "value": None}}, c.MalformedCommandError,
     "body.args.value"),
    ({"args": {"device": "gas-1", "point": "x"}}, c.MalformedCommandError, "body.args.value"),
    ({"extra": 1}, c.MalformedCommandError, "body.extra"),
])
def test_bad_fields_are_typed_errors(change: dict[str, object], error: type[Exception],
                                     field: str | None) -> None:
    """Each bad field of a correctly signed body raises its own error class naming the field."""
    obj = {**cbor2.loads(WRITE_BODY), **change}
    with pytest.raises(error) as info:
        c.open_command(PUB, _resign(obj))
    if field is not None:
        assert info.value.field == field  # type: ignore[attr-defined]


def test_envelope_version_type_and_shape() -> None:
    """A future version, another message type or a short signature are refused at the envelope."""
    good = cbor2.loads(c.sign_command(KEY, WRITE))
    with pytest.raises(c.UnsupportedCommandVersionError):
        c.decode_envelope(cbor2.dumps({**good, "v": 2}))
    with pytest.raises(c.UnsupportedCommandVersionError):
        c.decode_envelope(cbor2.dumps({**good, "v": True}))
    with pytest.raises(c.MalformedCommandError) as info:
        c.decode_envelope(cbor2.dumps({**good, "t": "ack"}))
    assert info.value.field == "t"
    with pytest.raises(c.MalformedCommandError) as info:
        c.decode_envelope(cbor2.dumps({**good, "sig": good["sig"][:63]}))
    assert info.value.field == "sig"


def test_kinds_args_and_targets() -> None:
    """Each kind builds from its API/wire args and derives its target."""
    assert c.args_from_mapping("set_poll_interval", {"device": "d1", "seconds": 2.5}) == \
        c.SetPollInterval("d1", 2.5)
    assert c.args_from_mapping("set_poll_interval", {"device": "d1", "seconds": 2}).target == "d1"
    assert c.args_from_mapping("request_diagnostics", {}).target == ""
    assert c.args_from_mapping("sync_time", {"central_ms": 5}) == c.SyncTime(5)
    with pytest.raises(c.MalformedCommandError):
        c.args_from_mapping("set_poll_interval", {"device": "d1", "seconds": 0})
    with pytest.raises(c.MalformedCommandError):
        c.args_from_mapping("request_diagnostics", {"verbose": True})
    with pytest.raises(c.UnknownCommandKindError):
        c.args_from_mapping("reboot", {})


def test_public_key_forms() -> None:
    """A pinned key may be base64 of the raw 32 bytes or PEM; anything else is BadKeyError."""
    assert k.public_key_raw(k.parse_public_key(k.public_key_b64(PUB))) == RFC_PUBLIC
    assert k.public_key_raw(k.parse_public_key(k.public_key_pem(PUB))) == RFC_PUBLIC
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*spki).decode()
    x25519_pem = x25519.X25519PrivateKey.generate().public_key().public_bytes(*spki).decode()
    for bad in ("", "not base64!", base64.b64encode(b"short").decode(),
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", p256, x25519_pem,
                k.public_key_pem(PUB).replace("PUBLIC KEY", "PRIVATE KEY")):
        with pytest.raises(k.BadKeyError):
            k.parse_public_key(bad)
        with pytest.raises(k.BadKeyError):  # the check a gateway makes at start, without cryptography
            k.PinnedKey(bad)
    pinned = k.PinnedKey(k.public_key_pem(PUB).replace("\n", "\r\n"))
    assert pinned.raw == RFC_PUBLIC


def test_result_attrs_round_trip_and_state_order() -> None:
    """Result attrs are flat {cmd_id, state, reason?, ...data}; states only rank upwards."""
    res = r.CommandResult("c1", r.CommandState.SUCCEEDED, kind="write_point",
                          data={"readback": 30})
    attrs = r.result_attrs(res)
    assert attrs == {"cmd_id": "c1", "state": "succeeded", "kind": "write_point", "readback": 30}
    assert r.parse_result_attrs(attrs) == res
    forged = r.CommandResult("c9", r.CommandState.REJECTED, r.Reason.BAD_SIGNATURE, verified=False)
    assert r.result_attrs(forged)["verified"] is False
    assert not r.parse_result_attrs(r.result_attrs(forged)).affects_state
    replay = r.CommandResult("c1", r.CommandState.REJECTED, r.Reason.REPLAY)
    assert not replay.affects_state and res.affects_state
    S = r.CommandState
    assert S.PENDING.rank < S.SENT.rank < S.RECEIVED.rank < S.EXECUTING.rank < S.SUCCEEDED.rank
    assert {s.rank for s in r.TERMINAL} == {S.FAILED.rank}
    with pytest.raises(c.MalformedCommandError):
        r.result_attrs(r.CommandResult("c1", S.SENT))  # central's own state
    with pytest.raises(c.MalformedCommandError):
        r.parse_result_attrs({"cmd_id": "c1", "state": "succeeded", "reason": "because"})


# --- hypothesis ---------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**64 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
args = st.one_of(
    st.builds(c.WritePoint, device=names, point=names, value=scalars),
    st.builds(c.SetPollInterval, device=names,
              seconds=st.floats(min_value=0.001, max_value=86_400) | st.integers(1, 86_400)),
    st.just(c.RequestDiagnostics()),
    st.builds(c.SyncTime, central_ms=st.integers(0, 2**53 - 1)),
)
commands = st.builds(lambda i, gw, a, t, ttl: c.make_command(i, gw=gw, args=a, issued_at_ms=t,
                                                               ttl_ms=ttl),
                     names, names, args, st.integers(0, 2**52), st.integers(1, c.MAX_TTL_MS))


@given(commands)
def test_command_round_trip(cmd: c.Command) -> None:
    """decode_body(encode_body(cmd)) == cmd, and a signed command opens to itself."""
    assert c.decode_body(c.encode_body(cmd)) == cmd
    assert c.open_command(PUB, c.sign_command(KEY, cmd)) == cmd


@given(st.binary(max_size=300))
def test_garbage_raises_only_command_errors(raw: bytes) -> None:
    """Arbitrary bytes as an envelope or a body raise a CommandError, nothing else."""
    for fn in (c.decode_envelope, c.decode_body, lambda b: c.open_command(PUB, b)):
        try:
            fn(raw)
        except c.CommandError:
            pass
    assert c.peek_cmd_id(raw) is None or isinstance(c.peek_cmd_id(raw), str)


@given(commands, st.integers(0, 10_000), st.integers(1, 255))
def test_flipped_bytes_never_open(cmd: c.Command, where: int, xor: int) -> None:
    """Any single changed byte of a signed payload is refused with a CommandError."""
    payload = bytearray(c.sign_command(KEY, cmd))
    payload[where % len(payload)] ^= xor
    with pytest.raises(c.CommandError):
        c.open_command(PUB, bytes(payload))


@given(st.dictionaries(st.sampled_from(["cmd_id", "state", "reason", "detail", "kind",
                                        "verified", "readback"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                                 st.sampled_from(["c1", "received", "replay", "expired"]))))
@example({"cmd_id": "0", "state": "received", "detail": ""})  # found once: "" came back None
def test_result_attrs_garbage_raises_only_command_errors(attrs: dict[str, object]) -> None:
    """Any attrs map either parses into a CommandResult or raises a CommandError."""
    try:
        res = r.parse_result_attrs(attrs)
    except c.CommandError:
        return
    assert r.parse_result_attrs(r.result_attrs(res)) == res
