"""Modbus RTU bus simulator: several slaves on one pseudo-terminal, speaking real RTU bytes.

`RtuBusSimulator` opens a pty pair (`os.openpty()`, raw mode), serves on the master side and
gives the slave side's path (`.path`, e.g. `/dev/pts/7`) to the agent, which opens it like
`/dev/ttyUSB0`. Every slave address on the line is served from one profile
(`firmware_stubs.rtu_slave.SlaveImage`); requests to other addresses are ignored as on a real
bus, broadcasts (address 0) are carried out and never answered.

Frames are found by the pure codec (`protocols.modbus_rtu.RtuDecoder`); a partial frame is
dropped once the line has been idle for a while, as a slave does after t3.5 of silence.
A pty has no baud rate, so with `wire_time=True` each answer is held back by the time its
request and its answer would take on the wire at `baudrate` (`protocols.modbus_rtu.char_time_s`):
the bus then has the throughput of a real line.

Faults per slave (`SlaveFaults`): silence, slow answers, a corrupted CRC, an exception code,
an answer that arrives but is wrong (short, another unit or function, a lying byte count, too
few registers), and
garbage bytes before the answer. Answers are scheduled one by one at their own times, so a
slave that answers late does not delay its neighbours (their frames may then meet on the
line, as on a real bus).

Scripting: `set_value()` / `clear_override()` / `get_value()` as for the TCP simulator,
`set_faults()`, and a JSON-lines control port (`control_port=0` picks one) that takes the
lines of `firmware_stubs.control` plus
`{"fault": {"device_id": 3, "silent": true}}` (the slave's whole fault set; `{"fault":
{"device_id": 3}}` clears it) and `{"stats": {}}` (requests and answers per slave).

As a process: ``python -m firmware_stubs.rtu_sim --profile gas-detector-v1 --profile
storage-tank-v1 --link-file /tmp/bus.link`` writes the pty path to the link file, prints
`READY path=/dev/pts/N` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from device_profiles import DeviceProfileError, Profile, find_profile
from firmware_stubs import control, sim_process
from firmware_stubs.errors import SimulatorError, UnknownPointError
from firmware_stubs.lifecycle import PtyLinked
from firmware_stubs.pty_line import PtyLine
from firmware_stubs.rtu_slave import SlaveFaults, SlaveImage
from protocols.modbus_pdu import encode_exception
from protocols.modbus_points import PointValue
from protocols.modbus_rtu import (
    BROADCAST,
    NEED_DATA,
    Direction,
    ModbusRtuError,
    RtuDecoder,
    RtuFrame,
    char_time_s,
    encode_frame,
    inter_frame_gap_s,
)
from runtime.counters import Counters

log = structlog.get_logger(__name__)

# A partial frame older than this is dropped: longer than any pause inside one write of the
# master, and t3.5 is far shorter, but a pty delivers a frame in one or a few reads.
_IDLE_FLUSH_S = 0.05
# §2.4.1 / §2.5.1: a slave's turnaround is not specified; real ones take about a millisecond.
_TURNAROUND_S = 0.0005


@dataclass(slots=True)
class SlaveStats(Counters):
    """What one simulated slave saw and did."""

    requests: int = 0
    answers: int = 0


class RtuBusSimulator(PtyLinked, control.ProfiledDevices[SlaveImage]):
    """Serve profiled slaves on one pseudo-terminal line; an async context manager.

    `profiles` maps slave address -> profile; a sequence takes addresses 1, 2, 3, ...
    """

    def __init__(self, profiles: Mapping[int, Profile] | Sequence[Profile] | Profile, *,
                 baudrate: int = 9600, bytesize: int = 8, parity: str = "N",
                 stopbits: int = 1, wire_time: bool = True, seed: int = 0,
                 control_host: str = "127.0.0.1", control_port: int | None = None) -> None:
        if isinstance(profiles, Profile):
            mapping: dict[int, Profile] = {1: profiles}
        elif isinstance(profiles, Mapping):
            mapping = dict(profiles)
        else:
            mapping = {i + 1: p for i, p in enumerate(profiles)}
        if not mapping:
            raise SimulatorError("no slave to simulate")
        self._char_s = char_time_s(baudrate, bytesize, parity, stopbits)
        self.baudrate = baudrate
        self.gap_s = inter_frame_gap_s(baudrate, bytesize, parity, stopbits)
        self.wire_time = wire_time
        self._rng = random.Random(seed)
        self._t0 = time.monotonic()
        self._devices = {a: SlaveImage(a, p, rng=self._rng, t0=self._t0)
                        for a, p in sorted(mapping.items())}
        self._faults = {a: SlaveFaults() for a in self._devices}
        self._stats = {a: SlaveStats() for a in self._devices}
        self._decoder = RtuDecoder(Direction.REQUEST)
        self._control_host = control_host
        self._requested_control_port = control_port
        self._control: asyncio.Server | None = None
        self._line: PtyLine | None = None
        self._symlink = None  # the bus is opened by its pty path
        self._flush_handle: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.TimerHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.path = ""
        self.control_port: int | None = None
        # (monotonic time, slave address) of the latest requests seen on the line, any address.
        self.request_log: deque[tuple[float, int]] = deque(maxlen=4096)
        self.bad_frames = 0  # request frames with a bad CRC or no frame at all
        self.unwritten = 0  # answers the line could not take (the master is not reading)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open_line()
        self._t0 = time.monotonic()
        for image in self._devices.values():
            image.restart(self._t0)
        self._control, self.control_port = await control.open_control(
            self, self._control_host, self._requested_control_port, self.handle_control)
        log.info("rtu_sim_started", path=self.path, baudrate=self.baudrate,
                 control_port=self.control_port, slaves=self.profile_ids)

    async def stop(self) -> None:
        await control.close_control(self._control)
        self._control = None
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._close_line():
            log.info("rtu_sim_stopped", path=self.path)

    # --- scripting --------------------------------------------------------------------------

    def set_value(self, point_key: str, value: PointValue, device_id: int = 1) -> None:
        """Pin a point to `value` until `clear_override()` (or a client write to it)."""
        self._slave(device_id, point_key).set_value(point_key, value)

    def clear_override(self, point_key: str, device_id: int = 1) -> None:
        self._slave(device_id, point_key).clear_override(point_key)

    def get_value(self, point_key: str, device_id: int = 1) -> PointValue:
        return self._slave(device_id, point_key).get_value(point_key, time.monotonic())

    def faults(self, device_id: int) -> SlaveFaults:
        return self._faults[self._slave(device_id).address]

    def set_faults(self, device_id: int, faults: SlaveFaults | None = None, **changes: Any) -> None:
        """Replace a slave's faults (`faults`), or change some of them (`silent=True`)."""
        address = self._slave(device_id).address
        base = faults if faults is not None else self._faults[address]
        self._faults[address] = replace(base, **changes) if changes else base
        log.info("rtu_sim_faults", device_id=address, faults=repr(self._faults[address]))

    def clear_faults(self, device_id: int | None = None) -> None:
        for address in [device_id] if device_id is not None else list(self._devices):
            self.set_faults(address, SlaveFaults())

    def stats(self, device_id: int) -> SlaveStats:
        return self._stats[self._slave(device_id).address]

    def _slave(self, device_id: int, point_key: str = "") -> SlaveImage:
        slave = self._devices.get(device_id)
        if slave is None:
            raise UnknownPointError(device_id, point_key)
        return slave

    # --- the line ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        data = self._read_line()
        if not data:
            return
        self._decoder.feed(data)
        while True:
            try:
                frame = self._decoder.next_frame()
            except ModbusRtuError:
                self.bad_frames += 1
                continue
            if frame is NEED_DATA:
                break
            self._on_frame(frame)
        if self._decoder.buffered:
            assert self._loop is not None
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = self._loop.call_later(_IDLE_FLUSH_S, self._flush_partial)

    def _flush_partial(self) -> None:
        self._flush_handle = None
        if self._decoder.flush():
            self.bad_frames += 1

    def _on_frame(self, frame: RtuFrame) -> None:
        now = time.monotonic()
        self.request_log.append((now, frame.address))
        if frame.address == BROADCAST:
            for each in self._devices.values():
                each.broadcast(frame.pdu, now)
            return
        slave = self._devices.get(frame.address)
        if slave is None:
            return  # another slave's business
        stats, faults = self._stats[frame.address], self._faults[frame.address]
        stats.requests += 1
        out = b""
        if faults.garbage:
            out += bytes(self._rng.getrandbits(8) for _ in range(faults.garbage))
        if not faults.silent:
            if faults.exception_code is not None:
                pdu = encode_exception(frame.function & 0x7F or 1, faults.exception_code)
            else:
                pdu = slave.answer(frame.pdu, now)
            answer = _spoil(frame.address, pdu, faults.wrong_answer)
            if faults.bad_crc:
                answer = answer[:-2] + bytes((answer[-2] ^ 0xFF, answer[-1] ^ 0x5A))
            out += answer
            stats.answers += 1
        if not out:
            return
        delay = _TURNAROUND_S + faults.delay_s
        if self.wire_time:
            # The request's frame ends on the wire only now, the answer's after its own bytes.
            delay += (len(frame.pdu) + 3 + len(out)) * self._char_s
        assert self._loop is not None
        handle: asyncio.TimerHandle
        handle = self._loop.call_later(delay, lambda: self._send(handle, out))
        self._pending.add(handle)

    def _send(self, handle: asyncio.TimerHandle, data: bytes) -> None:
        self._pending.discard(handle)
        if self._line is not None and not self._line.write(data):
            self.unwritten += 1

    # --- control channel --------------------------------------------------------------------

    def handle_control(self, line: bytes | str) -> dict[str, Any]:
        """One control request line (see the module doc); always a reply, never raises."""
        return control.handle_own_control(self, line, _RtuControl, self._answer_own)

    def _answer_own(self, request: _RtuControl) -> dict[str, Any]:
        try:
            if request.fault is not None:
                fields = request.fault.model_dump(exclude={"device_id"}, exclude_unset=True)
                self.set_faults(request.fault.device_id, SlaveFaults(**fields))
                return {"ok": True}
            return {"ok": True, "stats": {str(a): s.to_dict() for a, s in self._stats.items()},
                    "bad_frames": self.bad_frames}
        except SimulatorError as exc:
            return {"ok": False, "error": str(exc)}


def _spoil(address: int, pdu: bytes, how: str | None) -> bytes:
    """The answer frame, spoiled as `SlaveFaults.wrong_answer` says (see there)."""
    if how == "wrong_unit":
        return encode_frame(address % 247 + 1, pdu)
    if how == "wrong_function":
        return encode_frame(address, bytes((pdu[0] % 4 + 1,)) + pdu[1:])
    is_read = pdu[0] in (1, 2, 3, 4) and len(pdu) >= 2
    if how == "lying_count" and is_read:
        return encode_frame(address, bytes((pdu[0], pdu[1] + 2)) + pdu[2:])
    if how == "few_registers" and is_read and pdu[1] > 1:
        drop = 1 if pdu[0] in (1, 2) else 2
        return encode_frame(address, bytes((pdu[0], pdu[1] - drop)) + pdu[2:-drop])
    frame = encode_frame(address, pdu)
    if how == "short":
        return frame[: max(2, len(frame) - 3)]
    return frame


class _FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: int = Field(ge=1, le=247)
    silent: bool = False
    delay_s: float = Field(0.0, ge=0, le=60)
    bad_crc: bool = False
    exception_code: int | None = Field(None, ge=1, le=255)
    garbage: int = Field(0, ge=0, le=256)
    wrong_answer: str | None = None  # checked by SlaveFaults


_RtuControl = control.FaultOrStats[_FaultRequest]


# --- process entry --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "rtu_sim", "Simulate profiled Modbus RTU slaves on one pseudo-terminal line.",
        "--profile gas-detector-v1 --profile storage-tank-v1 --baudrate 19200 "
        "--link-file /tmp/bus.link --control-port 0", profiles="slaves on consecutive addresses")
    parser.add_argument("--first-id", type=int, default=1, help="address of the first slave")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--no-wire-time", action="store_true",
                        help="answer at once instead of at the speed of the baud rate")
    sim_process.add_pty_arguments(parser)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    profiles = {args.first_id + i: find_profile(name, extra_dirs=args.profile_dir)
                for i, name in enumerate(args.profile)}
    sim = RtuBusSimulator(profiles, baudrate=args.baudrate, parity=args.parity,
                          stopbits=args.stopbits, wire_time=not args.no_wire_time,
                          seed=args.seed, control_port=args.control_port)
    await sim_process.serve_until_signal(sim, sim_process.announce_pty(args.link_file))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad profile or argument."""
    args = _parse_args(argv)
    return sim_process.run(_serve(args),
                           (SimulatorError, DeviceProfileError, ModbusRtuError, OSError))


if __name__ == "__main__":
    sys.exit(main())
