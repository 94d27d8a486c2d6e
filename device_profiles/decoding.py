"""Typed decoding of parsed files (YAML, TOML, JSON lines) into msgspec Structs, with every
error named by its field.

`decode(data, Model)` is `msgspec.convert` (strict types, `forbid_unknown_fields`, the
constraints of `msgspec.Meta`), plus what a person fixing a file needs and msgspec's one
message does not give: each error as an `Issue` with its key path (`("points", 2, "type")`),
a kind, the value found, the allowed values of a literal or enum, and a message in the words
the CLIs have always printed (pydantic's: `Input should be greater than 0`, `Field required`,
`Extra inputs are not permitted`). msgspec stops at the first error; on failure the data is
walked field by field and list item by list item, so that every bad field is listed.

msgspec, not pydantic, because these models are loaded by the edge agent, a daemon that lives
for months on a 1 GB gateway: msgspec costs about 2 MB resident, pydantic about 11.

A Struct's `__post_init__` raises `FieldCheckError(field, message)` for a check of one of its
fields, so that the error names that field and its line rather than the whole table. A
top-level field whose name starts with "_" is the program's (where a file was loaded from):
data that gives one is refused, as an unknown key.
It lives here, below `edge_agent` and `central`, because device profiles are the first of
these files; the gateway config uses it too.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, Union

import msgspec

Loc = tuple[str | int, ...]
T = TypeVar("T")

MISSING: Final = msgspec.UNSET  # `Issue.input` of a field that is absent


class FieldCheckError(ValueError):
    """Raised in a Struct's `__post_init__`: `field` of that Struct is wrong (`kind` "missing":
    it is absent but required by the others)."""

    def __init__(self, field: str, message: str, kind: str = "value_error") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


class _PathTypeError(ValueError):
    """A `Path` field given something that is not a string."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One error: where (`loc`), what kind, in words, and the value found there."""

    loc: Loc
    kind: str  # missing, extra_forbidden, literal_error, enum, union_tag_invalid, value_error,
    #            constraint, type_error
    message: str
    input: Any = MISSING
    expected: tuple[str, ...] = ()  # the allowed values of a literal, enum or union tag


class DecodeError(ValueError):
    """The data does not fit the model; `issues` lists every error found, first one first."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(f"{loc_str(i.loc) or '$'}: {i.message}" for i in issues))


def decode(data: object, model: type[T]) -> T:
    """`data` (plain dicts, lists, scalars) as `model`, or `DecodeError` with every issue.
    A key that starts with "_" names one of the program's own fields, never one of the data's."""
    if isinstance(data, dict) and (private := [k for k in data if str(k).startswith("_")]):
        raise DecodeError([Issue((k,), "extra_forbidden", "Extra inputs are not permitted",
                                 data[k]) for k in private])
    try:
        return msgspec.convert(data, model, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        issues = list(_issues(data, model, ())) or [_issue(exc, model, (), data)]
        raise DecodeError(issues) from None


def to_builtins(obj: object) -> Any:
    """A Struct as plain JSON-able data (paths as strings, enums as their values)."""
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def loc_str(loc: Loc) -> str:
    """`("points", 2, "type")` as `points[2].type`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Path:
        if isinstance(obj, str):
            return Path(obj)
        raise _PathTypeError("Input is not a valid path")
    raise NotImplementedError(tp)


def _enc_hook(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(type(obj))


# --- finding every error --------------------------------------------------------------------


def _issues(data: object, tp: object, loc: Loc) -> Iterator[Issue]:
    """Every error under `loc`: msgspec's own when no part of the data below is to blame."""
    try:
        msgspec.convert(data, tp, dec_hook=_dec_hook)
        return
    except msgspec.ValidationError as exc:
        err = exc
    found = list(_child_issues(data, _resolve(tp, data), loc))
    yield from found or [_issue(err, tp, loc, data)]


def _child_issues(data: object, tp: object, loc: Loc) -> Iterator[Issue]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and isinstance(data, dict):
        # In the order of the fields, then the unknown keys (as pydantic listed them).
        fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
        for name, f in fields.items():
            if name in data:
                yield from _issues(data[name], f.type, (*loc, name))
            elif f.required:
                yield Issue((*loc, name), "missing", "Field required")
        tag_field = tp.__struct_config__.tag_field
        for key, value in data.items():
            if key not in fields and key != tag_field:
                yield Issue((*loc, key), "extra_forbidden", "Extra inputs are not permitted",
                            value)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and isinstance(data, list):
        for i, item in enumerate(data):
            yield from _issues(item, args[0], (*loc, i))
    elif origin is dict and isinstance(data, dict):
        for key, value in data.items():
            yield from _issues(value, args[1], (*loc, key))


def _resolve(tp: object, data: object) -> object:
    """The type `tp` means for `data`: without Annotated, None and the union members the data
    does not select (by its tag)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [m for m in typing.get_args(tp) if m is not type(None)]
            structs = [m for m in members if isinstance(m, type)
                       and issubclass(m, msgspec.Struct)]
            if len(members) == 1:
                tp = members[0]
                continue
            if structs and isinstance(data, dict):
                field = structs[0].__struct_config__.tag_field
                chosen = [s for s in structs if field is not None
                          and s.__struct_config__.tag == data.get(field)]
                if chosen:
                    return chosen[0]
            return tp
        return tp


def _type_at(tp: object, data: object, loc: Loc) -> tuple[object, object]:
    """The type and the value at `loc` in `data` of type `tp` (`MISSING` when absent)."""
    for part in loc:
        tp = _resolve(tp, data)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(tp)}
            tp = fields.get(str(part), Any)
        else:
            args = typing.get_args(tp)
            tp = args[-1] if args else Any
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            data = MISSING
    return _resolve(tp, data), data


def _allowed(tp: object) -> tuple[str, ...] | None:
    """The values a literal or enum type allows, or None for any other type."""
    if typing.get_origin(tp) is Literal:
        return tuple(repr(v) for v in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(repr(m.value) for m in tp)
    return None


def _tags(tp: object) -> tuple[str, tuple[str, ...]]:
    """The tag field and the tags of a union of tagged Structs."""
    structs = [m for m in typing.get_args(tp)
               if isinstance(m, type) and issubclass(m, msgspec.Struct)]
    field = structs[0].__struct_config__.tag_field if structs else None
    return str(field), tuple(repr(s.__struct_config__.tag) for s in structs)


# --- one msgspec error in words -------------------------------------------------------------

_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.S)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_COMPARE = re.compile(r"^Expected `[^`]+` (>=|>|<=|<) (\S+)$")
_LENGTH = re.compile(r"^Expected `(\w+)` of length (>=|<=) (\d+)$")
_TYPE = re.compile(r"^Expected `([^`]+)`, got `[^`]+`$")
_WORDS = {">": "greater than", ">=": "greater than or equal to", "<": "less than",
          "<=": "less than or equal to"}
_TYPE_WORDS = {"int": "integer", "float": "number", "str": "string", "bool": "boolean",
               "array": "list", "object": "dictionary"}


def _issue(exc: msgspec.ValidationError, tp: object, loc: Loc, data: object) -> Issue:
    """msgspec's error about `data` (of type `tp`, found at `loc`) as an `Issue`."""
    text, path = str(exc), ""
    if m := _AT.match(text):
        text, path = m.group(1), m.group(2)
    rel: Loc = tuple(int(i) if i else name for name, i in _PATH_PART.findall(path))
    cause = exc.__cause__
    if isinstance(cause, FieldCheckError):
        rel = (*rel, cause.field)
        _, value = _type_at(tp, data, rel)
        message = "Field required" if cause.kind == "missing" else f"Value error, {cause}"
        return Issue((*loc, *rel), cause.kind, message, value)
    if m := re.match(r"^Object (contains unknown|missing required) field `(.+)`$", text):
        rel = (*rel, m.group(2))
        _, value = _type_at(tp, data, rel)
        if m.group(1) == "missing required":
            return Issue((*loc, *rel), "missing", "Field required")
        return Issue((*loc, *rel), "extra_forbidden", "Extra inputs are not permitted", value)
    field_type, value = _type_at(tp, data, rel)
    if text.startswith("Invalid value ") and rel:  # a tag no member of the union has
        union, _ = _type_at(tp, data, rel[:-1])
        tag_field, tags = _tags(union)
        return Issue((*loc, *rel), "union_tag_invalid",
                     f"Input tag {value!r} found using {tag_field!r} does not match any of "
                     f"the expected tags: {', '.join(tags)}", value, _unquoted(tags))
    if text.startswith("Invalid enum value ") and (allowed := _allowed(field_type)):
        listed = (", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1
                  else allowed[0])
        kind = "enum" if isinstance(field_type, type) else "literal_error"
        return Issue((*loc, *rel), kind, f"Input should be {listed}", value, _unquoted(allowed))
    return Issue((*loc, *rel), *_words(text, cause), value)


def _words(text: str, cause: BaseException | None) -> tuple[str, str]:
    """(kind, message) of a constraint or type error."""
    if isinstance(cause, _PathTypeError):
        return "type_error", str(cause)
    if m := _COMPARE.match(text):
        return "constraint", f"Input should be {_WORDS[m.group(1)]} {_number(m.group(2))}"
    if m := _LENGTH.match(text):
        n = int(m.group(3))
        what, noun = ("String", "character") if m.group(1) == "str" else ("List", "item")
        most = "at least" if m.group(2) == ">=" else "at most"
        return "constraint", f"{what} should have {most} {n} {noun}{'' if n == 1 else 's'}"
    if m := re.match(r"^Expected `str` matching regex (.+)$", text):
        return "constraint", f"String should match pattern {m.group(1)}"
    if m := _TYPE.match(text):
        words = [_TYPE_WORDS.get(n, n) for n in m.group(1).split(" | ") if n != "null"]
        listed = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
        return "type_error", f"Input should be a valid {listed}"
    if isinstance(cause, ValueError | TypeError):
        return "value_error", f"Value error, {text}"
    return "value_error", text


def _number(text: str) -> str:
    """A bound as written in the model: `0`, not msgspec's `0.0`."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _unquoted(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v[1:-1] if v[:1] in "'\"" else v for v in values)


__all__ = ["DecodeError", "FieldCheckError", "Issue", "Loc", "MISSING", "decode", "loc_str",
           "to_builtins"]
