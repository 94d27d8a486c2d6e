"""The base of the gateway config's models: one msgspec Struct per TOML table.

Unknown keys are errors (`forbid_unknown_fields`), values are frozen, and decoding goes
through `device_profiles.decoding`, whose errors name the field. msgspec rather than pydantic
keeps the running agent small (about 2 MB resident, not 11: the daemon imports these models).
`model_validate` and `model_copy` keep the names the code and the tests have long called
(pydantic's).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Self

import msgspec

from device_profiles.decoding import decode, to_builtins


class ConfigTable(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A table of the gateway config. Fields named in `_secret` stay out of its repr."""

    _secret: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def model_validate(cls, data: object) -> Self:
        """`data` (plain dicts, lists, scalars) as this table; `DecodeError` if it does not fit."""
        return decode(data, cls)

    def model_copy(self, *, update: Mapping[str, Any]) -> Self:
        """A copy with the `update` fields replaced (not validated again)."""
        return msgspec.structs.replace(self, **update)

    def public_dump(self) -> dict[str, Any]:
        """The table as JSON-able data to show (`config check --json`): a secret that is set
        as "***", nested tables alike, without the program's own fields (`_name`)."""
        config = self.__struct_config__
        tag = {config.tag_field: config.tag} if config.tag_field is not None else {}
        return tag | {name: _public(getattr(self, name), secret=name in self._secret)
                      for name in self.__struct_fields__ if not name.startswith("_")}

    def _shown(self) -> Iterator[tuple[str, Any]]:
        return ((name, getattr(self, name)) for name in self.__struct_fields__
                if name not in self._secret)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self._shown())
        return f"{type(self).__name__}({fields})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        """What rich prints, in a traceback's locals too (runtime.logs): msgspec's own
        `__rich_repr__` would list the secret fields."""
        return list(self._shown())


def _public(value: object, *, secret: bool) -> Any:
    if secret and value:
        return "***"  # never print a secret
    if isinstance(value, ConfigTable):
        return value.public_dump()
    if isinstance(value, (list, tuple)):
        return [_public(v, secret=False) for v in value]
    return to_builtins(value)


class _TaggedMeta(msgspec.StructMeta):
    """Lets a tagged table be built with its tag as a keyword (`RtuTransportConfig(kind="rtu")`),
    as when the tag was a field; msgspec keeps a tag out of the fields."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        tag_field = cls.__struct_config__.tag_field
        if tag_field in kwargs and kwargs.pop(tag_field) != cls.__struct_config__.tag:
            raise TypeError(f"{cls.__name__} has {tag_field} {cls.__struct_config__.tag!r}")
        return super().__call__(*args, **kwargs)


class TaggedTable(ConfigTable, metaclass=_TaggedMeta, frozen=True):
    """A member of a union of tables told apart by the key `kind`."""


__all__ = ["ConfigTable", "TaggedTable"]
