"""Typed decoding of files into msgspec Structs (device_profiles/decoding.py): every error as an
Issue with its key path and the words the CLIs print, and what the gateway config builds on it."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import pytest
from msgspec import Meta
from structlog.tracebacks import to_repr

from device_profiles.decoding import MISSING, DecodeError, FieldCheckError, decode
from edge_agent.config.site import ConfigError, RtuTransportConfig, parse_config
from edge_agent.control.server import ReadRequest, parse_request
from edge_agent.narrowband.config import NarrowbandConfig
from edge_agent.uplink.mqtt_config import MqttConfig


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class _Shape(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True):
    pass


class Circle(_Shape, tag="circle", frozen=True):
    kind: ClassVar[str] = "circle"
    r: Annotated[float, Meta(gt=0)]


class Square(_Shape, tag="square", frozen=True):
    kind: ClassVar[str] = "square"
    side: float = 1.0


class Item(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=4)]
    count: Annotated[int, Meta(ge=1, le=10)] = 1
    ratio: Annotated[float, Meta(lt=1)] = 0.5
    code: Annotated[str, Meta(pattern=r"^[a-z]+$")] = "a"
    mode: Literal["on", "off"] = "on"
    colour: Colour = Colour.RED
    where: Path | None = None
    shape: Circle | Square | None = None
    tags: Annotated[list[str], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["x"])

    def __post_init__(self) -> None:
        if self.code == "zz":
            raise FieldCheckError("code", "zz is taken")
        if self.count == 7 and self.mode == "off":
            raise ValueError("7 must be on")


class Basket(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    items: list[Item]


@pytest.mark.parametrize(("item", "loc", "kind", "message"), [
    ({}, ("name",), "missing", "Field required"),
    ({"name": "a", "size": 3}, ("size",), "extra_forbidden", "Extra inputs are not permitted"),
    ({"name": ""}, ("name",), "constraint", "String should have at least 1 character"),
    ({"name": "abcde"}, ("name",), "constraint", "String should have at most 4 characters"),
    ({"name": "a", "count": 0}, ("count",), "constraint", "Input should be greater than or equal to 1"),
    ({"name": "a", "count": 11}, ("count",), "constraint", "Input should be less than or equal to 10"),
    ({"name": "a", "ratio": 1}, ("ratio",), "constraint", "Input should be less than 1"),
    ({"name": "a", "count": "2"}, ("count",), "type_error", "Input should be a valid integer"),
    ({"name": "a", "code": "A1"}, ("code",), "constraint", "String should match pattern '^[a-z]+$'"),
    ({"name": "a", "mode": "auto"}, ("mode",), "literal_error", "Input should be 'on' or 'off'"),
    ({"name": "a", "colour": "green"}, ("colour",), "enum", "Input should be 'red' or 'blue'"),
    ({"name": "a", "where": 3}, ("where",), "type_error", "Input is not a valid path"),
    ({"name": "a", "shape": {"kind": "cone"}}, ("shape", "kind"), "union_tag_invalid",
     "Input tag 'cone' found using 'kind' does not match any of the expected tags: 'circle', 'square'"),
    ({"name": "a", "shape": {"kind": "circle", "r": 0}}, ("shape", "r"), "constraint",
     "Input should be greater than 0"),
    ({"name": "a", "tags": []}, ("tags",), "constraint", "List should have at least 1 item"),
    ({"name": "a", "code": "zz"}, ("code",), "value_error", "Value error, zz is taken"),
    ({"name": "a", "count": 7, "mode": "off"}, (), "value_error", "Value error, 7 must be on"),
])
def test_each_error_is_an_issue_with_its_path_and_words(item: dict[str, Any], loc: tuple[Any, ...],
                                                       kind: str, message: str) -> None:
    """Every kind of error names its key path (in a list item: the item's index) and says it in the CLIs' words."""
    with pytest.raises(DecodeError) as info:
        decode({"items": [{"name": "ok"}, item]}, Basket)
    (issue,) = info.value.issues
    assert (issue.loc, issue.kind, issue.message) == (("items", 1, *loc), kind, message)


def test_issue_carries_the_value_found_and_the_allowed_values() -> None:
    """An issue keeps the bad value (MISSING when absent) and, for a literal or enum, what was allowed."""
    with pytest.raises(DecodeError) as info:
        decode({"items": [{"mode": "auto"}]}, Basket)
    missing, mode = info.value.issues
    assert missing.input is MISSING
    assert (mode.input, mode.expected) == ("auto", ("on", "off"))


def test_every_bad_field_and_item_is_listed() -> None:
    """msgspec stops at the first error; decode lists every bad field of every item, in field order."""
    with pytest.raises(DecodeError) as info:
        decode({"items": [{"name": "", "count": 0}, {"name": "b"}, {"mode": "x"}]}, Basket)
    assert [i.loc for i in info.value.issues] == [
        ("items", 0, "name"), ("items", 0, "count"), ("items", 2, "name"), ("items", 2, "mode")]


def test_good_data_decodes_with_paths_and_tags() -> None:
    """Valid data decodes: paths from strings, ints into float fields, the tagged member chosen."""
    basket = decode({"items": [{"name": "a", "ratio": 0, "where": "/x", "shape": {"kind": "circle", "r": 2}}]}, Basket)
    item = basket.items[0]
    assert item.where == Path("/x") and item.ratio == 0.0 and isinstance(item.ratio, float)
    assert item.shape == Circle(r=2.0)


GOOD = '[gateway]\nid = "gw-1"\ndata_dir = "data"\n\n[mqtt]\nport = 1883\nbatch_size = 500\n'


def test_several_bad_keys_of_one_table_are_all_reported() -> None:
    """Two bad values in [mqtt] are two findings, each at its own line."""
    text = GOOD.replace("port = 1883", "port = 0").replace("batch_size = 500", "batch_size = 0")
    with pytest.raises(ConfigError) as info:
        parse_config(text, check_profiles=False)
    assert [(i.field, i.line) for i in info.value.issues] == [("mqtt.port", 6), ("mqtt.batch_size", 7)]


def test_a_private_field_is_not_read_from_the_file() -> None:
    """`_source` is the program's (where the file was loaded from): a file that sets it is refused."""
    with pytest.raises(ConfigError) as info:
        parse_config('_source = "/etc/other.toml"\n' + GOOD, check_profiles=False)
    assert (info.value.field, info.value.line) == ("_source", 1)
    assert info.value.message == "Extra inputs are not permitted"


def test_narrowband_key_stays_out_of_the_repr() -> None:
    """The frame key, like the MQTT password, never shows in a repr (a log line, a traceback)."""
    key = "00112233445566778899aabbccddeeff"
    nb = NarrowbandConfig.model_validate({"port": "/dev/ttyUSB1", "central_card": "0242407", "key": key})
    assert nb.key == key and key not in repr(nb) and "central_card='0242407'" in repr(nb)
    # A crash's traceback logs its locals through rich (runtime.logs: dict_tracebacks).
    shown = to_repr(nb)
    assert key not in shown and "central_card='0242407'" in shown
    mqtt = MqttConfig(username="u", password="s3cret-pw")
    assert "s3cret-pw" not in repr(mqtt) and "s3cret-pw" not in to_repr(mqtt)
    assert "username='u'" in to_repr(mqtt)


def test_a_tagged_table_is_built_with_its_own_kind_only() -> None:
    """`kind` is the transport's tag: given to the constructor it must be the class's own."""
    assert RtuTransportConfig(kind="rtu", port="/dev/ttyS2").kind == "rtu"
    with pytest.raises(TypeError, match="has kind 'rtu'"):
        RtuTransportConfig(kind="tcp")


@pytest.mark.parametrize(("line", "loc", "message"), [
    (b'{"op": "frobnicate"}', ("op",), "Input tag 'frobnicate' found using 'op'"),
    (b'{"op": "read"}', ("device",), "Field required"),
    (b'{"op": "read", "device": "d", "x": 1}', ("x",), "Extra inputs are not permitted"),
    (b"not json", (), "Invalid JSON"),
])
def test_control_requests_are_decoded_with_named_errors(line: bytes, loc: tuple[str, ...],
                                                        message: str) -> None:
    """A bad control request line is a DecodeError naming the key; a good one is its request."""
    assert parse_request(b'{"op": "read", "device": "d"}') == ReadRequest(device="d")
    with pytest.raises(DecodeError) as info:
        parse_request(line)
    assert info.value.issues[0].loc == loc
    assert info.value.issues[0].message.startswith(message)
