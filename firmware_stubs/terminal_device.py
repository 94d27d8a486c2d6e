"""The behaviour of a simulated 叫应 terminal, whatever its line (`firmware_stubs.terminal_sim`
holds the TCP and pty transports, the process entry and the full description).

`TerminalSimulator` answers FLT/1 frames (`protocols.terminal`) as docs/terminal-protocol.md
says, plays the scripted person, repeats unconfirmed ACKs and applies `TerminalFaults`; a
subclass gives it `_open()`, `_close()` and `_write()` and feeds it bytes with `_on_bytes()`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from firmware_stubs.control import OwnRequest, StatsRequest, close_control, open_control
from firmware_stubs.control import handle_own_control as _handle_own_control
from firmware_stubs.errors import SimulatorError, UnknownPointError
from firmware_stubs.lifecycle import StartStop, cancel_and_wait
from protocols import terminal as tm

log = structlog.get_logger(__name__)

_REMEMBERED = 16  # §4.3: (seq, type) pairs a receiver remembers for duplicates


@dataclass(frozen=True, slots=True)
class TerminalFaults:
    """What is wrong with the terminal, and the state its heartbeat reports."""

    no_power: bool = False
    speaker_fault: bool = False
    silent: bool = False
    garbage: int = 0
    mains: bool = True
    battery: int | None = 100
    tamper: bool = False
    camera: tm.CameraState | None = None  # None: OK on a video terminal, NONE on an audio one

    def __post_init__(self) -> None:
        if self.garbage < 0:
            raise SimulatorError("garbage is a number of bytes, at least 0")
        if self.battery is not None and not 0 <= self.battery <= 100:
            raise SimulatorError(f"battery {self.battery} is not a percentage")


@dataclass(frozen=True, slots=True)
class Played:
    """A warning as the terminal played it: which frame brought it, and when."""

    seq: int
    play: tm.Play
    at: float


class TerminalSimulator(StartStop):
    """The terminal's behaviour, whatever the line; subclasses own the transport."""

    def __init__(self, terminal_id: str, *, video: bool = False, heartbeat_s: float = 30.0,
                 press_after_s: float | None = None, ack_retry_s: float = 3.0, seed: int = 0,
                 control_host: str = "127.0.0.1", control_port: int | None = None) -> None:
        tm.Heartbeat(terminal_id, 0, max(1, min(0xFFFF, round(heartbeat_s))), None, True)  # checks
        if heartbeat_s <= 0 or ack_retry_s <= 0:
            raise SimulatorError("heartbeat_s and ack_retry_s must be positive")
        self.terminal_id = terminal_id
        self.video = video
        self.heartbeat_s = heartbeat_s
        self.press_after_s = press_after_s
        self.ack_retry_s = ack_retry_s
        self.faults = TerminalFaults()
        self.played: list[Played] = []
        self.displayed: list[tm.Display] = []
        self.acks_sent: list[tm.Ack] = []
        self.acks_confirmed: list[tm.Ack] = []
        self.errors_received: list[tm.ErrorReport] = []
        self.control_port: int | None = None
        self._pending: dict[int, tm.Ack] = {}  # seq -> ACK not yet confirmed
        # (seq, type) -> (the frame's message, our answer), for repeats (§4.3)
        self._answers: collections.OrderedDict[tuple[int, int],
                                               tuple[tm.Message | None, tm.Message]] = \
            collections.OrderedDict()
        self._presses: dict[int, asyncio.TimerHandle] = {}
        self._seq = 0
        self._decoder = tm.TerminalDecoder()
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._control_host, self._requested_control_port = control_host, control_port
        self._control: asyncio.Server | None = None
        self._t0 = time.monotonic()
        self._stats: dict[str, int] = {
            "heartbeats": 0, "receipts_sent": 0, "errors_sent": 0, "plays": 0, "duplicates": 0,
            "displays": 0, "acks_sent": 0, "ack_repeats": 0, "acks_confirmed": 0,
            "receipts_received": 0, "errors_received": 0, "refused": 0, "unpowered_bytes": 0,
            "unsent_frames": 0, "garbage_sent": 0, "connections": 0,
        }

    # --- transport (subclasses) -------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        """Put bytes on the line; False when nothing is connected to take them."""
        raise NotImplementedError

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._t0 = time.monotonic()
        await self._open()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(),
                                name=f"terminal_sim.heartbeat[{self.terminal_id}]"),
            asyncio.create_task(self._ack_retry_loop(),
                                name=f"terminal_sim.acks[{self.terminal_id}]"),
        ]
        self._control, self.control_port = await open_control(
            self, self._control_host, self._requested_control_port, self.handle_control)
        log.info("terminal_sim_started", terminal_id=self.terminal_id, video=self.video,
                 control_port=self.control_port)

    async def stop(self) -> None:
        await close_control(self._control)
        self._control = None
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        for handle in self._presses.values():
            handle.cancel()
        self._presses.clear()
        await self._close()
        log.info("terminal_sim_stopped", terminal_id=self.terminal_id)

    # --- scripting --------------------------------------------------------------------------

    def set_faults(self, faults: TerminalFaults | None = None, **changes: Any) -> None:
        """Replace the faults, or change some of them (`speaker_fault=True`, `garbage=64`).
        A change of what a heartbeat reports sends one at once; power back sends one too."""
        before = self.faults
        base = faults if faults is not None else before
        self.faults = dataclasses.replace(base, **changes) if changes else base
        log.info("terminal_sim_faults", terminal_id=self.terminal_id, faults=repr(self.faults))
        powered_up = before.no_power and not self.faults.no_power
        if powered_up or self._heartbeat(before, time=0) != self._heartbeat(time=0):
            self.send_heartbeat()
        if powered_up:
            self._repeat_acks()

    inject = set_faults

    def set_person(self, press_after_s: float | None) -> None:
        """The person presses this long after each delivered PLAY from now on (None: never)."""
        self.press_after_s = press_after_s

    def press(self, warning_id: int | None = None, button: int = 1) -> tm.Ack:
        """The button is pressed now, for `warning_id` (default: the last warning played)."""
        if warning_id is None:
            warning_id = self.played[-1].play.warning_id if self.played else 0
        handle = self._presses.pop(warning_id, None)
        if handle is not None:
            handle.cancel()
        ack = tm.Ack(warning_id, self._clock(), button, self.terminal_id)
        seq = self._next_seq()
        self._pending[seq] = ack
        self.acks_sent.append(ack)
        self._stats["acks_sent"] += 1
        self._send_frame(seq, ack)
        return ack

    def stats(self) -> dict[str, int]:
        return {**self._stats, "pending_acks": len(self._pending),
                "garbage_bytes": self._decoder.discarded, "bad_frames": self._decoder.errors}

    def state(self) -> dict[str, Any]:
        """What the terminal did, for a control client (JSON-ready)."""
        return {"played": [{"seq": p.seq, **dataclasses.asdict(p.play)} for p in self.played],
                "displayed": [dataclasses.asdict(d) for d in self.displayed],
                "acks_sent": [dataclasses.asdict(a) for a in self.acks_sent],
                "acks_confirmed": [dataclasses.asdict(a) for a in self.acks_confirmed]}

    # the common control lines (`firmware_stubs.control.Scriptable`): a terminal has no points
    @property
    def profile_ids(self) -> dict[int, str]:
        return {1: "jiaoying-terminal-video" if self.video else "jiaoying-terminal"}

    def seconds(self) -> float:
        return time.monotonic() - self._t0

    def set_value(self, point_key: str, value: Any, device_id: int = 1) -> None:
        raise UnknownPointError(device_id, point_key)

    def clear_override(self, point_key: str, device_id: int = 1) -> None:
        raise UnknownPointError(device_id, point_key)

    def get_value(self, point_key: str, device_id: int = 1) -> Any:
        raise UnknownPointError(device_id, point_key)

    # --- sending ----------------------------------------------------------------------------

    def _clock(self) -> int:
        return int(time.time())

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) & 0xFFFF
        return seq

    def _send_frame(self, seq: int, message: tm.Message) -> None:
        if self.faults.no_power:
            self._stats["unsent_frames"] += 1
            return
        out = b""
        if self.faults.garbage:
            out = bytes(self._rng.getrandbits(8) for _ in range(self.faults.garbage))
            self._stats["garbage_sent"] += self.faults.garbage
            self.faults = dataclasses.replace(self.faults, garbage=0)
        if not self._write(out + tm.encode_frame(tm.TerminalFrame(seq, message))):
            self._stats["unsent_frames"] += 1

    def _heartbeat(self, faults: TerminalFaults | None = None, time: int | None = None
                   ) -> tm.Heartbeat:
        f = faults or self.faults
        camera = f.camera if f.camera is not None else (
            tm.CameraState.OK if self.video else tm.CameraState.NONE)
        return tm.Heartbeat(self.terminal_id, self._clock() if time is None else time,
                            max(1, min(0xFFFF, round(self.heartbeat_s))), f.battery, f.mains,
                            speaker_fault=f.speaker_fault, tamper=f.tamper, camera=camera)

    def send_heartbeat(self) -> None:
        if self.faults.no_power:
            return
        self._stats["heartbeats"] += 1
        self._send_frame(self._next_seq(), self._heartbeat())

    def _repeat_acks(self) -> None:
        for seq, ack in list(self._pending.items()):
            self._stats["ack_repeats"] += 1
            self._send_frame(seq, ack)

    def _connected(self) -> None:
        """A new connection: say who we are and repeat what is unconfirmed (§2, §4.3)."""
        self._stats["connections"] += 1
        self.send_heartbeat()
        if not self.faults.no_power:
            self._repeat_acks()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send_heartbeat()

    async def _ack_retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_retry_s)
            if not self.faults.no_power:
                self._repeat_acks()

    # --- receiving --------------------------------------------------------------------------

    def _on_bytes(self, data: bytes) -> None:
        if self.faults.no_power:
            self._stats["unpowered_bytes"] += len(data)
            return
        self._decoder.feed(data)
        while True:
            try:
                frame = self._decoder.next_frame()
            except tm.TerminalFrameRefused as exc:
                self._stats["refused"] += 1
                self._answer(exc.seq, exc.message_type,
                             tm.ErrorReport(exc.seq, exc.message_type, exc.code, exc.reason[:200]))
                continue
            except tm.TerminalError as exc:
                log.debug("terminal_sim_bad_frame", terminal_id=self.terminal_id, error=str(exc))
                continue
            if frame is tm.NEED_DATA:
                return
            self._handle(frame)

    def _answer(self, seq: int, kind: int, answer: tm.Message,
                message: tm.Message | None = None) -> None:
        """Send `answer` to frame (seq, kind) carrying `message`, and remember it: a repeat
        is the same seq, type and message (a restarted gateway may reuse a seq)."""
        self._answers[(seq, kind)] = (message, answer)
        while len(self._answers) > _REMEMBERED:
            self._answers.popitem(last=False)
        self._send_answer(answer)

    def _send_answer(self, answer: tm.Message) -> None:
        if isinstance(answer, tm.Receipt):
            if self.faults.silent:
                return
            self._stats["receipts_sent"] += 1
        else:
            self._stats["errors_sent"] += 1
        self._send_frame(self._next_seq(), answer)

    def _handle(self, frame: tm.TerminalFrame) -> None:
        message, key = frame.message, (frame.seq, int(frame.type))
        remembered = self._answers.get(key)
        if remembered is not None and remembered[0] == message:
            self._stats["duplicates"] += 1
            self._send_answer(remembered[1])
            return
        match message:
            case tm.Play():
                self._on_play(frame.seq, message)
            case tm.Display():
                self._stats["displays"] += 1
                self.displayed.append(message)
                self._answer(*key, self._receipt(frame), message)
            case tm.Receipt():
                self._stats["receipts_received"] += 1
                ack = self._pending.get(message.ref_seq)
                if message.ref_type is tm.MessageType.ACK and ack is not None \
                        and ack.warning_id == message.id:
                    del self._pending[message.ref_seq]
                    self.acks_confirmed.append(ack)
                    self._stats["acks_confirmed"] += 1
            case tm.ErrorReport():
                self._stats["errors_received"] += 1
                self.errors_received.append(message)
            case _:  # an ACK or a HEARTBEAT: a terminal's messages, not a gateway's
                self._answer(*key, tm.ErrorReport(frame.seq, frame.type, tm.ErrorCode.OTHER,
                                                  "a terminal does not take this message"))

    def _receipt(self, frame: tm.TerminalFrame) -> tm.Receipt:
        return tm.Receipt(frame.seq, frame.type, tm.receipt_id(frame.message), self._clock())

    def _on_play(self, seq: int, play: tm.Play) -> None:
        if self.faults.speaker_fault:
            self._answer(seq, tm.MessageType.PLAY,
                         tm.ErrorReport(seq, tm.MessageType.PLAY, tm.ErrorCode.SPEAKER_FAULT,
                                        "speaker open circuit"), play)
            return
        self._stats["plays"] += 1
        self.played.append(Played(seq, play, time.monotonic()))
        log.info("terminal_sim_played", terminal_id=self.terminal_id,
                 warning_id=play.warning_id, warning_level=play.level.name)
        self._answer(seq, tm.MessageType.PLAY, self._receipt(tm.TerminalFrame(seq, play)), play)
        if self.press_after_s is not None and play.warning_id not in self._presses:
            loop = asyncio.get_running_loop()
            self._presses[play.warning_id] = loop.call_later(
                self.press_after_s, self._person_presses, play.warning_id)

    def _person_presses(self, warning_id: int) -> None:
        self._presses.pop(warning_id, None)
        if not self.faults.no_power:
            self.press(warning_id)

    # --- control channel --------------------------------------------------------------------

    def handle_control(self, line: bytes | str) -> dict[str, Any]:
        """One control request line (see the module doc); always a reply, never raises."""
        return _handle_own_control(self, line, _TerminalControl, self._answer_own)

    def _answer_own(self, request: _TerminalControl) -> dict[str, Any]:
        try:
            if request.fault is not None:
                changes = request.fault.model_dump(exclude_unset=True)
                if changes.get("camera") is not None:
                    changes["camera"] = tm.CameraState[changes["camera"].upper()]
                self.set_faults(**changes)
            elif request.person is not None:
                self.set_person(request.person.press_after_s)
            elif request.press is not None:
                ack = self.press(request.press.warning_id, request.press.button)
                return {"ok": True, "ack": dataclasses.asdict(ack)}
            elif request.state is not None:
                return {"ok": True, **self.state()}
            else:
                return {"ok": True, "stats": self.stats()}
        except (SimulatorError, tm.TerminalError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}


class _FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    no_power: bool = False
    speaker_fault: bool = False
    silent: bool = False
    garbage: int = Field(0, ge=0, le=4096)
    mains: bool = True
    battery: int | None = Field(100, ge=0, le=100)
    tamper: bool = False
    camera: Literal["none", "ok", "fault", "obstructed"] | None = None


class _PersonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    press_after_s: float | None = Field(..., ge=0, le=86400)


class _PressRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warning_id: int | None = Field(None, ge=0, le=0xFFFFFFFF)
    button: int = Field(1, ge=1, le=255)


class _TerminalControl(OwnRequest):
    """The terminal simulator's own control lines: exactly one of these."""

    fault: _FaultRequest | None = None
    person: _PersonRequest | None = None
    press: _PressRequest | None = None
    state: StatsRequest | None = None
    stats: StatsRequest | None = None


__all__ = ["Played", "TerminalFaults", "TerminalSimulator"]
