"""The narrowband downlink's two ends without radios (issue 11): the gateway's `RadioDownlink`
(verify, expiry, replay kept in a real outbox file, foreign senders, persons' texts) and
central's `RadioRoute` (one segment on the line, the terminal's pace, refusals, timeouts)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from central.narrowband.downlink import RadioRoute
from edge_agent.narrowband.downlink import SEEN_KEY, LoggingWarningHandler, RadioDownlink
from edge_agent.outbox.store import Outbox
from protocols.callresp import play_warning
from protocols.commands import Command, make_command
from protocols.hrnp_text import TextMessage
from protocols.narrowband import to_text
from protocols.narrowband_down import RadioWarning, segments, sign_warning

SK = Ed25519PrivateKey.generate()
CENTRAL = "0242407"
T0 = 1_790_000_000.0


def _cmd(cmd_id: str = "c-01", gw: str = "gw-1", ttl_ms: int = 600_000) -> Command:
    return make_command(cmd_id, gw=gw, args=play_warning("w-01", "orange", "大风橙色预警", 2,
                                                         ["t-1", "t-2"]),
                        issued_at_ms=int(T0 * 1000), ttl_ms=ttl_ms)


def _segs(cmd: Command, limit: int = 77) -> list[bytes]:
    return segments(sign_warning(SK, cmd, limit=limit), limit)


async def _feed(d: RadioDownlink, parts: list[bytes], sender: str = CENTRAL) -> object:
    out = None
    for p in parts:
        out = await d.receive(sender, p)
    return out


async def test_a_warning_is_handed_on_once_even_after_a_restart(tmp_path: Path) -> None:
    """Verified and whole: handed on; the same cmd_id again (or after a restart, read from
    the outbox meta) is a replay; an expired one and another gateway's are refused."""
    handler = LoggingWarningHandler()
    async with Outbox.open(tmp_path / "outbox.db") as ob:
        d = RadioDownlink(gw="gw-1", public_key=SK.public_key(), central=CENTRAL, outbox=ob,
                          handler=handler, wall=lambda: T0 + 5)
        got = await _feed(d, _segs(_cmd()))
        assert got is not None and [w.command.cmd_id for w in handler.received] == ["c-01"]
        assert handler.received[0].args.terminals == ("t-1", "t-2")
        assert await _feed(d, _segs(_cmd())) is None
        assert await _feed(d, _segs(_cmd("c-02", ttl_ms=1000))) is None  # expired at T0+1
        assert await _feed(d, _segs(_cmd("c-03", gw="gw-2"))) is None  # signed for gw-2
        assert d.counters.refused == {"replay": 1, "expired": 1, "bad_signature": 1}
        assert "c-01" in (await ob.get_meta(SEEN_KEY) or "")
        assert await d.taken("c-01") and not await d.taken("c-02")
    async with Outbox.open(tmp_path / "outbox.db") as ob:
        again = RadioDownlink(gw="gw-1", public_key=SK.public_key(), central=CENTRAL,
                              outbox=ob, handler=handler, wall=lambda: T0 + 5)
        assert await _feed(again, _segs(_cmd())) is None
        assert again.counters.refused == {"replay": 1} and len(handler.received) == 1


async def test_senders_and_texts_that_are_not_central_warnings(tmp_path: Path) -> None:
    """Another card, a person's PDT text, an uplink frame, no pinned key: counted, dropped."""
    async with Outbox.open(tmp_path / "outbox.db") as ob:
        d = RadioDownlink(gw="gw-1", public_key=SK.public_key(), central="2002", outbox=ob,
                          wall=lambda: T0)
        assert await _feed(d, _segs(_cmd()), sender="4238473") is None
        d.on_pdt(TextMessage(1, 1001, 2002, "今晚八点开会"))
        assert await d.receive("2002", b"\x13\x00\x00\x00\x00abc") is None
        nokey = RadioDownlink(gw="gw-1", public_key=None, central="2002", outbox=ob)
        assert await _feed(nokey, _segs(_cmd()), sender="2002") is None
        assert d.counters.refused == {"foreign_sender": 2, "not_fieldlink": 1,
                                      "not_warning": 1}
        assert nokey.counters.refused == {"no_public_key": 1}
        d.on_pdt(TextMessage(2, 1001, 2002, to_text(_segs(_cmd())[0])))  # queued for run()


async def test_a_failing_handler_is_counted_and_logged_and_the_next_warning_goes_on(
        tmp_path: Path) -> None:
    """A handler that raises: counted, logged with its traceback, the warning stays taken (at
    most once); the next warning still reaches the handler."""
    seen: list[str] = []

    async def handler(warning: RadioWarning) -> None:
        seen.append(warning.command.cmd_id)
        if len(seen) == 1:
            raise RuntimeError("speaker driver crashed")

    async with Outbox.open(tmp_path / "outbox.db") as ob:
        d = RadioDownlink(gw="gw-1", public_key=SK.public_key(), central=CENTRAL, outbox=ob,
                          handler=handler, wall=lambda: T0 + 5)
        with capture_logs() as logs:
            assert await _feed(d, _segs(_cmd())) is not None
        assert await _feed(d, _segs(_cmd())) is None  # taken before the handler ran
        assert await _feed(d, _segs(_cmd("c-02"))) is not None
        assert seen == ["c-01", "c-02"] and d.counters.handler_errors == 1
        failed = [e for e in logs if e["event"] == "narrowband_warning_handler_failed"]
        assert [e["cmd_id"] for e in failed] == ["c-01"] and failed[0]["exc_info"] is True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_route_sends_one_segment_at_a_time_at_the_terminal_pace() -> None:
    """Next segment only after the answer and the interval; a refusal waits what the terminal
    says; no answer is a timeout and the same segment again after retry_s; once per cmd_id."""
    clock = Clock()
    route = RadioRoute(bearer="beidou", addresses={"gw-1": "4238473"}, max_segments=3,
                       interval_s=10, clock=clock)
    signed = sign_warning(SK, _cmd(), limit=route.limit, max_segments=3)
    assert route.reaches("gw-1") and not route.reaches("gw-9")
    assert route.offer("c-01", "gw-1", signed) and not route.offer("c-01", "gw-1", signed)
    first = route.next_send()
    assert first is not None and first[0] == "4238473"
    assert route.next_send() is None  # awaiting the answer
    route.feedback(True)
    assert route.next_send() is None  # the interval
    clock.t += 10
    second = route.next_send()
    assert second is not None and second != first
    route.feedback(False, wait_s=30)
    clock.t += 29
    assert route.next_send() is None
    clock.t += 1
    assert route.next_send() == second
    clock.t += 6  # no answer within step_timeout_s
    route.tick()
    assert route.counters.timeouts == 1 and route.next_send() is None
    clock.t += 10
    assert route.next_send() == second
    route.feedback(True)
    while (nxt := route.next_send()) is not None or not route.sent("c-01"):
        if nxt is None:
            clock.t += 10
            continue
        route.feedback(True)
    assert route.counters.warnings_sent == 1 and route.counters.refused == 1
    assert not route.offer("c-01", "gw-1", signed)  # sent once: the workflow re-sends anew
