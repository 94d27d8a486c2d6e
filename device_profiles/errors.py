"""The errors of the device_profiles package, and how a profile error finds its place: the
file, the dotted field (`points[2].type`) and the line of the YAML node it is about."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeAlias

import yaml

from device_profiles.decoding import MISSING, DecodeError, Issue, Loc, loc_str
from protocols.errors import DetailedError


class DeviceProfileError(Exception):
    """Base of every error of the device_profiles package."""


class ProfileError(DeviceProfileError):
    """A profile file is unreadable or invalid; names the file, the field and the line."""

    def __init__(self, path: str | Path, field: str, message: str, line: int | None = None):
        self.path = str(path)
        self.field = field
        self.message = message
        self.line = line
        where = f"{self.path}:{line}" if line is not None else f"{self.path}:"
        super().__init__(f"{where} {field}: {message}" if field else f"{where} {message}")


class DuplicateProfileError(ProfileError):
    """Two files define the same profile id."""


class ProfileNotFoundError(DeviceProfileError):
    """No profile with that id in the searched folders."""

    def __init__(self, profile_id: str, searched: Iterable[Path]) -> None:
        self.profile_id = profile_id
        self.searched = tuple(searched)
        where = ", ".join(str(p) for p in self.searched)
        super().__init__(f"no profile {profile_id!r} in {where}")


class ProtocolMismatchError(DeviceProfileError, DetailedError):
    """A point of one protocol was used as a point of another (an HJ 212 factor as a register)."""

    template = "point {point!r} speaks {protocol}, not {wanted}: it has no {wanted} address"
    point: str
    protocol: str
    wanted: str


# Makes the error of the field at a location in one profile file (`loader` checks).
Fail: TypeAlias = Callable[[Loc, str], ProfileError]


def failer(source: str, node: yaml.Node | None) -> Fail:
    """The `Fail` of one profile file: its errors name `source` and the line of each field."""

    def fail(loc: Loc, message: str) -> ProfileError:
        return ProfileError(source, loc_str(loc), message, line_of(node, loc))

    return fail


def validation_error(exc: DecodeError, source: str, node: yaml.Node | None) -> ProfileError:
    """The first error the model found, as a ProfileError with its field and line."""
    issue = exc.issues[0]
    loc = issue.loc
    if issue.kind == "union_tag_invalid":
        loc = loc[:-1]  # a bad sim kind is about the sim (points[0].sim), as it always was
    return failer(source, node)(loc, _message(issue))


def _message(issue: Issue) -> str:
    if issue.kind in ("enum", "literal_error", "union_tag_invalid"):
        return f"{issue.input!r} is not one of {', '.join(issue.expected)}"
    if issue.kind == "extra_forbidden":
        return "unknown field"
    if issue.kind == "missing":
        return "required field is missing"
    if issue.input is not MISSING and not isinstance(issue.input, dict | list):
        return f"{issue.message} (got {issue.input!r})"
    return issue.message


def line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the YAML node at `loc`, or of the deepest parent found."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if getattr(key_node, "value", None) == part:
                    child = value_node
                    line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
