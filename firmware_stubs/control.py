"""The JSON-lines control channel through which another process scripts a simulator.

One request per line, one JSON reply per line, on a loopback TCP port:

    {"set": {"device_id": 2, "point": "level", "value": 9.75}}   -> {"ok": true}
    {"clear": {"point": "gas_lel"}}                               -> {"ok": true}
    {"get": {"point": "gas_lel"}}                                 -> {"ok": true, "value": 60.0}
    {}                                                            -> {"ok": true, "seconds": …,
                                                                      "devices": {"1": "…"}}

`device_id` defaults to 1. A bad line gets `{"ok": false, "error": "..."}` and the connection
stays open: a test that sends a typo must see the reason, not a dropped socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_profiles import Profile
from firmware_stubs.errors import SimulatorError
from protocols.modbus_points import PointEncodeError, PointValue


class Scriptable(Protocol):
    """What the control channel needs from a simulator."""

    @property
    def profile_ids(self) -> Mapping[int, str]: ...

    def set_value(self, point_key: str, value: PointValue, device_id: int = 1) -> None: ...

    def clear_override(self, point_key: str, device_id: int = 1) -> None: ...

    def get_value(self, point_key: str, device_id: int = 1) -> PointValue: ...

    def seconds(self) -> float: ...


class _Profiled(Protocol):
    @property
    def profile(self) -> Profile: ...


D = TypeVar("D", bound=_Profiled)


class ProfiledDevices(Generic[D]):
    """The part of `Scriptable` a simulator of several profiled devices answers from its table
    of them, `_devices` (device id, a slave's address on a bus → the device), and the time it
    started, `_t0`."""

    _devices: dict[int, D]
    _t0: float

    @property
    def device_ids(self) -> list[int]:
        return list(self._devices)

    @property
    def profile_ids(self) -> dict[int, str]:
        """Device id -> the id of the profile it simulates."""
        return {i: d.profile.id for i, d in self._devices.items()}

    def seconds(self) -> float:
        """Seconds since the simulator started (what `counter` points count)."""
        return time.monotonic() - self._t0


class _PointRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: int = Field(default=1, ge=1, le=247)
    point: str
    value: bool | int | float | str | None = None


class ControlRequest(BaseModel):
    """One control line: `{"set": {...}}`, `{"clear": {...}}`, `{"get": {...}}` or `{}` (ping)."""

    model_config = ConfigDict(extra="forbid")
    set: _PointRef | None = None
    clear: _PointRef | None = None
    get: _PointRef | None = None


class StatsRequest(BaseModel):
    """`{"stats": {}}`: a simulator's counters."""

    model_config = ConfigDict(extra="forbid")


class OwnRequest(BaseModel):
    """Base of a simulator's own control lines (e.g. `fault` and `stats`): exactly one field."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _exactly_one(self) -> OwnRequest:
        names = list(type(self).model_fields)
        if sum(getattr(self, name) is not None for name in names) != 1:
            raise ValueError(f"give exactly one of {' or '.join(names)}")
        return self


F = TypeVar("F", bound=BaseModel)


class FaultOrStats(OwnRequest, Generic[F]):
    """The own control lines of a simulator with one kind of fault request `F`: exactly one of
    `{"fault": {...}}` or `{"stats": {}}`."""

    fault: F | None = None
    stats: StatsRequest | None = None


R = TypeVar("R", bound=OwnRequest)


def _bad_request(exc: ValidationError) -> dict[str, Any]:
    return {"ok": False, "error": f"bad request: {exc.errors(include_url=False)[0]['msg']}"}


def handle_control(sim: Scriptable, line: bytes | str) -> dict[str, Any]:
    """Handle one control request line; always returns a reply, never raises."""
    try:
        request = ControlRequest.model_validate_json(line)
    except ValidationError as exc:
        return _bad_request(exc)
    try:
        if request.set is not None:
            cmd = request.set
            if cmd.value is None:
                return {"ok": False, "error": "set needs a value"}
            sim.set_value(cmd.point, cmd.value, device_id=cmd.device_id)
            return {"ok": True}
        if request.clear is not None:
            sim.clear_override(request.clear.point, device_id=request.clear.device_id)
            return {"ok": True}
        if request.get is not None:
            value = sim.get_value(request.get.point, device_id=request.get.device_id)
            return {"ok": True, "value": value}
        return {"ok": True, "seconds": sim.seconds(),
                "devices": {str(i): p for i, p in sim.profile_ids.items()}}
    except (SimulatorError, PointEncodeError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bad value must not kill the control loop
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def handle_own_control(sim: Scriptable, line: bytes | str, own: type[R],
                       answer: Callable[[R], dict[str, Any]]) -> dict[str, Any]:
    """A line naming one of `own`'s fields is validated as `own` and answered by `answer`;
    any other line is a common one (`handle_control`). Never raises past `answer`."""
    try:
        raw = json.loads(line)
    except ValueError:
        raw = None
    if not (isinstance(raw, dict) and raw.keys() & own.model_fields.keys()):
        return handle_control(sim, line)  # set / clear / get / ping
    try:
        request = own.model_validate(raw)
    except ValidationError as exc:
        return _bad_request(exc)
    return answer(request)


async def open_control(sim: Scriptable, host: str, port: int | None,
                       handler: Callable[[bytes], dict[str, Any]] | None = None,
                       ) -> tuple[asyncio.Server | None, int | None]:
    """`start_control_server` when a port is asked for (None: no control channel); returns
    the server and the port it listens on."""
    if port is None:
        return None, None
    server = await start_control_server(sim, host, port, handler)
    return server, server.sockets[0].getsockname()[1]


async def close_control(server: asyncio.Server | None) -> None:
    if server is not None:
        server.close()
        await server.wait_closed()


async def start_control_server(
    sim: Scriptable, host: str, port: int,
    handler: Callable[[bytes], dict[str, Any]] | None = None,
) -> asyncio.Server:
    """Listen for control clients on `host:port` (0: a free port); close the server to stop.

    `handler` answers each line instead of `handle_control(sim, line)`: a simulator with
    requests of its own (faults, stats) handles those and passes the rest to `handle_control`.
    """
    answer = handler or (lambda line: handle_control(sim, line))

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = answer(line)
                writer.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent a line past the stream limit
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    return await asyncio.start_server(client, host, port)
