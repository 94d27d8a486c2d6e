"""Tiantong module simulator on real ptys, driven through pyserial as a gateway drives the modem."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import serial

from firmware_stubs.errors import SimulatorError
from firmware_stubs.tiantong_sim import TiantongModuleSimulator, TiantongNetwork
from protocols.at_commands import NEED_DATA, AtError, Command, cmgd, cmgr, cmgs, encode_command
from protocols.at_responses import (
    Cmgr,
    Cmgs,
    CmsError,
    CmsErrorResult,
    Cmti,
    Creg,
    Csq,
    InfoLine,
    Prompt,
    RegStatus,
    Response,
    ResponseDecoder,
    Result,
    is_final,
)
from protocols.sms_pdu import Reassembler, decode_deliver, encode_submit, submits_for

TIMEOUT = 15.0  # generous: a loaded 2-core box; the tests wait on behaviour, not time
GW, CENTRAL = "+8617400000001", "+8617400000002"
ALARM = "青山化工 二号罐区 可燃气体 二级报警 57.5%LEL"


class Host:
    """The gateway's side of one module's AT port: pyserial, blocking calls in a thread."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, 115200, timeout=0.1)
        self.decoder = ResponseDecoder()
        self.inbox: list[Response] = []
        self.seen: list[Response] = []

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.port.write, data)

    async def _pump(self) -> None:
        self.decoder.feed(await asyncio.to_thread(
            lambda: self.port.read(max(1, self.port.in_waiting))))
        while True:
            try:
                event = self.decoder.next_event()
            except AtError:
                continue
            if event is NEED_DATA:
                return
            self.inbox.append(event)
            self.seen.append(event)

    async def expect(self, match: Callable[[Response], bool],
                     timeout: float = TIMEOUT) -> Response:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.inbox:
                if match(event):
                    self.inbox.remove(event)
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing matching; received {self.seen}")
            await self._pump()

    async def command(self, command: Command, timeout: float = TIMEOUT) -> list[Response]:
        """Send `command`; the answers up to and including its final result (echo dropped)."""
        self.inbox = [e for e in self.inbox if not is_final(e)]
        await self.write(encode_command(command))
        answers: list[Response] = []
        while True:
            event = await self.expect(lambda e: not isinstance(e, Cmti | Creg)
                                      or isinstance(e, Creg) and e.n is not None, timeout)
            if isinstance(event, InfoLine) and event.text.startswith("AT"):
                continue  # the echo
            answers.append(event)
            if is_final(event):
                return answers

    async def send_sms(self, pdu: bytes, length: int) -> list[Response]:
        """AT+CMGS, the prompt, the PDU and Ctrl-Z; the answers after the PDU."""
        await self.write(encode_command(cmgs(length)))
        first = await self.expect(lambda e: isinstance(e, Prompt) or is_final(e))
        if not isinstance(first, Prompt):
            return [first]
        await self.write(pdu.hex().upper().encode() + b"\x1a")
        answers = [await self.expect(lambda e: isinstance(e, Cmgs) or is_final(e))]
        if isinstance(answers[0], Cmgs):
            answers.append(await self.expect(is_final))
        return answers


@contextlib.asynccontextmanager
async def host(module: TiantongModuleSimulator) -> AsyncIterator[Host]:
    h = await asyncio.to_thread(Host, module.link_path)
    try:
        yield h
    finally:
        await asyncio.to_thread(h.port.close)


@pytest.fixture
async def modules() -> AsyncIterator[tuple[TiantongModuleSimulator, TiantongModuleSimulator]]:
    """Two modules on one network: the gateway's and central's."""
    network = TiantongNetwork()
    async with TiantongModuleSimulator(network, GW) as gw, \
            TiantongModuleSimulator(network, CENTRAL) as central:
        yield gw, central


async def read_message(h: Host, index: int) -> bytes:
    answers = await h.command(cmgr(index))
    read = answers[0]
    assert isinstance(read, Cmgr) and answers[-1] == Result(True)
    return read.pdu


async def test_status_commands(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """AT, AT+CREG?, AT+CSQ and AT+CMGF=0 answer as a registered module does."""
    gw, _ = modules
    async with host(gw) as h:
        assert await h.command(Command("")) == [Result(True)]
        assert await h.command(Command("+CREG", "?")) == [Creg(RegStatus.HOME, 0), Result(True)]
        csq = await h.command(Command("+CSQ"))
        assert isinstance(csq[0], Csq) and 0 < csq[0].rssi <= 31
        assert await h.command(Command("+CMGF", "=", ("0",))) == [Result(True)]
        assert await h.command(Command("+CMGF", "=", ("1",))) == \
            [CmsErrorResult(CmsError.OPERATION_NOT_SUPPORTED)]
        assert await h.command(Command("+CFUN", "?")) == [Result(False)]


async def test_alarm_by_sms_reaches_central(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """A long alarm goes in two concatenated parts; central gets +CMTI for each and reads,
    decodes and reassembles them."""
    gw, central = modules
    text = ALARM * 3  # over 70 characters
    parts = submits_for(CENTRAL, text, ref=7)
    assert len(parts) == 2
    async with host(gw) as h, host(central) as c:
        for i, part in enumerate(parts):
            pdu, length = encode_submit(part)
            answers = await h.send_sms(pdu, length)
            assert answers == [Cmgs(i), Result(True)]
        indexes = [await c.expect(lambda e: isinstance(e, Cmti)) for _ in parts]
        assert [e.index for e in indexes if isinstance(e, Cmti)] == [1, 2]
        r = Reassembler()
        whole = [r.add(decode_deliver(await read_message(c, i))[1]) for i in (1, 2)]
        assert whole[-1] == text
        _, first = decode_deliver(await read_message(c, 1))
        assert first.originator == GW and first.timestamp.utcoffset() is not None
        assert await c.command(cmgd(1)) == [Result(True)]
        assert await c.command(cmgr(1)) == [CmsErrorResult(CmsError.INVALID_MEMORY_INDEX)]
    assert [m.text for m in gw.sent] == [p.text for p in parts]


async def test_registration_loss(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """Registration lost: a +CREG URC, searching, CSQ 99, sends fail with 331; incoming
    messages wait and arrive when it registers again."""
    gw, central = modules
    async with host(gw) as h, host(central) as c:
        assert await h.command(Command("+CREG", "=", ("1",))) == [Result(True)]
        gw.set_faults(registered=False)
        assert await h.expect(lambda e: isinstance(e, Creg)) == Creg(RegStatus.SEARCHING)
        assert (await h.command(Command("+CREG", "?")))[0] == Creg(RegStatus.SEARCHING, 1)
        assert (await h.command(Command("+CSQ")))[0] == Csq(99, 99)
        pdu, length = encode_submit(submits_for(CENTRAL, "心跳", ref=1)[0])
        assert await h.send_sms(pdu, length) == \
            [CmsErrorResult(CmsError.NO_NETWORK_SERVICE)]
        ack_pdu, ack_len = encode_submit(submits_for(GW, "叫应确认 1001", ref=2)[0])
        assert (await c.send_sms(ack_pdu, ack_len))[-1] == Result(True)
        await asyncio.sleep(0.3)
        assert gw.stored == {}  # waiting in the network
        gw.set_faults(registered=True)
        assert await h.expect(lambda e: isinstance(e, Creg)) == Creg(RegStatus.HOME)
        cmti = await h.expect(lambda e: isinstance(e, Cmti))
        assert isinstance(cmti, Cmti)
        assert decode_deliver(await read_message(h, cmti.index))[1].text == "叫应确认 1001"


async def test_send_failures(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """send_error fails the next `times` sends with its code; then sends go again."""
    gw, central = modules
    gw.set_faults(send_error=CmsError.NETWORK_TIMEOUT, times=2)
    pdu, length = encode_submit(submits_for(CENTRAL, "报警", ref=3)[0])
    async with host(gw) as h:
        for _ in range(2):
            assert await h.send_sms(pdu, length) == [CmsErrorResult(332)]
        assert (await h.send_sms(pdu, length))[-1] == Result(True)
        bad = await h.send_sms(pdu, length + 1)  # AT+CMGS names the wrong length
        assert bad == [CmsErrorResult(CmsError.INVALID_PDU_PARAMETER)]
    assert len(gw.sent) == 1 and gw.stats()["send_failures"] == 3
    await asyncio.sleep(0)
    assert len(central.stored) == 1


async def test_silent_and_garbage(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """A silent module answers nothing; garbage both ways is survived (a junk line: ERROR)."""
    gw, _ = modules
    async with host(gw) as h:
        gw.set_faults(silent=True)
        with pytest.raises(TimeoutError):
            await h.command(Command(""), timeout=1.0)
        gw.set_faults(silent=False, garbage=64)
        assert await h.command(Command("")) == [Result(True)]
        await h.write(b"\x00\xff\xfe junk\r")  # a line that is no command: ERROR
        assert await h.expect(is_final) == Result(False)
        assert await h.command(Command("")) == [Result(True)]
    assert gw.stats()["garbage_sent"] == 64 and gw.stats()["silenced"] == 1


async def test_cancelled_entry_and_echo_off(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """ESC after the prompt cancels the send (OK, nothing sent); ATE0 turns the echo off."""
    gw, _ = modules
    async with host(gw) as h:
        assert await h.command(Command("E0")) == [Result(True)]
        await h.write(encode_command(cmgs(10)))
        await h.expect(lambda e: isinstance(e, Prompt))
        await h.write(b"0011\x1b")
        assert await h.expect(is_final) == Result(True)
        assert await h.command(Command("")) == [Result(True)]
        assert not any(isinstance(e, InfoLine) for e in h.seen[1:])
    assert gw.sent == [] and gw.stats()["cancelled"] == 1


async def test_numbers_are_checked() -> None:
    """A module needs a valid number, unique on its network."""
    network = TiantongNetwork()
    with pytest.raises(SimulatorError):
        TiantongModuleSimulator(network, "not-a-number")
    async with TiantongModuleSimulator(network, GW):
        with pytest.raises(SimulatorError):
            await TiantongModuleSimulator(network, GW).start()


async def test_runs_as_a_process(tmp_path: Path) -> None:
    """`python -m firmware_stubs.tiantong_sim` writes its ptys, answers AT, exits 0."""
    ready = tmp_path / "tt.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "firmware_stubs.tiantong_sim", "--number", GW, "--number",
        CENTRAL, "--ready-file", str(ready), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        assert line.startswith("READY modules=")
        paths = json.loads(ready.read_text())
        h = await asyncio.to_thread(Host, paths[GW])
        try:
            assert await h.command(Command("")) == [Result(True)]
        finally:
            await asyncio.to_thread(h.port.close)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
