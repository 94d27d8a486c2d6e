"""A fake gateway that speaks the uplink contract (DESIGN.md §4) with paho and no outbox.

On every connect it subscribes to its `down/ack` and to central's state, publishes its retained
`up/state` (with an offline Will) and its `up/birth`, then resends every batch still
unacknowledged — as the edge does. `produce()` publishes a new `up/data` batch of one reading
per point under the gateway's own stream with the next seqs: envelope version 2 (columnar) once
central's state announced it, else 1, as `edge_agent.uplink.link` chooses. `resend_due()`
publishes again each batch whose ack is overdue. The timeout is the edge's
(`edge_agent.uplink.ledger`): `ack_timeout_s`, doubled after each expiry up to 8x while no
timely ack comes, back to 1x on a timely ack or a reconnect; and when central turns online
while connected (not a retained state), everything in flight goes again at once. A bench
that resent on a fixed timeout would double an overloaded central's load where a real fleet
backs off. Batches are never split or merged, so an ack range that covers a batch's
`[first, last]` acknowledges it; the lag kept per batch is from its first publish to its ack,
resends included.

The class owns no thread and no socket loop: `run_threaded()` drives a few of them for a test
(paho's own network thread per client), and `bench/fleet.py` drives thousands from one
selector loop. Each record's value and timestamp are a function of its seq
(`expected_record`), so a test can check central's copy without keeping one.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from protocols import envelope as env
from protocols import topics

T0_MS = 1_700_000_000_000
DEVICE = "fake-1"
MAX_TIMEOUT_FACTOR = 8  # as edge_agent.uplink.ledger


def expected_record(seq: int, points: int) -> tuple[str, int, float]:
    """(point key, ts_ms, value) of the record with `seq` on a fake gateway with `points`."""
    return f"{DEVICE}/p{(seq - 1) % points}", T0_MS + seq * 10, seq / 4


@dataclass(slots=True)
class Inflight:
    """One published, unacknowledged batch."""

    first: int
    last: int
    payload: bytes
    first_sent: float
    last_sent: float


@dataclass(slots=True)
class GatewayCounters:
    batches: int = 0
    points: int = 0
    resends: int = 0
    acks: int = 0
    points_acked: int = 0
    connects: int = 0
    disconnects: int = 0
    # (first publish, ack, records) per acknowledged batch, monotonic seconds
    lags: list[tuple[float, float, int]] = field(default_factory=list)


class FakeGateway:
    """One gateway: its paho client, its seq counter and its unacknowledged batches."""

    def __init__(self, gw: str, host: str, port: int, *, points: int = 10,
                 ack_timeout_s: float = 10.0, keepalive_s: int = 60,
                 clock: Callable[[], float] = time.monotonic) -> None:
        topics.check_gateway_id(gw)
        self.gw, self.host, self.port = gw, host, port
        self.points, self.ack_timeout_s, self.clock = points, ack_timeout_s, clock
        self.keepalive_s = keepalive_s
        self.stream = uuid.uuid4().hex
        self.boot_id = uuid.uuid4().hex[:12]
        self.next_seq = 1
        self.inflight: dict[int, Inflight] = {}  # by first seq
        self.counters = GatewayCounters()
        self.connected = False
        self.central: env.State | None = None  # central's last state
        self.timeout_factor = 1
        self._lock = threading.Lock()  # paho's thread acks while another thread produces
        self._data_topic = topics.up(gw, "data")
        self._ack_topic = topics.down(gw, "ack")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{gw}",
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.will_set(topics.up(gw, "state"), self._state(False), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- messages ---------------------------------------------------------------------------

    def _state(self, online: bool) -> bytes:
        return env.encode(env.State(online=online, boot_id=self.boot_id, version="fake-0",
                                    bearer="eth", backlog=len(self.inflight),
                                    ts_ms=time.time_ns() // 1_000_000, stream=self.stream))

    def _birth(self) -> bytes:
        pts = tuple(env.PointInfo(ordinal=i, key=f"p{i}", name_zh=f"测点{i}", unit="%LEL")
                    for i in range(self.points))
        dev = env.DeviceInfo(id=DEVICE, profile="fake-v1", profile_hash="0" * 16, points=pts)
        return env.encode(env.Birth(gw=self.gw, stream=self.stream, boot_id=self.boot_id,
                                    version="fake-0", devices=(dev,)))

    @property
    def envelope(self) -> int:
        """The data batch's envelope version, as the edge chooses it."""
        return (env.VERSIONS[-1] if self.central is not None
                and self.central.envelope >= env.VERSIONS[-1] else env.VERSION)

    def _batch(self, first: int, size: int) -> bytes:
        recs = []
        for seq in range(first, first + size):
            point, ts, value = expected_record(seq, self.points)
            recs.append(env.Record(seq=seq, kind=env.RecordKind.TELEMETRY, ts_ms=ts, point=point,
                                   value=value))
        return env.encode(env.DataBatch(gw=self.gw, stream=self.stream, records=tuple(recs),
                                        sent_ms=time.time_ns() // 1_000_000),
                          version=self.envelope)

    # --- paho callbacks (paho's network thread, or the bench's selector loop) ---------------

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: object,
                    _p: object) -> None:
        if getattr(reason, "is_failure", False):
            return
        client.subscribe([(self._ack_topic, 1), (topics.CENTRAL_STATE, 1)])
        client.publish(topics.up(self.gw, "state"), self._state(True), qos=1, retain=True)
        client.publish(topics.up(self.gw, "birth"), self._birth(), qos=1)
        now = self.clock()
        with self._lock:
            self.connected = True
            self.counters.connects += 1
            self.timeout_factor = 1
            # After a reconnect nothing in flight can be trusted: send it all again (§4.4).
            self._resend_all(now)

    def _on_disconnect(self, _c: object, _u: object, _f: object, _r: object, _p: object) -> None:
        with self._lock:
            self.connected = False
            self.counters.disconnects += 1

    def _resend_all(self, now: float) -> None:
        for fl in self.inflight.values():
            fl.last_sent = now
            self.client.publish(self._data_topic, fl.payload, qos=1)
            self.counters.resends += 1

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            got = env.decode(bytes(msg.payload))
        except env.EnvelopeError:
            return
        if isinstance(got, env.State) and msg.topic == topics.CENTRAL_STATE:
            self._on_central_state(got, bool(msg.retain))
            return
        if not isinstance(got, env.Ack) or got.stream != self.stream:
            return
        now = self.clock()
        with self._lock:
            self.counters.acks += 1
            for a, b in got.ranges:
                for first in [f for f, fl in self.inflight.items() if a <= f and fl.last <= b]:
                    fl = self.inflight.pop(first)
                    self.counters.points_acked += fl.last - fl.first + 1
                    self.counters.lags.append((fl.first_sent, now, fl.last - fl.first + 1))
                    if now - fl.last_sent <= self.ack_timeout_s:  # a timely ack
                        self.timeout_factor = 1

    def _on_central_state(self, state: env.State, retained: bool) -> None:
        """Central (back) online while we are connected: what is in flight may have gone into
        a broker with no subscriber, so it all goes again now, as the edge does."""
        with self._lock:
            before, self.central = self.central, state
            if not state.online or retained or (
                    before is not None and before.online and before.boot_id == state.boot_id):
                return
            self.timeout_factor = 1
            self._resend_all(self.clock())

    # --- driven from outside ----------------------------------------------------------------

    def connect(self) -> None:
        """Open the TCP connection and queue CONNECT (the caller runs the network loop)."""
        self.client.connect(self.host, self.port, keepalive=self.keepalive_s)

    def produce(self, size: int | None = None) -> None:
        """Publish the next batch of `size` records (default: one per point)."""
        size = size or self.points
        now = self.clock()
        with self._lock:
            first = self.next_seq
            self.next_seq += size
            payload = self._batch(first, size)
            self.inflight[first] = Inflight(first, first + size - 1, payload, now, now)
            self.counters.batches += 1
            self.counters.points += size
        # Published even while disconnected: paho keeps it, and the reconnect resends anyway.
        self.client.publish(self._data_topic, payload, qos=1)

    def resend_due(self) -> int:
        """Publish again every batch whose ack is overdue; returns how many."""
        now = self.clock()
        due = []
        with self._lock:
            timeout = self.ack_timeout_s * self.timeout_factor
            for fl in self.inflight.values():
                if now - fl.last_sent >= timeout:
                    fl.last_sent = now
                    due.append(fl.payload)
            self.counters.resends += len(due)
            if due:
                self.timeout_factor = min(self.timeout_factor * 2, MAX_TIMEOUT_FACTOR)
        for payload in due:
            self.client.publish(self._data_topic, payload, qos=1)
        return len(due)

    def publish_again(self, first: int, size: int) -> None:
        """Publish records `first`..`first + size - 1` once more, as a gateway does whose ack
        was lost: central must count them as duplicates and store nothing new."""
        self.counters.resends += 1
        self.client.publish(self._data_topic, self._batch(first, size), qos=1)

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self.inflight)


class ThreadedFleet:
    """A few fake gateways for a test: paho's network thread per client, one ticker thread
    that produces a batch per gateway every `interval_s` and resends what is due."""

    def __init__(self, gateways: Sequence[FakeGateway], interval_s: float) -> None:
        self.gateways = list(gateways)
        self.interval_s = interval_s
        self.producing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick_loop, name="fakegw.tick", daemon=True)

    def start(self) -> None:
        for g in self.gateways:
            g.connect()
            g.client.loop_start()  # paho reconnects by itself from here on
        self.producing.set()
        self._thread.start()

    def stop_producing(self) -> None:
        """No new batches from now on; resends go on until `close()`."""
        self.producing.clear()

    def all_acked(self) -> bool:
        return all(g.unacked == 0 for g in self.gateways)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for g in self.gateways:
            g.client.disconnect()
            g.client.loop_stop()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for g in self.gateways:
                if self.producing.is_set():
                    g.produce()  # offline too: a gateway keeps measuring while its link is down
                g.resend_due()
