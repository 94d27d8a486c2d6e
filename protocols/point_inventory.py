"""Point key ↔ ordinal, as a gateway's birth names them (DESIGN.md §4 birth, §5 narrowband).

A narrowband frame names a point by its ordinal in the gateway's last birth inventory, not by
its key. The edge turns keys into ordinals when it builds a frame
(`edge_agent.narrowband.fallback`), central turns them back when it stores the frame's
entries (`central.narrowband.receiver`); both read the mapping here, from the same birth.

- Each point of each device: `device/point` ↔ its ordinal. A key without a `/` (an older
  birth) is the device's point `key`.
- A device's pseudo point `<device>/_device` (device-level alarms such as `device_offline`)
  is named by the ordinal of the device's first point; so an entry of a device-level rule
  names `<device>/_device` by any ordinal of that device.

Central keeps the birth as `protocols.envelope.to_jsonable` renders it (`from_jsonable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protocols.envelope import DEVICE_POINT, Birth
from protocols.limits import MalformedEnvelopeError


@dataclass(frozen=True, slots=True)
class PointInventory:
    """The ordinals of one birth; see the module doc."""

    ordinals: Mapping[str, int]  # point key (and `<device>/_device`) → ordinal
    points: Mapping[int, tuple[str, str]]  # ordinal → (point key, device)

    @classmethod
    def of_devices(cls, devices: Iterable[tuple[str, Iterable[tuple[int, str]]]]
                   ) -> PointInventory:
        """From `(device id, [(ordinal, key), ...])` in birth order."""
        ordinals: dict[str, int] = {}
        points: dict[int, tuple[str, str]] = {}
        for device, pts in devices:
            first = True
            for ordinal, raw_key in pts:
                key = raw_key if "/" in raw_key else f"{device}/{raw_key}"
                ordinals[key] = ordinal
                points[ordinal] = (key, device)
                if first:
                    ordinals[f"{device}/{DEVICE_POINT}"] = ordinal
                    first = False
        return cls(ordinals, points)

    @classmethod
    def of_birth(cls, birth: Birth) -> PointInventory:
        return cls.of_devices((d.id, ((p.ordinal, p.key) for p in d.points))
                              for d in birth.devices)

    @classmethod
    def from_jsonable(cls, birth: object) -> PointInventory:
        """From a birth as `protocols.envelope.to_jsonable` renders it; raises
        `MalformedEnvelopeError` when it is not one."""
        devices: list[tuple[str, list[tuple[int, str]]]] = []
        for i, dev in enumerate(_list(_get(birth, "devices", "birth"), "devices")):
            pts = []
            for j, p in enumerate(_list(_get(dev, "points", f"devices[{i}]"), "points")):
                at = f"devices[{i}].points[{j}]"
                ordinal, key = _get(p, "ordinal", at), _get(p, "key", at)
                if type(ordinal) is not int or type(key) is not str or not key:
                    raise MalformedEnvelopeError(at, "expected an integer ordinal and a key")
                pts.append((ordinal, key))
            device = _get(dev, "id", f"devices[{i}]")
            if type(device) is not str:
                raise MalformedEnvelopeError(f"devices[{i}].id", "expected a string")
            devices.append((device, pts))
        return cls.of_devices(devices)

    def ordinal(self, point: str) -> int | None:
        """The ordinal that names `point` (a point key or `<device>/_device`)."""
        return self.ordinals.get(point)

    def point(self, ordinal: int, *, device_level: bool = False) -> str | None:
        """The point key `ordinal` names, or with `device_level` its device's pseudo point."""
        found = self.points.get(ordinal)
        if found is None:
            return None
        return f"{found[1]}/{DEVICE_POINT}" if device_level else found[0]


def _get(obj: object, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise MalformedEnvelopeError(where, "expected a map")
    return obj.get(key, ())


def _list(obj: object, where: str) -> list[Any]:
    if not isinstance(obj, (list, tuple)):
        raise MalformedEnvelopeError(where, "expected a list")
    return list(obj)


__all__ = ["PointInventory"]
