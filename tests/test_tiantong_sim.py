"""Tiantong module simulator on real ptys, driven through pyserial as a gateway drives the modem."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import serial

from firmware_stubs.errors import SimulatorError
from firmware_stubs.tiantong_sim import TiantongModuleSimulator, TiantongNetwork
from protocols import at_commands as atc
from protocols import at_responses as atr
from protocols.sms_pdu import Reassembler, decode_deliver, encode_submit, submits_for
from tests.helpers import Inbox, serial_port

TIMEOUT = 15.0  # generous: a loaded 2-core box; the tests wait on behaviour, not time
GW, CENTRAL = "+8617400000001", "+8617400000002"
ALARM = "青山化工 二号罐区 可燃气体 二级报警 57.5%LEL"


class Host(Inbox[atr.Response]):
    """The gateway's side of one module's AT port: pyserial, blocking calls in a thread."""

    def __init__(self, port: serial.Serial) -> None:
        super().__init__()
        self.port = port
        self.decoder = atr.ResponseDecoder()

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.port.write, data)

    async def _pump(self) -> None:
        self.decoder.feed(await asyncio.to_thread(
            lambda: self.port.read(max(1, self.port.in_waiting))))
        while True:
            try:
                event = self.decoder.next_event()
            except atc.AtError:
                continue
            if event is atc.NEED_DATA:
                return
            self._received(event)

    async def expect(self, match: Callable[[atr.Response], bool],
                     timeout: float = TIMEOUT) -> atr.Response:
        return await self._take(match, timeout)

    async def command(self, command: atc.Command, timeout: float = TIMEOUT) -> list[atr.Response]:
        """Send `command`; the answers up to and including its final result (echo dropped)."""
        self.inbox = [e for e in self.inbox if not atr.is_final(e)]
        await self.write(atc.encode_command(command))
        answers: list[atr.Response] = []
        while True:
            event = await self.expect(lambda e: not isinstance(e, atr.Cmti | atr.Creg)
                                      or isinstance(e, atr.Creg) and e.n is not None, timeout)
            if isinstance(event, atr.InfoLine) and event.text.startswith("AT"):
                continue  # the echo
            answers.append(event)
            if atr.is_final(event):
                return answers

    async def send_sms(self, pdu: bytes, length: int) -> list[atr.Response]:
        """AT+CMGS, the prompt, the PDU and Ctrl-Z; the answers after the PDU."""
        await self.write(atc.encode_command(atc.cmgs(length)))
        first = await self.expect(lambda e: isinstance(e, atr.Prompt) or atr.is_final(e))
        if not isinstance(first, atr.Prompt):
            return [first]
        await self.write(pdu.hex().upper().encode() + b"\x1a")
        answers = [await self.expect(lambda e: isinstance(e, atr.Cmgs) or atr.is_final(e))]
        if isinstance(answers[0], atr.Cmgs):
            answers.append(await self.expect(atr.is_final))
        return answers


@contextlib.asynccontextmanager
async def host(module: TiantongModuleSimulator) -> AsyncIterator[Host]:
    async with serial_port(module.link_path) as port:
        yield Host(port)


@pytest.fixture
async def modules() -> AsyncIterator[tuple[TiantongModuleSimulator, TiantongModuleSimulator]]:
    """Two modules on one network: the gateway's and central's."""
    network = TiantongNetwork()
    async with TiantongModuleSimulator(network, GW) as gw, \
            TiantongModuleSimulator(network, CENTRAL) as central:
        yield gw, central


async def read_message(h: Host, index: int) -> bytes:
    answers = await h.command(atc.cmgr(index))
    read = answers[0]
    assert isinstance(read, atr.Cmgr) and answers[-1] == atr.Result(True)
    return read.pdu


async def test_status_commands(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """AT, AT+CREG?, AT+CSQ and AT+CMGF=0 answer as a registered module does."""
    gw, _ = modules
    async with host(gw) as h:
        assert await h.command(atc.Command("")) == [atr.Result(True)]
        assert await h.command(atc.Command("+CREG", "?")) == [atr.Creg(atr.RegStatus.HOME, 0),
                                                               atr.Result(True)]
        csq = await h.command(atc.Command("+CSQ"))
        assert isinstance(csq[0], atr.Csq) and 0 < csq[0].rssi <= 31
        assert await h.command(atc.Command("+CMGF", "=", ("0",))) == [atr.Result(True)]
        assert await h.command(atc.Command("+CMGF", "=", ("1",))) == \
            [atr.CmsErrorResult(atr.CmsError.OPERATION_NOT_SUPPORTED)]
        assert await h.command(atc.Command("+CFUN", "?")) == [atr.Result(False)]


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
            assert answers == [atr.Cmgs(i), atr.Result(True)]
        indexes = [await c.expect(lambda e: isinstance(e, atr.Cmti)) for _ in parts]
        assert [e.index for e in indexes if isinstance(e, atr.Cmti)] == [1, 2]
        r = Reassembler()
        whole = [r.add(decode_deliver(await read_message(c, i))[1]) for i in (1, 2)]
        assert whole[-1] == text
        _, first = decode_deliver(await read_message(c, 1))
        assert first.originator == GW and first.timestamp.utcoffset() is not None
        assert await c.command(atc.cmgd(1)) == [atr.Result(True)]
        assert await c.command(atc.cmgr(1)) == [
            atr.CmsErrorResult(atr.CmsError.INVALID_MEMORY_INDEX)]
    assert [m.text for m in gw.sent] == [p.text for p in parts]


async def test_registration_loss(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """Registration lost: a +CREG URC, searching, CSQ 99, sends fail with 331; incoming
    messages wait and arrive when it registers again."""
    gw, central = modules
    async with host(gw) as h, host(central) as c:
        assert await h.command(atc.Command("+CREG", "=", ("1",))) == [atr.Result(True)]
        gw.set_faults(registered=False)
        searching = atr.RegStatus.SEARCHING
        assert await h.expect(lambda e: isinstance(e, atr.Creg)) == atr.Creg(searching)
        assert (await h.command(atc.Command("+CREG", "?")))[0] == atr.Creg(searching, 1)
        assert (await h.command(atc.Command("+CSQ")))[0] == atr.Csq(99, 99)
        pdu, length = encode_submit(submits_for(CENTRAL, "心跳", ref=1)[0])
        assert await h.send_sms(pdu, length) == \
            [atr.CmsErrorResult(atr.CmsError.NO_NETWORK_SERVICE)]
        ack_pdu, ack_len = encode_submit(submits_for(GW, "叫应确认 1001", ref=2)[0])
        assert (await c.send_sms(ack_pdu, ack_len))[-1] == atr.Result(True)
        await asyncio.sleep(0.3)
        assert gw.stored == {}  # waiting in the network
        gw.set_faults(registered=True)
        assert await h.expect(lambda e: isinstance(e, atr.Creg)) == atr.Creg(atr.RegStatus.HOME)
        cmti = await h.expect(lambda e: isinstance(e, atr.Cmti))
        assert isinstance(cmti, atr.Cmti)
        assert decode_deliver(await read_message(h, cmti.index))[1].text == "叫应确认 1001"


async def test_send_failures(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """send_error fails the next `times` sends with its code; then sends go again."""
    gw, central = modules
    gw.set_faults(send_error=atr.CmsError.NETWORK_TIMEOUT, times=2)
    pdu, length = encode_submit(submits_for(CENTRAL, "报警", ref=3)[0])
    async with host(gw) as h:
        for _ in range(2):
            assert await h.send_sms(pdu, length) == [atr.CmsErrorResult(332)]
        assert (await h.send_sms(pdu, length))[-1] == atr.Result(True)
        bad = await h.send_sms(pdu, length + 1)  # AT+CMGS names the wrong length
        assert bad == [atr.CmsErrorResult(atr.CmsError.INVALID_PDU_PARAMETER)]
    assert len(gw.sent) == 1 and gw.stats()["send_failures"] == 3
    await asyncio.sleep(0)
    assert len(central.stored) == 1


async def test_silent_and_garbage(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """A silent module answers nothing; garbage both ways is survived (a junk line: ERROR)."""
    gw, _ = modules
    async with host(gw) as h:
        gw.set_faults(silent=True)
        with pytest.raises(TimeoutError):
            await h.command(atc.Command(""), timeout=1.0)
        gw.set_faults(silent=False, garbage=64)
        assert await h.command(atc.Command("")) == [atr.Result(True)]
        await h.write(b"\x00\xff\xfe junk\r")  # a line that is no command: ERROR
        assert await h.expect(atr.is_final) == atr.Result(False)
        assert await h.command(atc.Command("")) == [atr.Result(True)]
    assert gw.stats()["garbage_sent"] == 64 and gw.stats()["silenced"] == 1


async def test_cancelled_entry_and_echo_off(modules: tuple[TiantongModuleSimulator, ...]) -> None:
    """ESC after the prompt cancels the send (OK, nothing sent); ATE0 turns the echo off."""
    gw, _ = modules
    async with host(gw) as h:
        assert await h.command(atc.Command("E0")) == [atr.Result(True)]
        await h.write(atc.encode_command(atc.cmgs(10)))
        await h.expect(lambda e: isinstance(e, atr.Prompt))
        await h.write(b"0011\x1b")
        assert await h.expect(atr.is_final) == atr.Result(True)
        assert await h.command(atc.Command("")) == [atr.Result(True)]
        assert not any(isinstance(e, atr.InfoLine) for e in h.seen[1:])
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
        async with serial_port(paths[GW]) as port:
            assert await Host(port).command(atc.Command("")) == [atr.Result(True)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
