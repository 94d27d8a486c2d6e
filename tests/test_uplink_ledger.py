"""The ack ledger when central comes online (`AckLedger.suspect_all`): a batch in flight then is
in doubt; the ack of a newer batch tells which were lost, so one central got in the moment
between its subscription and its online state is not sent twice. Giving a batch up that way
and by its ack timeout is the same bookkeeping; only the timeout says central is slow."""

from __future__ import annotations

import time

from edge_agent.uplink.ledger import AckLedger, UplinkCounters
from edge_agent.uplink.pacing import BacklogPacer


def ledger(ack_timeout_s: float = 30.0) -> AckLedger:
    pacer = BacklogPacer(max_window=8, batch_size=100)
    return AckLedger(ack_timeout_s, pacer, UplinkCounters())


def send(lg: AckLedger, batch_id: int, lo: int, hi: int) -> None:
    lg.sent(batch_id, ((lo, hi),), hi - lo + 1, backlog=False)


def ack(lg: AckLedger, lo: int, hi: int) -> None:
    lg.acked(lg.screen(((lo, hi),)))


def test_a_newer_batchs_ack_forgets_the_suspects_central_did_not_get() -> None:
    lg = ledger()
    send(lg, 1, 1, 10)  # reached central between its subscription and its online state
    send(lg, 2, 11, 20)  # went into the void
    assert lg.suspect_all(grace_s=60.0) == 2
    send(lg, 3, 21, 30)
    ack(lg, 1, 10)
    assert lg.counters.batches_resent == 0 and set(lg.batches) == {2, 3}
    ack(lg, 21, 30)  # central acks in order: batch 2 never reached it
    assert lg.counters.batches_resent == 1
    assert lg.batches == {} and lg.records == 0
    assert lg.skip() == ()  # batch 2's records are read out again


def test_with_nothing_newer_the_suspects_go_after_the_grace() -> None:
    lg = ledger()
    send(lg, 1, 1, 10)
    lg.suspect_all(grace_s=0.0)
    assert lg.next_expiry_in() <= 0.0
    lg.expire()
    assert lg.counters.batches_resent == 1 and lg.batches == {}


def test_a_newer_batch_in_flight_is_waited_for_after_the_grace() -> None:
    lg = ledger(ack_timeout_s=30.0)
    send(lg, 1, 1, 10)
    lg.suspect_all(grace_s=0.0)
    send(lg, 2, 11, 20)
    lg.expire()
    assert lg.counters.batches_resent == 0 and set(lg.batches) == {1, 2}
    assert lg.next_expiry_in() > 1.0  # no busy loop: the next wake is the ack timeout
    ack(lg, 1, 10)
    ack(lg, 11, 20)
    assert lg.counters.batches_resent == 0 and lg.batches == {}


def test_a_reconnect_clears_the_doubt() -> None:
    lg = ledger()
    send(lg, 1, 1, 10)
    lg.suspect_all(grace_s=60.0)
    lg.drop()
    send(lg, 2, 1, 10)
    ack(lg, 1, 10)
    assert lg.counters.batches_resent == 0 and lg.batches == {}


def backlog_ledger(ack_timeout_s: float) -> AckLedger:
    pacer = BacklogPacer(max_window=8, batch_size=100, min_batch_size=10)
    return AckLedger(ack_timeout_s, pacer, UplinkCounters())


def test_an_expired_batch_and_a_lost_suspect_are_given_up_alike_but_only_expiry_slows_down(
) -> None:
    """Both forget the backlog batch and count it resent; only an ack timeout (central slow)
    doubles the timeout and halves the backlog batch, central's return (central away) not."""
    expired, settled = backlog_ledger(0.001), backlog_ledger(60.0)
    for lg in (expired, settled):
        lg.sent(1, ((1, 10),), 10, backlog=True)
    settled.suspect_all(grace_s=0.0)
    time.sleep(0.002)  # past the 1 ms ack timeout
    expired.expire()
    settled.expire()
    for lg in (expired, settled):
        assert lg.batches == {} and lg.records == 0 and lg.backlog_batches == 0
        assert lg.counters.batches_resent == 1 and lg.skip() == ()
    assert expired.ack_timeout() == 0.002 and expired.pacer.batch == 50
    assert settled.ack_timeout() == 60.0 and settled.pacer.batch == 100
