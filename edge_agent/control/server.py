"""The local control socket: the technician's way into the running agent (`edge-agent devices`,
`read`, `write`, `alarms`, and the live part of `status` and `doctor`).

A unix stream socket, `<data_dir>/agent.sock` by default (`[control] socket = ...`), mode
0660: whoever shares the agent's group may use it, nobody else. It speaks JSON lines, one
request and one response per line, several per connection:

    {"op": "status"}                                  -> {"ok": true, "devices": [...], ...}
    {"op": "devices"}                                 -> {"ok": true, "devices": [...]}
    {"op": "read", "device": "gas-1"}                 -> {"ok": true, "points": [...]}
    {"op": "read", "device": "gas-1", "point": "gas_lel"}
    {"op": "write", "device": "gas-1", "point": "sample_interval_s", "value": "5"}
                                                      -> {"ok": true, "readback": 5, ...}
    {"op": "write", ..., "dry_run": true}             -> checks it, reads the current value
    {"op": "alarms"}                                  -> {"ok": true, "alarms": [...]}

and on failure `{"ok": false, "error": {"type": "unknown_device", "message": "..."}}`.

Live reads and writes go through the device's own transport, the one its poller uses, which
serialises requests (one per TCP endpoint, one per serial bus): they wait their turn and never
talk over the poller on the wire. A write is checked, encoded, written, read back and compared
by `edge_agent.field.point_io.write_point`, the code central's signed commands use; it is logged and
kept in the outbox as an `event` record (`attrs.event = "local_write"`), so central sees it.

The server is the supervisor's task `control.socket`. A stale socket file (no one answers on
it) is replaced; a live one (another agent on the same data dir) makes the task fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import structlog

from device_profiles.decoding import DecodeError, Issue, decode, loc_str
from edge_agent import EdgeError
from edge_agent.control import ControlError
from edge_agent.field import point_io
from edge_agent.field.bus import SerialBus
from edge_agent.field.errors import ModbusExceptionError, TransportError
from edge_agent.field.poller import DevicePoller
from edge_agent.outbox.store import NewRecord, OutboxError
from protocols.envelope import RecordKind
from protocols.modbus_points import PointDecodeError

if TYPE_CHECKING:
    from edge_agent.field.stations import Hj212Station
    from edge_agent.health.view import RuntimeView

log = structlog.get_logger(__name__)

MAX_LINE = 64 * 1024
REQUEST_TIMEOUT_S = 30.0
MAX_CONCURRENT = 4
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
_ALL_TIERS = frozenset({"fast", "normal", "slow"})


class ControlSocketError(EdgeError):
    """The socket cannot be set up (path too long, taken by a live agent, not a socket)."""


# --- requests ---------------------------------------------------------------------------------


class _Request(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="op"):
    op: ClassVar[str]


class StatusRequest(_Request, tag="status", frozen=True):
    op: ClassVar[str] = "status"


class DevicesRequest(_Request, tag="devices", frozen=True):
    op: ClassVar[str] = "devices"


class ReadRequest(_Request, tag="read", frozen=True):
    op: ClassVar[str] = "read"
    device: str
    point: str | None = None


class WriteRequest(_Request, tag="write", frozen=True):
    op: ClassVar[str] = "write"
    device: str
    point: str
    value: bool | int | float | str
    dry_run: bool = False  # check it and read the current value; write nothing


class AlarmsRequest(_Request, tag="alarms", frozen=True):
    op: ClassVar[str] = "alarms"


Request = StatusRequest | DevicesRequest | ReadRequest | WriteRequest | AlarmsRequest


def parse_request(line: bytes) -> Request:
    """One request line (JSON) as its request, or `DecodeError` naming the field."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError([Issue((), "json_invalid", f"Invalid JSON: {exc}")]) from None
    return decode(data, Request)  # type: ignore[arg-type]


def error_reply(type_: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type_, "message": message}}


# --- the operations ---------------------------------------------------------------------------


class ControlOps:
    """Answers control requests from the running agent's state."""

    def __init__(self, runtime: RuntimeView) -> None:
        self.runtime = runtime

    async def handle(self, line: bytes, *, peer_uid: int | None = None) -> dict[str, Any]:
        """One request line → one response; never raises."""
        try:
            req = parse_request(line)
        except DecodeError as exc:
            first = exc.issues[0]
            where = loc_str(first.loc)
            return error_reply("bad_request", f"{where}: {first.message}" if where
                               else first.message)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                body = await self._dispatch(req, peer_uid)
        except ControlError as exc:
            return error_reply(exc.type, exc.message)
        except point_io.PointIoError as exc:
            return error_reply(exc.kind, exc.message)
        except TimeoutError:
            return error_reply("timeout", f"no answer within {REQUEST_TIMEOUT_S:g} s")
        except Exception as exc:  # a bug in one request must not take the socket down
            log.exception("control_request_failed", op=req.op)
            return error_reply("internal_error", f"{type(exc).__name__}: {exc}")
        return {"ok": True, **body}

    async def _dispatch(self, req: Any, peer_uid: int | None) -> dict[str, Any]:
        if isinstance(req, StatusRequest):
            return await self.status()
        if isinstance(req, DevicesRequest):
            return {"devices": self.devices()}
        if isinstance(req, ReadRequest):
            return await self.read(req.device, req.point)
        if isinstance(req, WriteRequest):
            return await self.write(req.device, req.point, req.value, dry_run=req.dry_run,
                                    peer_uid=peer_uid)
        assert isinstance(req, AlarmsRequest)
        return self.alarms()

    # --- status and devices ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        rt = self.runtime
        out: dict[str, Any] = rt.status()  # devices with their bus counters included
        out["buses"] = [{"endpoint": bus.endpoint, "port": bus.port, "baudrate": bus.line.baudrate,
                         "connected": bus.connected, "stray_frames": bus.stray_frames,
                         "slaves": {str(i): s.to_dict() for i, s in bus.all_stats().items()}}
                        for bus in (rt.pool.serial_buses() if rt.pool else [])]
        if rt.outbox is not None:
            try:
                st = await rt.outbox.stats()
                out["backlog"] = {"records": st.backlog,
                                  "by_kind": {k.name.lower(): n
                                              for k, n in st.backlog_by_kind.items()},
                                  "oldest_ts_ms": st.oldest_undelivered_ts_ms,
                                  "lanes": {k: v.count for k, v in st.lanes.items()},
                                  "last_seq": st.last_seq, "db_bytes": st.db_bytes}
            except OutboxError as exc:
                out["backlog"] = {"error": str(exc)}
        out["alarms_active"] = len(rt.alarms.engine.active()) if rt.alarms else None
        return out

    def devices(self) -> list[dict[str, Any]]:
        running = {d.device.id: d for d in self.runtime.devices}
        rows: list[dict[str, Any]] = []
        for dev in self.runtime.config.devices:
            t = dev.transport
            row: dict[str, Any] = {
                "id": dev.id, "profile": dev.profile, "kind": t.kind, "endpoint": t.endpoint,
                "unit": None if t.kind == "hj212" else dev.device_id,
                "enabled": dev.enabled, "interval_s": dev.poll_interval_s}
            d = running.get(dev.id)
            if d is None:
                row["health"] = {"device": dev.id, "state": "disabled"}
            else:
                row["protocol"] = d.profile.protocol
                row["points"] = len(d.profile.points)
                if isinstance(d, DevicePoller):
                    row["interval_s"] = d.interval_s
                row["health"] = device_health(d)
            rows.append(row)
        return rows

    def _poller(self, device: str) -> DevicePoller:
        for d in self.runtime.devices:
            if d.device.id != device:
                continue
            if not isinstance(d, DevicePoller):
                raise ControlError("not_readable", f"{device} is an HJ 212 station: it pushes its "
                                   "data and cannot be read or written on demand")
            return d
        raise ControlError("unknown_device", f"no enabled device {device!r} on this gateway")

    # --- read and write ---------------------------------------------------------------------

    async def read(self, device: str, point: str | None) -> dict[str, Any]:
        poller = self._poller(device)
        unit = poller.device.device_id
        ts_ms = time.time_ns() // 1_000_000
        if point is not None:
            p = point_io.find_point(poller.profile, device, point)
            value = await point_io.read_point(poller.transport, unit, p.spec)
            return {"device": device, "ts_ms": ts_ms, "points": [_point_row(p, value)]}
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for block in poller.plan(_ALL_TIERS):
            try:
                words = await poller.transport.read(block.function, block.start, block.count,
                                                    device_id=unit)
            except ModbusExceptionError as exc:
                errors.update({s.key: exc.message for s in block.points})
                continue
            except TransportError as exc:
                raise point_io.PointTransportError(exc.message) from exc
            for key, v in block.decode(words).items():
                if isinstance(v, PointDecodeError):
                    errors[key] = v.reason
                else:
                    values[key] = v
        rows = [_point_row(p, values.get(p.key), errors.get(p.key)) for p in poller.profile.points]
        return {"device": device, "ts_ms": ts_ms, "points": rows}

    async def write(self, device: str, point: str, raw: object, *, dry_run: bool = False,
                    peer_uid: int | None = None) -> dict[str, Any]:
        poller = self._poller(device)
        p = point_io.writable_point(poller.profile, device, point)
        spec = p.spec
        value = point_io.parse_value(spec, raw)
        point_io.check_value(spec, value)
        unit = poller.device.device_id
        base = {"device": device, "point": point, "unit": p.unit, "name_zh": p.name_zh}
        if dry_run:
            try:
                current: Any = await point_io.read_point(poller.transport, unit, spec)
                current_error = None
            except point_io.PointIoError as exc:
                current, current_error = None, exc.message
            return base | {"value": value, "current": current, "current_error": current_error,
                           "written": False}
        lg = log.bind(device=device, point=point, uid=peer_uid)
        try:
            outcome = await point_io.write_point(poller.transport, unit, spec, value)
        except point_io.PointIoError as exc:
            lg.warning("local_write_failed", value=value, error=exc.message, kind=exc.kind)
            raise
        lg.info("local_write", value=outcome.written, readback=outcome.readback)
        await self._audit(device, point, outcome, peer_uid)
        return base | {"value": outcome.written, "readback": outcome.readback, "written": True}

    async def _audit(self, device: str, point: str, outcome: point_io.WriteOutcome,
                     peer_uid: int | None) -> None:
        outbox = self.runtime.outbox
        if outbox is None:
            return
        record = NewRecord(kind=RecordKind.EVENT, ts_ms=time.time_ns() // 1_000_000,
                           point=f"{device}/{point}", value=outcome.readback,
                           attrs={"event": "local_write", "written": outcome.written,
                                  "via": "control_socket", "uid": peer_uid})
        try:
            await outbox.append([record])
        except OutboxError as exc:
            log.warning("local_write_not_recorded", device=device, point=point, error=str(exc))

    # --- alarms -------------------------------------------------------------------------------

    def alarms(self) -> dict[str, Any]:
        rules = self.runtime.alarms
        active = rules.engine.active() if rules is not None else []
        return {"source": "agent",
                "alarms": [dataclasses.asdict(a) for a in sorted(active, key=lambda a: a.alarm_id)]}


def device_health(d: DevicePoller | Hj212Station) -> dict[str, Any]:
    """A device's health, with its RTU bus counters (per slave address) when it has them."""
    entry = d.health.to_dict() | {"kind": d.device.transport.kind,
                                  "endpoint": d.device.transport.endpoint}
    if isinstance(d, DevicePoller):
        bus = getattr(d.transport, "bus", None)  # a BusDevice: a view of a shared SerialBus
        if isinstance(bus, SerialBus):
            entry["bus"] = bus.stats(d.device.device_id).to_dict()
    else:
        entry["hj212"] = d.stats()
    return entry


def _point_row(p: Any, value: Any, error: str | None = None) -> dict[str, Any]:
    row = {"key": p.key, "name": p.name, "name_zh": p.name_zh, "unit": p.unit, "value": value,
           "writable": p.writable}
    if error is not None:
        row["error"] = error
    return row


# --- the server -------------------------------------------------------------------------------


class ControlServer:
    """Serves `ControlOps` on a unix socket until cancelled; removes its socket file on exit."""

    def __init__(self, path: Path, ops: ControlOps, *, mode: int = 0o660,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self.path = Path(path)
        self.ops = ops
        self.mode = mode
        self._slots = asyncio.Semaphore(max_concurrent)
        self._clients: set[asyncio.Task[Any]] = set()

    async def serve(self) -> None:
        self._prepare_path()
        server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                 limit=MAX_LINE)
        inode = None
        try:
            # Between bind and chmod the socket has the umask's mode; 0660 is never looser.
            os.chmod(self.path, self.mode)
            inode = os.stat(self.path).st_ino
            log.info("control_socket_listening", path=str(self.path), mode=oct(self.mode))
            async with server:
                await server.serve_forever()
        finally:
            server.close()
            for task in list(self._clients):
                task.cancel()
            if self._clients:
                await asyncio.wait(list(self._clients))
            with contextlib.suppress(OSError):
                if inode is not None and os.stat(self.path).st_ino == inode:
                    self.path.unlink()
            log.info("control_socket_closed", path=str(self.path))

    def _prepare_path(self) -> None:
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise ControlSocketError(f"control socket path is longer than {_SUN_PATH_MAX} "
                                     f"bytes: {self.path} (set [control] socket)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("control_socket_stale", path=str(self.path))
                self.path.unlink(missing_ok=True)
                return
            except OSError as exc:
                raise ControlSocketError(f"{self.path}: {exc}") from exc
        raise ControlSocketError(f"another agent answers on {self.path}")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        uid = _peer_uid(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await _send(writer, error_reply("bad_request",
                                                    f"request longer than {MAX_LINE} bytes"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                async with self._slots:
                    reply = await self.ops.handle(line, peer_uid=uid)
                await _send(writer, reply)
        except ConnectionError:
            pass  # the client went away mid-answer
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply, ensure_ascii=False, default=str).encode() + b"\n")
    await writer.drain()


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


__all__ = ["ControlError", "ControlOps", "ControlServer", "ControlSocketError", "Request",
           "device_health", "error_reply"]
