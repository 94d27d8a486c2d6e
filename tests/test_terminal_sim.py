"""叫应 terminal simulator over real TCP and ptys: receipts, the scripted person, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from firmware_stubs.errors import SimulatorError
from firmware_stubs.terminal_sim import (
    PtyTerminalSimulator,
    TcpTerminalSimulator,
    TerminalSimulator,
)
from protocols import terminal as tm
from tests.helpers import Inbox, serial_port, until

TIMEOUT = 15.0  # generous: a loaded 2-core box; the tests wait on behaviour, not time
RED = tm.Play(1001, tm.WarningLevel.RED, 3, "暴雨红色预警：请立即转移")


class Gateway(Inbox[tm.TerminalFrame]):
    """The gateway's side of one terminal: frames in and out through our codec. `read()`
    returns within a fraction of a second, with b"" when nothing came."""

    def __init__(self, read: Callable[[], Any], write: Callable[[bytes], Any]) -> None:
        super().__init__()
        self._read, self._write = read, write
        self.decoder = tm.TerminalDecoder()
        self.seq = 100

    async def send(self, message: tm.Message, seq: int | None = None) -> int:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        await self._write(tm.encode(seq, message))
        return seq

    async def raw(self, data: bytes) -> None:
        await self._write(data)

    async def expect(self, match: Callable[[tm.Message], bool] = lambda m: True,
                     timeout: float = TIMEOUT) -> tm.TerminalFrame:
        """The first frame received whose message matches."""
        return await self._take(lambda frame: match(frame.message), timeout)

    async def _pump(self) -> None:
        self.decoder.feed(await self._read())
        while True:
            try:
                item = self.decoder.next_frame()
            except tm.TerminalError:
                continue  # counted by the decoder
            if item is tm.NEED_DATA:
                return
            self._received(item)

    async def heartbeat(self,
                        match: Callable[[tm.Heartbeat], bool] = lambda h: True) -> tm.Heartbeat:
        frame = await self.expect(lambda m: isinstance(m, tm.Heartbeat) and match(m))
        assert isinstance(frame.message, tm.Heartbeat)
        return frame.message

    async def answer_to(self, seq: int) -> tm.Message:
        """The RECEIPT or ERROR that names our frame `seq`."""
        frame = await self.expect(lambda m: isinstance(m, tm.Receipt | tm.ErrorReport)
                                  and m.ref_seq == seq)
        return frame.message

    async def ack(self) -> tm.TerminalFrame:
        return await self.expect(lambda m: isinstance(m, tm.Ack))


@contextlib.asynccontextmanager
async def tcp_gateway(sim: TcpTerminalSimulator) -> AsyncIterator[Gateway]:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def read() -> bytes:
        try:
            data = await asyncio.wait_for(reader.read(4096), 0.2)
        except TimeoutError:
            return b""
        if not data:
            raise ConnectionError("the terminal closed the connection")
        return data

    try:
        yield Gateway(read, write)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def pty_gateway(sim: PtyTerminalSimulator) -> AsyncIterator[Gateway]:
    async with serial_port(sim.link_path) as port:

        async def write(data: bytes) -> None:
            await asyncio.to_thread(port.write, data)

        async def read() -> bytes:
            return await asyncio.to_thread(lambda: port.read(max(1, port.in_waiting)))

        yield Gateway(read, write)


@contextlib.asynccontextmanager
async def terminal(**kwargs: Any) -> AsyncIterator[tuple[TcpTerminalSimulator, Gateway]]:
    kwargs.setdefault("press_after_s", 0.1)
    async with TcpTerminalSimulator("JY-0001", **kwargs) as sim, tcp_gateway(sim) as gw:
        yield sim, gw


# ---------------------------------------------------------------------------- over TCP


async def test_full_round_over_tcp() -> None:
    """Heartbeat on connect; PLAY gets a receipt naming it; the person's ACK; its receipt."""
    async with terminal(press_after_s=0.2) as (sim, gw):
        hb = await gw.heartbeat()
        assert (hb.terminal_id, hb.mains, hb.speaker_fault, hb.camera) == \
            ("JY-0001", True, False, tm.CameraState.NONE)
        seq = await gw.send(RED)
        receipt = await gw.answer_to(seq)
        assert isinstance(receipt, tm.Receipt)
        assert (receipt.ref_type, receipt.id) == (tm.MessageType.PLAY, 1001)
        assert abs(receipt.time - time.time()) < 60
        ack_frame = await gw.ack()
        ack = ack_frame.message
        assert isinstance(ack, tm.Ack)
        assert (ack.warning_id, ack.terminal_id, ack.button) == (1001, "JY-0001", 1)
        await gw.send(tm.Receipt(ack_frame.seq, tm.MessageType.ACK, 1001, int(time.time())))
        await until(lambda: sim.acks_confirmed == [ack], "the ack to be confirmed")
        assert [p.play for p in sim.played] == [RED]


async def test_heartbeat_is_answered_and_periodic() -> None:
    """Heartbeats come every heartbeat_s; the gateway's receipt to one is taken quietly."""
    async with terminal(heartbeat_s=0.2) as (sim, gw):
        first = await gw.expect(lambda m: isinstance(m, tm.Heartbeat))
        await gw.send(tm.Receipt(first.seq, tm.MessageType.HEARTBEAT, 0, int(time.time())))
        await gw.heartbeat()
        await gw.heartbeat()
        await until(lambda: sim.stats()["receipts_received"] == 1, "the receipt")
        assert sim.stats()["errors_sent"] == 0


async def test_ack_is_repeated_until_its_receipt() -> None:
    """An unconfirmed ACK comes again with the same seq, and stops once the receipt names it."""
    async with terminal(ack_retry_s=0.2) as (sim, gw):
        seq = await gw.send(RED)
        await gw.answer_to(seq)
        first = await gw.ack()
        again = await gw.ack()
        assert again == first
        await gw.send(tm.Receipt(first.seq, tm.MessageType.ACK, 1001, 0))
        await until(lambda: sim.stats()["pending_acks"] == 0, "the ack to be confirmed")
        repeats = sim.stats()["ack_repeats"]
        await asyncio.sleep(0.6)  # three retry periods: nothing more may come
        assert sim.stats()["ack_repeats"] == repeats and sim.stats()["acks_sent"] == 1


async def test_ack_survives_a_reconnect() -> None:
    """An ACK unconfirmed when the connection drops is sent again on the next connection."""
    async with TcpTerminalSimulator("JY-0001", press_after_s=0.0, ack_retry_s=60) as sim:
        async with tcp_gateway(sim) as gw:
            await gw.answer_to(await gw.send(RED))
            lost = await gw.ack()
        async with tcp_gateway(sim) as gw:
            await gw.heartbeat()
            assert await gw.ack() == lost


async def test_person_who_never_answers() -> None:
    """With press_after_s=None the warning is delivered and played but never acknowledged."""
    async with terminal(press_after_s=None) as (sim, gw):
        assert isinstance(await gw.answer_to(await gw.send(RED)), tm.Receipt)
        await asyncio.sleep(0.5)
        assert sim.acks_sent == [] and len(sim.played) == 1
        sim.press()  # a press by hand still works
        assert (await gw.ack()).message == sim.acks_sent[0]


async def test_repeated_play_is_answered_not_replayed() -> None:
    """A repeated PLAY (same seq and body) is answered, not replayed; a new seq or body plays."""
    async with terminal(press_after_s=None) as (sim, gw):
        seq = await gw.send(RED)
        first = await gw.answer_to(seq)
        await gw.send(RED, seq=seq)
        assert await gw.answer_to(seq) == first
        reminder = await gw.send(RED)
        assert isinstance(await gw.answer_to(reminder), tm.Receipt)
        other = tm.Play(1002, tm.WarningLevel.ORANGE, 1, "a restarted gateway reuses seq numbers")
        await gw.send(other, seq=seq)
        assert isinstance(await gw.answer_to(seq), tm.Receipt)
        assert [(p.seq, p.play.warning_id) for p in sim.played] == \
            [(seq, 1001), (reminder, 1001), (seq, 1002)]
        assert sim.stats()["duplicates"] == 1


async def test_display_gets_a_receipt() -> None:
    """A DISPLAY is shown and answered by a receipt with its display id."""
    async with terminal() as (sim, gw):
        text = tm.Display(42, 600, "请转移到安全地带")
        receipt = await gw.answer_to(await gw.send(text))
        assert isinstance(receipt, tm.Receipt) and (receipt.ref_type, receipt.id) == \
            (tm.MessageType.DISPLAY, 42)
        assert sim.displayed == [text]


async def test_speaker_fault_in_heartbeat_and_error() -> None:
    """A speaker fault shows in a heartbeat at once, and a PLAY gets ERROR SPEAKER_FAULT."""
    async with terminal() as (sim, gw):
        await gw.heartbeat()
        sim.set_faults(speaker_fault=True)
        assert (await gw.heartbeat()).speaker_fault
        seq = await gw.send(RED)
        error = await gw.answer_to(seq)
        assert isinstance(error, tm.ErrorReport)
        assert (error.code, error.ref_type) == (tm.ErrorCode.SPEAKER_FAULT, tm.MessageType.PLAY)
        await asyncio.sleep(0.4)
        assert sim.played == [] and sim.acks_sent == []


async def test_silent_terminal_plays_without_receipts() -> None:
    """With `silent` no receipt comes, but the warning plays and the person still answers."""
    async with terminal() as (sim, gw):
        sim.set_faults(silent=True)
        await gw.send(RED)
        ack = await gw.ack()
        assert isinstance(ack.message, tm.Ack) and ack.message.warning_id == 1001
        assert not any(isinstance(f.message, tm.Receipt) for f in gw.seen)
        assert len(sim.played) == 1


async def test_no_power_is_silence_then_a_reboot() -> None:
    """Without power nothing is read or sent; power back brings a heartbeat and the ACK."""
    async with terminal(press_after_s=None, heartbeat_s=0.2, ack_retry_s=60) as (sim, gw):
        await gw.answer_to(await gw.send(RED))
        sim.press()
        first = await gw.ack()
        sim.set_faults(no_power=True)
        seq = await gw.send(tm.Display(1, 0, "anyone?"))
        await until(lambda: sim.stats()["unpowered_bytes"] > 0, "the bytes to arrive")
        gw.inbox.clear()
        before = len(gw.seen)
        await asyncio.sleep(0.6)  # three heartbeat periods
        with contextlib.suppress(TimeoutError):
            await gw.expect(timeout=0.3)
        assert len(gw.seen) == before and sim.displayed == []
        sim.set_faults(no_power=False)
        await gw.heartbeat()
        assert await gw.ack() == first
        assert sim.displayed == []
        assert not any(isinstance(f.message, tm.Receipt | tm.ErrorReport)
                       and f.message.ref_seq == seq
                       for f in gw.seen)  # the DISPLAY sent while it was off was never read


async def test_garbage_before_a_frame() -> None:
    """Garbage bytes go out before the next frame; the gateway's decoder skips them."""
    async with terminal() as (sim, gw):
        await gw.heartbeat()
        sim.set_faults(garbage=200, tamper=True)
        assert (await gw.heartbeat()).tamper
        assert gw.decoder.discarded >= 200 and sim.stats()["garbage_sent"] == 200


async def test_bad_frames_from_the_gateway() -> None:
    """Noise is counted; an unknown type and a malformed body get ERRORs naming them."""
    async with terminal() as (sim, gw):
        await gw.raw(b"\x00\xffnoise\r\n\xfb\x4a\x01")
        header = bytes((1, 0x42, 0, 9, 0, 0))
        await gw.raw(b"\xfb\x4a" + header + tm.crc16(header).to_bytes(2, "big") + b"\xff\xff")
        unknown = await gw.answer_to(9)
        assert isinstance(unknown, tm.ErrorReport) and unknown.code == tm.ErrorCode.UNKNOWN_TYPE
        await gw.send(tm.Ack(1, 0, 1, "GW"))  # a terminal's message sent to a terminal
        assert isinstance(await gw.expect(lambda m: isinstance(m, tm.ErrorReport)
                                          and m.code == tm.ErrorCode.OTHER), tm.TerminalFrame)
        await gw.answer_to(await gw.send(RED))  # still answering
        assert sim.stats()["garbage_bytes"] >= 9 and sim.stats()["refused"] == 1


async def test_video_terminal_reports_its_camera() -> None:
    """A video terminal reports camera OK, and a change at once."""
    async with terminal(video=True) as (sim, gw):
        assert (await gw.heartbeat()).camera == tm.CameraState.OK
        sim.set_faults(camera=tm.CameraState.OBSTRUCTED, mains=False, battery=40)
        hb = await gw.heartbeat(lambda h: h.camera == tm.CameraState.OBSTRUCTED)
        assert (hb.mains, hb.battery) == (False, 40)


async def test_new_connection_replaces_the_old() -> None:
    """A second connection takes over; the first is closed by the terminal."""
    async with TcpTerminalSimulator("JY-0001") as sim, tcp_gateway(sim) as old:
        await old.heartbeat()
        async with tcp_gateway(sim) as new:
            await new.heartbeat()
            with pytest.raises(ConnectionError):
                await old.expect(lambda m: False, timeout=5)
            await new.answer_to(await new.send(RED))


async def test_control_port_scripts_the_terminal() -> None:
    """The JSON-lines control port sets faults and the person, presses, and reports state."""
    async with terminal(press_after_s=None, control_port=0) as (sim, gw):
        assert sim.control_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.control_port)

        async def ask(request: dict[str, Any]) -> dict[str, Any]:
            writer.write(json.dumps(request).encode() + b"\n")
            reply: dict[str, Any] = json.loads(await reader.readline())
            return reply

        try:
            assert (await ask({"fault": {"camera": "fault", "speaker_fault": True}}))["ok"]
            assert sim.faults.speaker_fault and sim.faults.camera == tm.CameraState.FAULT
            assert (await ask({"fault": {"speaker_fault": False}}))["ok"]
            assert (await ask({"person": {"press_after_s": 0.1}}))["ok"]
            await gw.answer_to(await gw.send(RED))
            await gw.ack()
            state = await ask({"state": {}})
            assert state["played"][0]["warning_id"] == 1001
            assert state["acks_sent"][0]["terminal_id"] == "JY-0001"
            assert (await ask({"press": {"warning_id": 7}}))["ack"]["warning_id"] == 7
            assert (await ask({"stats": {}}))["stats"]["acks_sent"] == 2
            assert not (await ask({"fault": {"garbage": -1}}))["ok"]
            assert (await ask({}))["ok"]
        finally:
            writer.close()


# ---------------------------------------------------------------------------- over a pty


async def test_full_round_over_a_pty(tmp_path: Any) -> None:
    """On a pty the same round works through pyserial, with garbage on the line both ways."""
    link = tmp_path / "ttyJY0"
    async with PtyTerminalSimulator("JY-0002", symlink=link, heartbeat_s=0.3,
                                    press_after_s=0.1) as sim:
        assert os.path.realpath(sim.link_path) == sim.path
        async with pty_gateway(sim) as gw:
            await gw.heartbeat()
            await gw.raw(b"AT\r\n\x00\xfb\x4a\x00garbage")
            seq = await gw.send(RED)
            assert isinstance(await gw.answer_to(seq), tm.Receipt)
            ack = await gw.ack()
            await gw.send(tm.Receipt(ack.seq, tm.MessageType.ACK, 1001, 0))
            await until(lambda: len(sim.acks_confirmed) == 1, "the ack to be confirmed")
            sim.set_faults(garbage=50)
            await gw.heartbeat()
            assert gw.decoder.discarded >= 50
    assert not link.exists()


async def test_simulator_checks_its_settings() -> None:
    """A bad terminal id or period is refused when the simulator is built."""
    with pytest.raises(tm.TerminalError):
        TerminalSimulator("has space")
    with pytest.raises(SimulatorError):
        TerminalSimulator("JY-1", ack_retry_s=0)


# ---------------------------------------------------------------------------- as a process


async def test_runs_as_a_process() -> None:
    """`python -m firmware_stubs.terminal_sim --tcp` prints READY, serves, exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "firmware_stubs.terminal_sim", "--terminal-id", "JY-0009",
        "--tcp", "--port", "0", "--video", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        assert line.startswith("READY port=")
        port = int(line.split("=")[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def write(data: bytes) -> None:
            writer.write(data)

        async def read() -> bytes:
            try:
                return await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                return b""

        gw = Gateway(read, write)
        hb = await gw.heartbeat()
        assert (hb.terminal_id, hb.camera) == ("JY-0009", tm.CameraState.OK)
        writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
