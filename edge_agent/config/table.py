"""The base of the gateway config's models: one msgspec Struct per TOML table.

Unknown keys are errors (`forbid_unknown_fields`), values are frozen, and decoding goes
through `device_profiles.decoding`, whose errors name the field. msgspec rather than pydantic
keeps the running agent small (about 2 MB resident, not 11: the daemon imports these models).
The methods keep the names the code and the tests have long called (pydantic's).
"""

from __future__ import annotations

from collections.abc import Mapping
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

    def model_dump(self) -> dict[str, Any]:
        """The table as JSON-able data, without the program's own fields (`_name`)."""
        data: dict[str, Any] = to_builtins(self)
        return {k: v for k, v in data.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__
                           if name not in self._secret)
        return f"{type(self).__name__}({fields})"


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
