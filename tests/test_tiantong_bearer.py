"""Tiantong as a narrowband bearer (issue 11): the gateway's modem driver
(`edge_agent.bearers.tiantong`) against the module simulator on real ptys (sends in UCS2 SMS,
concatenated parts, registration lost, send failures retried and counted), and central's
`TiantongLink` fed the module's bytes (frames from SMS, a person's text, garbage)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import structlog
from hypothesis import given
from hypothesis import strategies as st

from central.narrowband.links import Dropped, Inbound
from central.narrowband.tiantong import TiantongLink
from edge_agent import bearers
from edge_agent.bearers.tiantong import TiantongModem, sms_frame_bytes
from firmware_stubs.tiantong_sim import TiantongModuleSimulator, TiantongNetwork
from protocols import at_responses as atr
from protocols.narrowband import to_text
from protocols.sms_pdu import SmsDeliver, encode_deliver

OURS, CENTRAL = "+8617400000001", "+8617400000009"
LOG = structlog.get_logger("test")


@contextlib.asynccontextmanager
async def pair(**modem: object) -> AsyncIterator[
        tuple[TiantongModuleSimulator, TiantongModuleSimulator, TiantongModem]]:
    network = TiantongNetwork()
    async with TiantongModuleSimulator(network, OURS) as ours, \
            TiantongModuleSimulator(network, CENTRAL) as theirs:
        async with TiantongModem(ours.link_path, number=OURS, retry_wait_s=0.05,
                                 **modem) as tt:  # type: ignore[arg-type]
            yield ours, theirs, tt


def test_frame_bytes_per_sms() -> None:
    """70 UCS2 characters carry "FL1:" and 66 of base64: 48 frame bytes; two parts 96."""
    assert [sms_frame_bytes(n) for n in (1, 2, 4)] == [48, 96, 198]


async def test_a_frame_goes_as_ucs2_sms_text_in_one_or_more_parts() -> None:
    """A frame arrives at central's module as its text form; a longer one in parts."""
    async with pair(sms_parts=2) as (_, theirs, tt):
        assert await tt.wait_ready(5.0)
        assert (await tt.info()).payload_bytes == 96
        assert await tt.send(CENTRAL, bytes(range(48))) == bearers.SendResult(True)
        assert await tt.send(CENTRAL, bytes(range(96))) == bearers.SendResult(True)
        assert len(theirs.stored) == 3 and tt.counters.parts_sent == 3


async def test_lost_registration_is_not_ready_and_a_send_then_is_no_network() -> None:
    """Searching: `wait_ready` says no (counted); a send anyway is refused `no_network`."""
    async with pair() as (ours, _, tt):
        ours.set_faults(registered=False)
        assert not await tt.wait_ready(5.0) and tt.counters.not_registered == 1
        result = await tt.send(CENTRAL, b"\x01")
        assert result == bearers.SendResult(False, bearers.Refusal.NO_NETWORK, 0, 331)
        ours.set_faults(registered=True)
        assert await tt.wait_ready(5.0)


async def test_transient_send_errors_are_retried_and_counted() -> None:
    """332 twice then OK: sent after two retries; 500 past the retries: `send_failed`."""
    async with pair(retries=2) as (ours, theirs, tt):
        ours.set_faults(send_error=332, times=2)
        assert await tt.send(CENTRAL, b"\x01\x02") == bearers.SendResult(True)
        assert tt.counters.retries == 2 and tt.counters.cms_errors == {332: 2}
        assert len(theirs.stored) == 1
        ours.set_faults(send_error=500, times=5)
        result = await tt.send(CENTRAL, b"\x03")
        assert result == bearers.SendResult(False, bearers.Refusal.SEND_FAILED, 0, 500)
        assert tt.counters.refused_by_reason == {"send_failed": 1}


def _deliver(text: str, sender: str = OURS) -> bytes:
    sms = SmsDeliver(sender, text, datetime(2026, 12, 7, 3, 0, tzinfo=UTC))
    return atr.encode_response(atr.Cmgr(0, len(encode_deliver(sms)) - 1, encode_deliver(sms)))


def _link() -> TiantongLink:
    return TiantongLink(LOG)


def test_central_link_reads_stored_sms_one_command_at_a_time() -> None:
    """Hello, then +CMTI → AT+CMGR, the SMS's frame as Inbound, then AT+CMGD."""
    link = _link()
    assert link.hello() == b"ATE0\r"
    assert link.feed(b"\r\nOK\r\n") == (b"AT+CMGF=0\r", [])
    assert link.feed(b"\r\nOK\r\n")[0] == b"AT+CNMI=2,1\r"
    assert link.feed(b'\r\nOK\r\n\r\n+CMTI: "SM",3\r\n')[0] == b"AT+CMGR=3\r"
    reply, events = link.feed(_deliver(to_text(b"\x13frame")) + b"\r\nOK\r\n")
    assert reply == b"AT+CMGD=3\r" and events == [Inbound(OURS, b"\x13frame")]
    reply, events = link.feed(_deliver("今晚开会") + b"\r\nOK\r\n")
    assert len(events) == 1 and isinstance(events[0], Dropped)
    assert (events[0].reason, events[0].quiet) == ("not_fieldlink", True)


@given(st.binary(max_size=300))
def test_central_link_takes_garbage_without_raising(data: bytes) -> None:
    """Whatever the module's line carries, the link answers events, never an exception."""
    link = _link()
    link.hello()
    _, events = link.feed(data)
    assert all(isinstance(e, Dropped | Inbound) for e in events)

