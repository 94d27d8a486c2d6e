"""Signed commands from central to a gateway, and the results the gateway reports (DESIGN.md §6).

A command is a CBOR map, encoded canonically (RFC 8949 §4.2.3 "length-first" key order,
shortest integer and float forms, definite lengths, no tags)::

    {"cmd_id": "5f0c…", "issued_at": 1718000000000, "expires_at": 1718003600000,
     "gw": "gw-1", "target": "gas-1/sample_interval_s", "kind": "write_point",
     "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}}

Times are Unix epoch milliseconds. `target` names what the command acts on inside the
gateway: `device/point` for `write_point`, `device` for `set_poll_interval`, `""` for the
gateway itself; it is derived from `args` and must agree with them.

It travels on `fieldlink/v1/{gw}/down/cmd` inside a signed envelope::

    {"v": 1, "t": "cmd", "body": <the command's canonical CBOR bytes>, "sig": <64 bytes>}

`sig` is Ed25519 (RFC 8032) by central's key over exactly the `body` bytes. The gateway
verifies the bytes it received, then decodes them, and accepts a body only if re-encoding it
canonically gives the same bytes, so one command has one byte form and no parser ambiguity
(duplicate keys, long integer forms) can slip past the signature.

The states a gateway reports back are in `protocols.command_results`.

Everything here is pure: the signing functions take `cryptography` key objects, and nothing
reads files or the clock. `cryptography` itself is imported by the functions that sign or
verify; central's public key as text and as a gateway pins it is `protocols.command_keys`.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import cbor2

from protocols.callresp import CallRespError, PlayWarning, play_warning_from_mapping
from protocols.command_keys import VerifyKey
from protocols.errors import DetailedError, FieldError, ProtocolError
from protocols.remote_config import ApplyConfig, RemoteConfigError, apply_config_from_mapping

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

VERSION = 1
SIG_BYTES = 64  # RFC 8032 §5.1.6: an Ed25519 signature is 64 bytes
MAX_BODY_BYTES = 4096
MAX_ENVELOPE_BYTES = 8192
# The longest a command may live. The gateway keeps executed cmd_ids for longer than this, so
# a replay is always caught either as a replay or as expired.
MAX_TTL_MS = 7 * 86_400_000
MAX_POLL_INTERVAL_S = 86_400.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BODY_KEYS = frozenset({"cmd_id", "issued_at", "expires_at", "gw", "target", "kind", "args"})
_ENVELOPE_KEYS = frozenset({"v", "t", "body", "sig"})
_MAX_STR = 256
_MAX_TIME_MS = 2**53


# --- errors --------------------------------------------------------------------------------


class CommandError(ProtocolError):
    """Base of every command codec error."""


class MalformedCommandError(CommandError, FieldError):
    """The bytes are not a command, or a field has the wrong shape or value."""


class UnsupportedCommandVersionError(CommandError):
    def __init__(self, version: object) -> None:
        super().__init__(f"unsupported command envelope version {version!r}"
                         f" (this side speaks {VERSION})")
        self.version = version


class UnknownCommandKindError(CommandError, DetailedError):
    template = "unknown command kind {kind!r}"
    kind: object


class NonCanonicalCommandError(CommandError):
    """The body decodes, but is not the canonical CBOR of what it decodes to."""

    def __init__(self) -> None:
        super().__init__("command body is not canonical CBOR")


class BadSignatureError(CommandError):
    """The signature does not verify with the pinned key (forged, altered, or another key)."""

    def __init__(self, cmd_id: str | None = None) -> None:
        super().__init__("command signature does not verify"
                         + (f" (cmd_id {cmd_id})" if cmd_id else ""))
        self.cmd_id = cmd_id


# --- kinds --------------------------------------------------------------------------------


class CommandKind(enum.StrEnum):
    WRITE_POINT = "write_point"
    SET_POLL_INTERVAL = "set_poll_interval"
    REQUEST_DIAGNOSTICS = "request_diagnostics"
    SYNC_TIME = "sync_time"
    PLAY_WARNING = "play_warning"  # 叫应: args are `protocols.callresp.PlayWarning`
    APPLY_CONFIG = "apply_config"  # args are `protocols.remote_config.ApplyConfig`


# --- commands ------------------------------------------------------------------------------

Scalar: TypeAlias = bool | int | float | str


@dataclass(frozen=True, slots=True)
class WritePoint:
    """Write one writable point of a device; the gateway reads it back to confirm."""

    device: str
    point: str
    value: Scalar

    kind = CommandKind.WRITE_POINT

    @property
    def target(self) -> str:
        return f"{self.device}/{self.point}"

    def to_wire(self) -> dict[str, Any]:
        return {"device": self.device, "point": self.point, "value": self.value}


@dataclass(frozen=True, slots=True)
class SetPollInterval:
    """Change a device's poll interval at runtime (until the agent restarts)."""

    device: str
    seconds: float

    kind = CommandKind.SET_POLL_INTERVAL

    @property
    def target(self) -> str:
        return self.device

    def to_wire(self) -> dict[str, Any]:
        return {"device": self.device, "seconds": self.seconds}


@dataclass(frozen=True, slots=True)
class RequestDiagnostics:
    """Report health, backlog and versions in the result."""

    kind = CommandKind.REQUEST_DIAGNOSTICS

    @property
    def target(self) -> str:
        return ""

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class SyncTime:
    """Measure the gateway clock against central's (`central_ms`, taken when published)."""

    central_ms: int

    kind = CommandKind.SYNC_TIME

    @property
    def target(self) -> str:
        return ""

    def to_wire(self) -> dict[str, Any]:
        return {"central_ms": self.central_ms}


CommandArgs: TypeAlias = (WritePoint | SetPollInterval | RequestDiagnostics | SyncTime
                          | PlayWarning | ApplyConfig)


@dataclass(frozen=True, slots=True)
class Command:
    cmd_id: str
    issued_at_ms: int
    expires_at_ms: int
    gw: str
    args: CommandArgs

    @property
    def kind(self) -> CommandKind:
        return CommandKind(self.args.kind)

    @property
    def target(self) -> str:
        return self.args.target

    @property
    def ttl_ms(self) -> int:
        return self.expires_at_ms - self.issued_at_ms

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_at_ms


@dataclass(frozen=True, slots=True)
class SignedCommand:
    """The envelope: canonical body bytes and the Ed25519 signature over them."""

    body: bytes
    sig: bytes


def check_cmd_id(cmd_id: object, where: str = "cmd_id") -> str:
    """Return `cmd_id` when it is 1-64 of [A-Za-z0-9_.-] starting alphanumeric."""
    if not isinstance(cmd_id, str) or not _ID_RE.match(cmd_id):
        raise MalformedCommandError(where, "expected 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    return cmd_id


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _KEY_RE.match(value):
        raise MalformedCommandError(where, "expected a name of 1-64 [A-Za-z0-9_.-]")
    return value


def _int(value: object, where: str) -> int:
    if type(value) is not int:
        raise MalformedCommandError(where, f"expected int, got {type(value).__name__}")
    return value


def _scalar(value: object, where: str) -> Scalar:
    if isinstance(value, bool) or type(value) is int:
        if type(value) is int and not -(2**63) <= value < 2**64:
            raise MalformedCommandError(where, "integer out of range")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise MalformedCommandError(where, "not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > _MAX_STR:
            raise MalformedCommandError(where, f"string longer than {_MAX_STR}")
        return value
    raise MalformedCommandError(
        where, f"expected bool, int, float or str, got {type(value).__name__}")


def _exact_keys(args: Mapping[str, Any], keys: set[str], where: str) -> None:
    extra = set(args) - keys
    missing = keys - set(args)
    if missing:
        raise MalformedCommandError(f"{where}.{sorted(missing)[0]}", "missing")
    if extra:
        raise MalformedCommandError(f"{where}.{sorted(map(str, extra))[0]}", "unknown field")


def args_from_mapping(kind: object, args: object, where: str = "args") -> CommandArgs:
    """Build the typed arguments of `kind` from a mapping (the wire form, or an API body)."""
    try:
        k = CommandKind(kind)  # type: ignore[arg-type]  # untrusted: CommandKind() is the check
    except ValueError:
        raise UnknownCommandKindError(kind) from None
    if not isinstance(args, Mapping) or not all(isinstance(x, str) for x in args):
        raise MalformedCommandError(where, "expected a map with string keys")
    if k is CommandKind.WRITE_POINT:
        _exact_keys(args, {"device", "point", "value"}, where)
        return WritePoint(device=_name(args["device"], f"{where}.device"),
                          point=_name(args["point"], f"{where}.point"),
                          value=_scalar(args["value"], f"{where}.value"))
    if k is CommandKind.SET_POLL_INTERVAL:
        _exact_keys(args, {"device", "seconds"}, where)
        seconds = args["seconds"]
        if isinstance(seconds, bool) or type(seconds) not in (int, float):
            raise MalformedCommandError(f"{where}.seconds", "expected a number")
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_POLL_INTERVAL_S):
            raise MalformedCommandError(
                f"{where}.seconds", f"expected 0 < seconds <= {MAX_POLL_INTERVAL_S:g}")
        return SetPollInterval(device=_name(args["device"], f"{where}.device"), seconds=seconds)
    if k is CommandKind.REQUEST_DIAGNOSTICS:
        _exact_keys(args, set(), where)
        return RequestDiagnostics()
    if k is CommandKind.PLAY_WARNING:
        try:
            return play_warning_from_mapping(args, where)
        except CallRespError as exc:
            raise MalformedCommandError(exc.field, exc.reason) from None
    if k is CommandKind.APPLY_CONFIG:
        try:
            return apply_config_from_mapping(args, where)
        except RemoteConfigError as exc:
            raise MalformedCommandError(exc.field, exc.reason) from None
    _exact_keys(args, {"central_ms"}, where)
    central_ms = _int(args["central_ms"], f"{where}.central_ms")
    if not 0 <= central_ms < _MAX_TIME_MS:
        raise MalformedCommandError(f"{where}.central_ms", f"must be 0..{_MAX_TIME_MS - 1}")
    return SyncTime(central_ms=central_ms)


def make_command(cmd_id: str, *, gw: str, args: CommandArgs, issued_at_ms: int,
                 ttl_ms: int) -> Command:
    """A checked command (`ttl_ms` in 1..MAX_TTL_MS); raises `MalformedCommandError`."""
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise MalformedCommandError("expires_at", f"lifetime must be 1..{MAX_TTL_MS} ms")
    cmd = Command(cmd_id=check_cmd_id(cmd_id), issued_at_ms=issued_at_ms,
                  expires_at_ms=issued_at_ms + ttl_ms, gw=_name(gw, "gw"), args=args)
    _check_command(cmd)
    return cmd


def _check_command(cmd: Command) -> None:
    # Times stay below 2**53 so that they survive JSON (central's API) unchanged.
    if not 0 <= cmd.issued_at_ms < _MAX_TIME_MS:
        raise MalformedCommandError("issued_at", f"must be 0..{_MAX_TIME_MS - 1}")
    if cmd.expires_at_ms >= _MAX_TIME_MS:
        raise MalformedCommandError("expires_at", f"must be below {_MAX_TIME_MS}")
    if not 0 < cmd.ttl_ms <= MAX_TTL_MS:
        raise MalformedCommandError("expires_at", f"must be 1..{MAX_TTL_MS} ms after issued_at")


# --- body ----------------------------------------------------------------------------------


def encode_body(cmd: Command) -> bytes:
    """The canonical CBOR bytes of a command (what is signed)."""
    wire = {"cmd_id": cmd.cmd_id, "issued_at": cmd.issued_at_ms, "expires_at": cmd.expires_at_ms,
            "gw": cmd.gw, "target": cmd.target, "kind": str(cmd.kind), "args": cmd.args.to_wire()}
    try:
        body = cbor2.dumps(wire, canonical=True)
    except (TypeError, ValueError, OverflowError, cbor2.CBOREncodeError) as exc:
        raise MalformedCommandError("body", f"cannot encode: {exc}") from exc
    if len(body) > MAX_BODY_BYTES:
        raise MalformedCommandError("body", f"{len(body)} bytes exceed {MAX_BODY_BYTES}")
    return body


def _load_map(data: object, field: str, limit: int) -> dict[Any, Any]:
    """The CBOR map in `data` (bytes of at most `limit`); errors name `field`."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedCommandError(field, "expected bytes")
    if len(data) > limit:
        raise MalformedCommandError(field, f"{len(data)} bytes exceed {limit}")
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise MalformedCommandError(field, f"not CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedCommandError(field, "top level is not a map")
    return obj


def decode_body(body: bytes) -> Command:
    """Decode canonical command bytes; raises only `CommandError` subclasses."""
    obj = _load_map(body, "body", MAX_BODY_BYTES)
    if not all(isinstance(k, str) for k in obj):
        raise MalformedCommandError("body", "keys must be strings")
    _exact_keys(obj, set(_BODY_KEYS), "body")
    kind = obj["kind"]
    if not isinstance(kind, str):
        raise MalformedCommandError("body.kind", "expected a string")
    cmd = Command(cmd_id=check_cmd_id(obj["cmd_id"], "body.cmd_id"),
                  issued_at_ms=_int(obj["issued_at"], "body.issued_at"),
                  expires_at_ms=_int(obj["expires_at"], "body.expires_at"),
                  gw=_name(obj["gw"], "body.gw"),
                  args=args_from_mapping(kind, obj["args"], "body.args"))
    if obj["target"] != cmd.target:
        raise MalformedCommandError("body.target", f"expected {cmd.target!r} for these args")
    _check_command(cmd)
    try:
        canonical = cbor2.dumps(obj, canonical=True)
    except Exception as exc:  # pragma: no cover - a decoded, checked map always encodes
        raise NonCanonicalCommandError() from exc
    if canonical != bytes(body):
        raise NonCanonicalCommandError()
    return cmd


def peek_cmd_id(body: bytes) -> str | None:
    """The cmd_id a body claims, if it has a well-formed one, without trusting anything else.

    Used to name an unverifiable command in the rejection report; never raises.
    """
    try:
        obj = cbor2.loads(body)
        return check_cmd_id(obj["cmd_id"]) if isinstance(obj, dict) else None
    except Exception:  # any garbage simply has no usable cmd_id
        return None


# --- envelope ------------------------------------------------------------------------------


def encode_envelope(signed: SignedCommand) -> bytes:
    if len(signed.sig) != SIG_BYTES:
        raise MalformedCommandError("sig", f"expected {SIG_BYTES} bytes")
    return cbor2.dumps({"v": VERSION, "t": "cmd", "body": bytes(signed.body),
                        "sig": bytes(signed.sig)}, canonical=True)


def decode_envelope(payload: bytes) -> SignedCommand:
    """Split a `down/cmd` payload into body and signature; raises only `CommandError`s."""
    obj = _load_map(payload, "payload", MAX_ENVELOPE_BYTES)
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise UnsupportedCommandVersionError(obj.get("v"))
    if obj.get("t") != "cmd":
        raise MalformedCommandError("t", f"expected 'cmd', got {obj.get('t')!r}")
    if set(obj) != _ENVELOPE_KEYS:
        raise MalformedCommandError(
            "payload", f"expected exactly the keys {sorted(_ENVELOPE_KEYS)}")
    body, sig = obj["body"], obj["sig"]
    if not isinstance(body, bytes):
        raise MalformedCommandError("body", "expected a byte string")
    if not isinstance(sig, bytes) or len(sig) != SIG_BYTES:
        raise MalformedCommandError("sig", f"expected {SIG_BYTES} bytes")
    return SignedCommand(body=body, sig=sig)


# --- signing -------------------------------------------------------------------------------


def sign_command(key: Ed25519PrivateKey, cmd: Command) -> bytes:
    """The `down/cmd` payload for `cmd`, signed with central's key."""
    body = encode_body(cmd)
    return encode_envelope(SignedCommand(body=body, sig=key.sign(body)))


def verify_command(public_key: VerifyKey, signed: SignedCommand) -> Command:
    """Check the signature over the body bytes, then decode them.

    Raises `BadSignatureError` (with the cmd_id the body claims, if any) before anything in the
    body is believed, or a decode error for a correctly signed but malformed body.
    """
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signed.sig, signed.body)
    except InvalidSignature:
        raise BadSignatureError(peek_cmd_id(signed.body)) from None
    return decode_body(signed.body)


def open_command(public_key: VerifyKey, payload: bytes) -> Command:
    """decode_envelope + verify_command."""
    return verify_command(public_key, decode_envelope(payload))
