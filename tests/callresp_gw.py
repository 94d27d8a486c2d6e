"""A gateway stand-in with 叫应 terminals (DESIGN.md §7), over MQTT, for tests and the bench.

It is a `FakeGateway` (the real uplink envelope, seqs, resends until `down/ack`) that also
subscribes to its `down/cmd`: each `play_warning` command is verified with central's pinned
public key, refused if for another gateway, and carried out at most once per cmd_id (as the
edge's ledger does). It reports `received` and `succeeded` as CMD_RESULT records and, for each
terminal in the command, a `delivered` event record at once and, the first time a warning
plays on a terminal, an `ack` after the delay its script gives that terminal (None: nobody
ever presses the button).

`plays[(warning_id, terminal)]` lists the distinct cmd_ids that played there: the test's
"nothing twice" counts.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import httpx
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols import commands as c
from protocols import topics
from protocols.callresp import CallRespEvent, EventType, PlayWarning, event_attrs
from protocols.command_results import CommandResult, CommandState, result_attrs
from protocols.envelope import DataBatch, Record, RecordKind, encode
from tests.fakegw import FakeGateway, Inflight, ThreadedFleet
from tests.helpers import wait_for


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TerminalGateway(FakeGateway):
    def __init__(self, gw: str, host: str, port: int, *, central_key: Ed25519PublicKey,
                 answers: Mapping[str, float | None], ack_timeout_s: float = 2.0) -> None:
        super().__init__(gw, host, port, points=1, ack_timeout_s=ack_timeout_s)
        self.central_key = central_key
        self.answers = dict(answers)  # terminal -> seconds until its button is pressed
        self.plays: dict[tuple[str, str], list[str]] = {}
        self.play_times: dict[tuple[str, str], list[int]] = {}
        self.cmd_ids: set[str] = set()
        self.duplicates = 0
        self.refused = 0
        self._acked: set[tuple[str, str]] = set()
        self._cmd_topic = topics.down(gw, "cmd")
        self._timers: list[threading.Timer] = []

    def _on_connect(self, client: mqtt.Client, u: object, f: object, reason: object,
                    p: object) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(self._cmd_topic, qos=1)
        super()._on_connect(client, u, f, reason, p)

    def _on_message(self, c_: object, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self._cmd_topic:
            super()._on_message(c_, u, msg)
            return
        try:
            cmd = c.open_command(self.central_key, bytes(msg.payload))
        except c.CommandError:
            with self._lock:
                self.refused += 1
            return
        if cmd.gw != self.gw or not isinstance(cmd.args, PlayWarning):
            with self._lock:
                self.refused += 1
            return
        with self._lock:
            if cmd.cmd_id in self.cmd_ids:
                self.duplicates += 1  # a redelivery: reported again, never played again
                fresh = False
            else:
                self.cmd_ids.add(cmd.cmd_id)
                fresh = True
        now = _now_ms()
        recs: list[tuple[RecordKind, dict[str, object]]] = [
            (RecordKind.CMD_RESULT, result_attrs(CommandResult(cmd.cmd_id, CommandState.RECEIVED,
                                                               kind=str(cmd.kind))))]
        if fresh:
            pw = cmd.args
            for t in pw.terminals:
                key = (pw.warning_id, t)
                with self._lock:
                    self.plays.setdefault(key, []).append(cmd.cmd_id)
                    self.play_times.setdefault(key, []).append(now)
                recs.append((RecordKind.EVENT, event_attrs(CallRespEvent(
                    EventType.DELIVERED, pw.warning_id, t, now, cmd_id=cmd.cmd_id))))
                delay = self.answers.get(t)
                if delay is not None and key not in self._acked:
                    self._acked.add(key)
                    timer = threading.Timer(delay, self._ack, (pw.warning_id, t, cmd.cmd_id))
                    timer.daemon = True
                    self._timers.append(timer)
                    timer.start()
            recs.append((RecordKind.CMD_RESULT, result_attrs(CommandResult(
                cmd.cmd_id, CommandState.SUCCEEDED, kind=str(cmd.kind)))))
        self.send(recs)

    def _ack(self, warning_id: str, terminal: str, cmd_id: str) -> None:
        self.send([(RecordKind.EVENT, event_attrs(CallRespEvent(
            EventType.ACK, warning_id, terminal, _now_ms(), cmd_id=cmd_id, by="button-1")))])

    def send(self, recs: Sequence[tuple[RecordKind, Mapping[str, object]]]) -> None:
        """Publish records as one batch under the next seqs (resent until acked)."""
        now = self.clock()
        ts = _now_ms()
        with self._lock:
            first = self.next_seq
            self.next_seq += len(recs)
            records = tuple(Record(seq=first + i, kind=k, ts_ms=ts, point=None, value=None,
                                   attrs=dict(a)) for i, (k, a) in enumerate(recs))
            payload = encode(DataBatch(gw=self.gw, stream=self.stream, records=records,
                                       sent_ms=ts))
            self.inflight[first] = Inflight(first, first + len(recs) - 1, payload, now, now)
        self.client.publish(self._data_topic, payload, qos=1)

    def play_count(self, warning_id: str, terminal: str) -> int:
        with self._lock:
            return len(self.plays.get((warning_id, terminal), ()))

    def stop_timers(self) -> None:
        for t in self._timers:
            t.cancel()


def _online(admin: httpx.Client, gw: str) -> bool:
    rsp = admin.get(f"/api/gateways/{gw}")
    return rsp.status_code == 200 and bool(rsp.json()["online"])


@contextlib.contextmanager
def terminal_fleet(admin: httpx.Client, host: str, port: int, *, central_key: Ed25519PublicKey,
                   answers: Mapping[str, Mapping[str, float | None]], online_timeout: float
                   ) -> Iterator[tuple[dict[str, TerminalGateway], ThreadedFleet]]:
    """A TerminalGateway for each gateway of `answers` (its terminals' scripts) producing in one
    ThreadedFleet, handed over once central (`admin`) lists each online; stopped after."""
    gws = {gw: TerminalGateway(gw, host, port, central_key=central_key, answers=script)
           for gw, script in answers.items()}
    fleet = ThreadedFleet(list(gws.values()), interval_s=2.0)
    fleet.start()
    try:
        for gw in gws:
            wait_for(functools.partial(_online, admin, gw), timeout=online_timeout,
                     what=f"{gw} online")
        yield gws, fleet
    finally:
        for g in gws.values():
            g.stop_timers()
        fleet.close()
