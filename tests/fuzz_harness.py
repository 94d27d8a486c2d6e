"""Central's ingest path under generated envelopes (issue 10): decode + validate + store on a
real SQLite, through `Ingest.decode_group` / `store_group` (the code the MQTT loop runs, minus
the broker). Shared by `tests/test_ingest_fuzz.py` and `bench/fuzz_ingest.py`.

It records instead of raising: an exception out of ingest is a crash (counted by class, the
first few kept with their traceback); every refusal must be counted under a known reason; every
good record of an accepted batch must be in the `readings` table afterwards.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from central.commands.check import WritePolicy
from central.commands.dispatch import CommandService
from central.commands.store import CommandStore
from central.config.settings import Settings
from central.health.metrics import Metrics
from central.identity.audit import AuditLog
from central.ingest.subscriber import GatewayMismatchError, Ingest, MessageTypeMismatchError
from central.storage.program import Program, Sql
from central.storage.sqlite import SqliteStorage
from protocols import topics
from protocols.limits import Reason
from tests.hostile import fuzz_batch, hostile_birth, hostile_envelope, hostile_state

GW = "gw-f"
STREAM = "s1"
FIRST_GOOD_SEQ = 10_001  # generated bad records use seqs below this
KNOWN_REASONS = frozenset({*map(str, Reason), GatewayMismatchError.reason,
                           MessageTypeMismatchError.reason, "bad_topic"})


def _held_program(first: int) -> Program[list[int]]:
    rows = yield Sql("SELECT seq FROM readings WHERE gw = ? AND stream = ? AND seq >= ?",
                     (GW, STREAM, first))
    return [r[0] for r in rows]


class IngestFuzz:
    """One SQLite database and one `Ingest` for a whole run; `feed()` one example at a time."""

    def __init__(self, path: Path) -> None:
        self._runner = asyncio.Runner()
        # synchronous=OFF: a real SQLite file, without an fsync per example.
        self.storage = SqliteStorage(path, synchronous="OFF")
        self.metrics = Metrics()
        settings = Settings(db_url=f"sqlite:///{path}", mqtt_client_id="fuzz")
        self.commands = CommandStore(settings.db_url)
        self.expected: set[int] = set()
        self.next_seq = FIRST_GOOD_SEQ
        self.examples = 0
        self.crashes: Counter[str] = Counter()
        self.first_crashes: list[str] = []
        self._runner.run(self.storage.open())
        self._runner.run(self.commands.open())
        # Command results (CMD_RESULT records) move commands, as in `central serve`.
        self.ingest = Ingest(settings, self.storage, self.metrics, command_hooks=CommandService(
            settings, self.storage, self.commands, Ed25519PrivateKey.generate(),
            audit=AuditLog(self.storage), policy=WritePolicy.from_dirs()))

    def close(self) -> None:
        try:
            self._runner.run(self.commands.close())
            self._runner.run(self.storage.close())
        finally:
            self._runner.close()

    def message(self, draw: st.DrawFn) -> tuple[str, bytes, list[int]]:
        """Draw one example: mostly data batches, some states, births and garbage (also on
        topics that expect something else)."""
        kind = draw(st.sampled_from(["data"] * 8 + ["state", "birth", "other"]))
        if kind == "other":
            name = draw(st.sampled_from(["data", "state", "birth", "bogus"]))
            topic = f"{topics.PREFIX}/{GW}/up/{name}"
            return topic, draw(st.one_of(hostile_envelope(), hostile_state(),
                                         hostile_birth(GW))), []
        if kind == "state":
            return topics.up(GW, "state"), draw(hostile_state()), []
        if kind == "birth":
            return topics.up(GW, "birth"), draw(hostile_birth(GW)), []
        payload, good = draw(fuzz_batch(GW, STREAM, self.next_seq))
        self.next_seq += len(good) or 1
        return topics.up(GW, "data"), payload, good

    def feed(self, topic: str, payload: bytes, good: list[int]) -> None:
        self.examples += 1
        try:
            self._runner.run(self._feed(topic, payload, good))
        except Exception as exc:  # the harness's whole point: count what escapes ingest
            self.crashes[type(exc).__name__] += 1
            if len(self.first_crashes) < 3:
                self.first_crashes.append("".join(traceback.format_exception(exc))[-3000:])

    async def _feed(self, topic: str, payload: bytes, good: list[int]) -> None:
        message = aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)
        infos, batches = self.ingest.decode_group([message])
        acked = await self.ingest.store_group(infos, batches)
        if good:
            assert [b.stream for b in acked] == [STREAM], "an accepted batch was not acked"
            self.expected.update(good)

    def lost(self) -> int:
        held = set(self._runner.run(self.storage.run(lambda: _held_program(FIRST_GOOD_SEQ),
                                                     write=False)))
        return len(self.expected - held)

    def unknown_reasons(self) -> set[str]:
        return (set(self.metrics.messages_rejected) | set(self.metrics.records_rejected)) \
            - KNOWN_REASONS

    def summary(self) -> dict[str, Any]:
        rejected = Counter(self.metrics.messages_rejected)
        rejected.update(self.metrics.records_rejected)
        return {"examples": self.examples,
                "rejected_by_reason": dict(sorted(rejected.items())),
                "messages_rejected": sum(self.metrics.messages_rejected.values()),
                "records_rejected": sum(self.metrics.records_rejected.values()),
                "good_records": len(self.expected),
                "crashes": sum(self.crashes.values()),
                "crashes_by_class": dict(self.crashes),
                "write_failures": self.metrics.write_failures,
                "command_reports": self.ingest.command_hooks.counters.reports,  # type: ignore[union-attr]
                "good_records_lost": self.lost()}
