"""The uplink's ledger of what is in flight and what central acknowledged (DESIGN.md §4.4).

No I/O: `edge_agent.uplink.link.Uplink` records each batch it publishes (`sent`), passes every
`down/ack` through `screen` and `acked`, and asks it which batches timed out (`expire`) and
which seqs to skip when it reads the outbox (`skip`).

An ack may mark delivered only seqs this uplink sent and has not yet seen acked (defence in
depth, DESIGN.md §8): seqs it names beyond those are ignored and counted. The seqs sent and not
yet acked outlive the uplink: it keeps them in the outbox (`sent_unacked`, `restore`), so an ack
of the previous run's last batches that arrives after a config reload or a restart is taken as
the genuine ack it is, not counted as refused. While no timely ack
arrives, the ack timeout doubles after each expiry (up to 8x), so a silent or overloaded
central does not cost a narrow link a full window every `ack_timeout_s`; a timely ack of a
batch still in flight resets it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from edge_agent.uplink.pacing import BacklogPacer
from protocols.envelope import count_in_ranges, merge_ranges, subtract_ranges

log = structlog.get_logger(__name__)

Ranges = tuple[tuple[int, int], ...]

_MAX_TIMEOUT_FACTOR = 8
# Bounds of the sent/acked seq memory (disjoint ranges): past it the lowest ranges are
# forgotten, which only makes their acks count as unsent and their records go again.
_MAX_RANGES = 4096


@dataclass(slots=True)
class UplinkCounters:
    """Monotonic counters for metrics (mutated only by the uplink)."""

    connects: int = 0
    batches_sent: int = 0
    records_sent: int = 0
    batches_resent: int = 0  # batches whose ack timed out (or central came): records went again
    central_online: int = 0  # central came (back) online while connected: in-flight resent
    acks: int = 0
    records_acked: int = 0  # rows newly marked delivered
    acks_foreign: int = 0  # acks naming another stream
    acks_malformed: int = 0
    # Defence in depth (DESIGN.md §8): an ack may mark delivered only seqs this uplink sent
    # and has not yet seen acked. Seqs it names beyond those are ignored and counted here:
    acks_refused: int = 0  # acks that named a seq never sent (forged, or from another stream)
    ack_records_unsent: int = 0  # seqs never sent by this uplink (or lost from its memory)
    ack_records_duplicate: int = 0  # seqs already acked (central's second ack of a resend)
    commands: int = 0
    backlog_batches_sent: int = 0
    backlog_records_sent: int = 0
    bytes_sent: int = 0  # data payload bytes published (resends too)
    backlog_bytes_sent: int = 0


@dataclass(slots=True)
class _InFlight:
    ranges: Ranges  # the batch's seqs not yet acknowledged: sorted, disjoint
    count: int  # seqs in `ranges`
    sent_at: float  # monotonic
    backlog: bool = False


class AckLedger:
    """Batches in flight, seqs sent and not acked, seqs acked; feeds the backlog pacer."""

    def __init__(self, ack_timeout_s: float, pacer: BacklogPacer,
                 counters: UplinkCounters) -> None:
        self.ack_timeout_s = ack_timeout_s
        self.pacer = pacer
        self.counters = counters
        self.batches: dict[int, _InFlight] = {}
        self.records = 0  # seqs in flight
        self.backlog_batches = 0
        # Seqs sent and not yet acked, across ack timeouts and reconnects (a late ack of an
        # earlier send is genuine); and the seqs acked, to tell a duplicate from a forgery.
        self._sent_unacked: Ranges = ()
        self._acked: Ranges = ()
        self._refused_logged = 0
        # Grows while central stays silent; a timely ack resets it.
        self._timeout_factor = 1
        # In flight when central came online (`suspect_all`), and when to stop waiting for a
        # newer batch's ack to tell which of them central had.
        self._suspects: set[int] = set()
        self._suspects_until = 0.0

    def skip(self) -> Ranges:
        """The seqs in flight, as ranges for `Outbox.next_batch`."""
        return merge_ranges(r for fl in self.batches.values() for r in fl.ranges)

    def sent(self, batch_id: int, ranges: Ranges, count: int, *, backlog: bool) -> None:
        self.batches[batch_id] = _InFlight(ranges, count, time.monotonic(), backlog)
        self._sent_unacked = _bounded(merge_ranges((*self._sent_unacked, *ranges)))
        self.records += count
        if backlog:
            self.backlog_batches += 1

    @property
    def sent_unacked(self) -> Ranges:
        """The seqs sent and not yet acked, across ack timeouts and reconnects."""
        return self._sent_unacked

    def restore(self, ranges: Ranges) -> None:
        """Seqs an earlier uplink on this outbox sent and saw no ack for (its `sent_unacked`):
        central's late ack of them is genuine."""
        self._sent_unacked = _bounded(merge_ranges((*self._sent_unacked, *ranges)))

    def screen(self, ranges: Ranges) -> Ranges:
        """The part of an ack the uplink may act on: seqs it sent and has not seen acked.
        The rest is counted and ignored; a seq never sent is logged (a forged ack, §8)."""
        allowed = _intersect(ranges, self._sent_unacked)
        rest = subtract_ranges(ranges, allowed)
        if not rest:
            return allowed
        duplicate = count_in_ranges(_intersect(rest, self._acked))
        unsent = count_in_ranges(rest) - duplicate
        self.counters.ack_records_duplicate += duplicate
        if unsent:
            self.counters.acks_refused += 1
            self.counters.ack_records_unsent += unsent
            if self._refused_logged < 10:  # a flood must not flood the log too
                self._refused_logged += 1
                unsent_ranges = subtract_ranges(rest, self._acked)
                log.warning("ack_unsent_records", records=unsent,
                            first=unsent_ranges[0][0], last=unsent_ranges[-1][1],
                            acks_refused=self.counters.acks_refused)
        return allowed

    def acked(self, allowed: Ranges) -> None:
        """Seqs now marked delivered (a screened ack)."""
        self._sent_unacked = subtract_ranges(self._sent_unacked, allowed)
        self._acked = _bounded(merge_ranges((*self._acked, *allowed)))
        # Only a timely ack brings the timeout back down: late acks of batches that already
        # went again mean central is overloaded, and resending on the short timeout would
        # multiply its load.
        if self._forget(allowed):
            self._timeout_factor = 1

    def _forget(self, ranges: Ranges) -> int:
        """Drop acknowledged seqs from the in-flight batches; returns how many batches the ack
        completed within the base `ack_timeout_s` of their sending (timely acks)."""
        acked = merge_ranges(ranges)
        completed = 0
        newer = False
        now = time.monotonic()
        for bid, fl in list(self.batches.items()):
            left = subtract_ranges(fl.ranges, acked)
            if left != fl.ranges:
                n = count_in_ranges(left)
                self.records -= fl.count - n
                fl.ranges, fl.count = left, n
                if not left:
                    del self.batches[bid]
                    completed += now - fl.sent_at <= self.ack_timeout_s
                    if fl.backlog:
                        self.backlog_batches -= 1
                        self.pacer.on_ack(now - fl.sent_at, now)
                    newer |= bool(self._suspects) and bid not in self._suspects
                    self._suspects.discard(bid)
        if newer:
            self._settle_suspects()  # a newer batch's ack: the suspects still unacked were lost
        return completed

    def ack_timeout(self) -> float:
        return self.ack_timeout_s * self._timeout_factor

    def expire(self) -> None:
        """Forget the batches whose ack is overdue: their records are read out again. Also
        settle the suspects once their grace is over with no newer batch in flight."""
        if self._waiting_on_grace() and time.monotonic() >= self._suspects_until:
            self._settle_suspects()
        deadline = time.monotonic() - self.ack_timeout()
        expired = [bid for bid, fl in self.batches.items() if fl.sent_at <= deadline]
        for bid in expired:
            fl = self._give_up(bid)
            if fl.backlog:
                self.pacer.on_timeout()
            log.info("batch_ack_timeout", records=fl.count, first=fl.ranges[0][0],
                     timeout_s=self.ack_timeout())
        if expired:
            self._timeout_factor = min(self._timeout_factor * 2, _MAX_TIMEOUT_FACTOR)

    def suspect_all(self, grace_s: float) -> int:
        """Central has just subscribed (its online state came): what is in flight may have
        gone into a broker with no subscriber, or reached central in the moment between its
        subscription and its online state. Central acks a gateway's batches in the order they
        reach it, so the first ack of a batch sent after this one tells: the suspects still
        unacked then were lost and are forgotten, their records read out again at once, as an
        ack timeout would. With no newer batch in flight after `grace_s`, the suspects are
        forgotten then. Returns the batches suspected."""
        self._suspects = set(self.batches)
        self._suspects_until = time.monotonic() + grace_s
        return len(self._suspects)

    def _waiting_on_grace(self) -> bool:
        """Suspects in flight and no newer batch whose ack would settle them."""
        return bool(self._suspects) and self._suspects.issuperset(self.batches)

    def _settle_suspects(self) -> None:
        """Forget the suspects still in flight. Unlike `expire`, the timeout does not grow
        and the pacer starts afresh, as on a new connection: central was away, not
        overloaded, so nothing says the link or central is slow."""
        lost = [bid for bid in self._suspects if bid in self.batches]
        self._suspects.clear()
        for bid in lost:
            self._give_up(bid)
        self._timeout_factor = 1
        if lost:
            self.pacer.reset()
            log.info("central_online_resend", batches=len(lost))

    def _give_up(self, bid: int) -> _InFlight:
        """Forget batch `bid` with its records unacked, so they are read out and sent again
        (`expire`, `_settle_suspects`); what it says about the link is the caller's."""
        fl = self.batches.pop(bid)
        self.records -= fl.count
        self.backlog_batches -= fl.backlog
        self.counters.batches_resent += 1
        return fl

    def next_expiry_in(self) -> float:
        if not self.batches:
            return self.ack_timeout()
        now = time.monotonic()
        due = min(fl.sent_at for fl in self.batches.values()) + self.ack_timeout()
        if self._waiting_on_grace():
            due = min(due, self._suspects_until)
        return due - now

    def drop(self) -> None:
        """Forget every batch in flight (a reconnect: all of it may be lost)."""
        self._timeout_factor = 1
        self._suspects.clear()
        self.batches.clear()
        self.records = 0
        self.backlog_batches = 0
        self.pacer.reset()


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return subtract_ranges(a, subtract_ranges(a, b))


def _bounded(ranges: Ranges) -> Ranges:
    return ranges[-_MAX_RANGES:] if len(ranges) > _MAX_RANGES else ranges
