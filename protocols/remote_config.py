"""The `apply_config` command's arguments: a new site config for a gateway (DESIGN.md §6).

Central's API and store hold the readable form::

    {"site_toml": "[gateway]\\nid = \\"gw-1\\"\\n…", "profiles": {"pump-v2.yaml": "id: …"}}

`profiles` (optional, file name → YAML text) are device profiles that go with the config.
On the wire, inside the signed command body, the same map travels compressed so that a real
site file fits the command body limit (`protocols.commands.MAX_BODY_BYTES`, 4096 bytes)::

    {"z": <zlib (RFC 1950) of the canonical CBOR of the readable form>}

The text may be at most `MAX_CONFIG_BYTES` (64 KiB, UTF-8, profiles included) once
inflated; the compressed form must fit the body limit (`examples/site.toml` with 50 device
tables, 12 KB, compresses to 2.3 KB). Inflating stops at the limit, so a small body
cannot expand into a large one. Everything here is pure.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from protocols.errors import FieldError

MAX_CONFIG_BYTES = 64 * 1024
MAX_PROFILES = 16
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.ya?ml$")


class RemoteConfigError(FieldError):
    """The config arguments have the wrong shape, size or encoding."""


@dataclass(frozen=True, slots=True)
class ApplyConfig:
    """Replace the gateway's site config (and add or replace profiles), with rollback."""

    site_toml: str
    profiles: tuple[tuple[str, str], ...] = ()

    kind = "apply_config"

    @property
    def target(self) -> str:
        return ""

    def readable(self) -> dict[str, Any]:
        """The API's and the store's form."""
        out: dict[str, Any] = {"site_toml": self.site_toml}
        if self.profiles:
            out["profiles"] = dict(self.profiles)
        return out

    def to_wire(self) -> dict[str, Any]:
        return {"z": zlib.compress(cbor2.dumps(self.readable(), canonical=True), 9)}


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RemoteConfigError(where, "expected a string")
    if "\x00" in value:
        raise RemoteConfigError(where, "contains NUL")
    return value


def _readable(args: Mapping[str, Any], where: str) -> ApplyConfig:
    extra = set(args) - {"site_toml", "profiles"}
    if extra:
        raise RemoteConfigError(f"{where}.{sorted(map(str, extra))[0]}", "unknown field")
    if "site_toml" not in args:
        raise RemoteConfigError(f"{where}.site_toml", "missing")
    site = _text(args["site_toml"], f"{where}.site_toml")
    raw = args.get("profiles", {})
    if not isinstance(raw, Mapping) or len(raw) > MAX_PROFILES:
        raise RemoteConfigError(f"{where}.profiles",
                                f"expected a map of at most {MAX_PROFILES} file names to text")
    profiles = []
    for name in sorted(raw, key=str):
        if not isinstance(name, str) or not _PROFILE_NAME_RE.match(name):
            raise RemoteConfigError(f"{where}.profiles", f"bad file name {str(name)[:70]!r}: "
                                                         "expected <name>.yaml")
        profiles.append((name, _text(raw[name], f"{where}.profiles.{name}")))
    size = len(site.encode()) + sum(len(t.encode()) for _, t in profiles)
    if size > MAX_CONFIG_BYTES:
        raise RemoteConfigError(where, f"{size} bytes of config exceed {MAX_CONFIG_BYTES}")
    return ApplyConfig(site_toml=site, profiles=tuple(profiles))


def _inflate(z: object, where: str) -> Mapping[str, Any]:
    if not isinstance(z, bytes):
        raise RemoteConfigError(where, "expected a byte string")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(z, MAX_CONFIG_BYTES * 2)
    except zlib.error as exc:
        raise RemoteConfigError(where, f"not zlib: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise RemoteConfigError(where, "truncated, or inflates past the config size limit")
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise RemoteConfigError(where, f"not CBOR: {exc}") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise RemoteConfigError(where, "expected a map with string keys")
    return obj


def apply_config_from_mapping(args: Mapping[str, Any], where: str = "args") -> ApplyConfig:
    """The typed arguments from the wire form (`{"z": …}`) or the readable form (API, store);
    raises `RemoteConfigError`."""
    if set(args) == {"z"}:
        return _readable(_inflate(args["z"], f"{where}.z"), f"{where}.z")
    return _readable(args, where)
