"""Pacing of the backlog drain (DESIGN.md §4.2): fast on a good link, never at the live
lanes' expense.

Two limits, both on backlog batches only (alarms, events and live telemetry are never paced):

- **AIMD on the number of backlog batches in flight**, driven by the ack round trip. Central
  acks a batch after its commit, so the ack RTT grows when central, the broker or the link
  queue up. The pacer keeps the lowest RTT seen lately as the base and a target of
  `max(2 × base, base + queue_delay_s)` (default 0.5 s; or a fixed `target_rtt_s`): the
  queueing the backlog may add ahead of live data and alarms. As in TCP, a new connection
  starts in *slow start*: each backlog ack under the target adds one batch (the window
  doubles every round trip), so a drain after an outage reaches full speed within a few round
  trips instead of one batch per round trip. The first ack over the target ends slow start:
  the window halves (at most once per smoothed RTT) and from then on grows by 1/window per
  timely ack (one batch per round trip). An ack timeout drops the window to one and halves the
  slow-start threshold. The window never exceeds `max_window`, which the uplink sets below
  its in-flight limit so that slots stay free for the higher lanes.
- **The batch size** adapts too: a backlog batch that times out halves the size of the next
  ones (down to `min_batch_size`, the live lanes' size), a timely ack doubles it back (up to
  `batch_size`). On a narrow link (a weak 4G cell, satellite IP) a 5,000-record message may
  take longer than the ack timeout to get through; without this it would time out and go
  again for ever. The size learnt is kept across reconnects (the link is likely the same).
- **A token bucket** of `max_points_per_s` records per second: the operator's ceiling, e.g.
  for a metered 4G plan or a narrow link shared with video.

Pure logic with an injectable clock; the uplink owns one instance and calls it on its loop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

_BASE_WINDOW_S = 120.0  # the base RTT is the minimum over this long, so it can rise again


@dataclass(frozen=True, slots=True)
class PacerSnapshot:
    window: int
    cwnd: float
    srtt_s: float | None
    base_rtt_s: float | None
    target_rtt_s: float | None
    tokens: float | None
    batch: int

    def to_jsonable(self) -> dict[str, float | int | None]:
        return {"window": self.window, "batch": self.batch, "cwnd": round(self.cwnd, 2),
                "srtt_ms": _ms(self.srtt_s), "base_rtt_ms": _ms(self.base_rtt_s),
                "target_rtt_ms": _ms(self.target_rtt_s),
                "tokens": None if self.tokens is None else int(self.tokens)}


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


class BacklogPacer:
    """How many backlog batches may be in flight and how many records the next one may hold.

    Example::

        pacer = BacklogPacer(max_window=6, max_points_per_s=2000, batch_size=500)
        if backlog_in_flight < pacer.window and (n := pacer.allowance(now)):
            ...send up to n backlog records...; pacer.took(len(records), now)
        pacer.on_ack(rtt_s, now)  # when a backlog batch is fully acknowledged
    """

    def __init__(self, *, max_window: int, batch_size: int, max_points_per_s: float | None = None,
                 target_rtt_s: float | None = None, queue_delay_s: float = 0.5,
                 min_batch_size: int | None = None) -> None:
        min_batch_size = batch_size if min_batch_size is None else min(min_batch_size, batch_size)
        if max_window < 1 or min_batch_size < 1:
            raise ValueError("max_window and batch sizes must be >= 1")
        if max_points_per_s is not None and max_points_per_s <= 0:
            raise ValueError("max_points_per_s must be > 0 (or None for no ceiling)")
        self.max_window = max_window
        self.batch_size = batch_size
        self.min_batch_size = min_batch_size
        self.batch = batch_size  # records per backlog batch now
        self.rate = max_points_per_s
        self.fixed_target = target_rtt_s
        self.queue_delay_s = queue_delay_s
        self.cwnd = 1.0
        self.ssthresh = float(max_window)  # below it, slow start
        self.srtt: float | None = None
        self._samples: deque[tuple[float, float]] = deque()  # (time, rtt) for the base RTT
        self._last_decrease = -math.inf
        # Send when at least 100 ms worth of tokens is there (or a full batch), so a low
        # ceiling makes fewer, fuller batches rather than a stream of tiny ones.
        self._chunk = (batch_size if self.rate is None
                       else min(batch_size, max(1, math.ceil(self.rate * 0.1))))
        self._cap = 0.0 if self.rate is None else max(float(self._chunk), self.rate * 0.5)
        self._tokens = float(self._chunk)
        self._refilled: float | None = None

    # --- limits ----------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Backlog batches allowed in flight now."""
        return max(1, min(self.max_window, int(self.cwnd)))

    def allowance(self, now: float) -> int:
        """Records the next backlog batch may hold now; 0 means wait (`wait_s`)."""
        if self.rate is None:
            return self.batch
        self._refill(now)
        if self._tokens < min(self._chunk, self.batch):
            return 0
        return min(self.batch, int(self._tokens))

    def wait_s(self, now: float) -> float:
        """Seconds until `allowance` is non-zero."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        return max(0.0, (self._chunk - self._tokens) / self.rate)

    def took(self, n: int, now: float) -> None:
        if self.rate is not None:
            self._refill(now)
            self._tokens -= n

    # --- feedback --------------------------------------------------------------------------

    @property
    def base_rtt(self) -> float | None:
        return min(r for _, r in self._samples) if self._samples else None

    @property
    def target(self) -> float | None:
        if self.fixed_target is not None:
            return self.fixed_target
        base = self.base_rtt
        return None if base is None else max(2 * base, base + self.queue_delay_s)

    def on_ack(self, rtt_s: float, now: float) -> None:
        """A backlog batch was fully acknowledged `rtt_s` after it was sent."""
        self._samples.append((now, rtt_s))
        while len(self._samples) > 1 and self._samples[0][0] < now - _BASE_WINDOW_S:
            self._samples.popleft()
        self.srtt = rtt_s if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt_s
        target = self.target
        assert target is not None
        if rtt_s <= target:
            self.batch = min(self.batch_size, self.batch * 2)
            grow = 1.0 if self.cwnd < self.ssthresh else 1.0 / self.cwnd
            self.cwnd = min(float(self.max_window), self.cwnd + grow)
        elif now - self._last_decrease >= (self.srtt or rtt_s):
            self.cwnd = self.ssthresh = max(1.0, self.cwnd / 2)
            self._last_decrease = now

    def on_timeout(self) -> None:
        """A backlog batch went unacknowledged for the ack timeout."""
        self.ssthresh = max(1.0, self.cwnd / 2)
        self.cwnd = 1.0
        self.batch = max(self.min_batch_size, self.batch // 2)

    def reset(self) -> None:
        """A new connection: the path may differ, so start small and learn the RTT again."""
        self.cwnd = 1.0
        self.ssthresh = float(self.max_window)
        self.srtt = None
        self._samples.clear()
        self._last_decrease = -math.inf

    def snapshot(self, now: float) -> PacerSnapshot:
        tokens = None
        if self.rate is not None:
            self._refill(now)
            tokens = self._tokens
        return PacerSnapshot(self.window, self.cwnd, self.srtt, self.base_rtt, self.target, tokens,
                             self.batch)

    def _refill(self, now: float) -> None:
        assert self.rate is not None
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(self._cap, self._tokens + (now - self._refilled) * self.rate)
        if self._refilled is None or now > self._refilled:
            self._refilled = now


__all__ = ["BacklogPacer", "PacerSnapshot"]
