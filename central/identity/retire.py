"""Retiring (decommissioning) a gateway: out of service, its history kept for the record.

Retiring is not deleting. A gateway replaced or taken out of service must leave the duty
console's map, its lists and its offline counts (an "offline" that never ends teaches duty
officers to ignore offline gateways), but its readings, events, alarms and audit rows are
evidence: they stay, readable by their refs as before. So retiring writes one
`retired_gateways` row; the gateway lists (`Storage.list_gateways`, so also the offline alarm
rule and the metrics) and the console overview skip the gateways named there.

In one transaction with that row: the audit entry (who, the required reason), and, only with
`force`, the gateway's open alarms (active, or cleared but not acknowledged) cleared and
acknowledged with the reason as the comment. Without `force` open alarms refuse the retire
(`OpenAlarmsError`, 409): a duty officer must not lose an alarm silently. After the commit
the API revokes its certificates and voids its enrolment tokens (the production broker then
refuses it: `Enrolment.revoke`, itself audited) and cancels its pending commands.

A retired gateway that is heard again is not resurrected: ingest asks `RetiredGate.admit`,
which drops its state, birth and data messages (not acked, so the gateway keeps its backlog
should it be brought back), counts them in the row (`refused`, `last_refused_ms`; counted in
memory and written in batches, so a gateway that keeps resending does not cost a commit per
message) and logs `retired_gateway_heard` once per gateway and process. The process also
counts them by kind in `fieldlink_central_retired_messages_total` (no gateway label: the row
says which), so an operator sees a decommissioned gateway still talking (left switched on, or
its identity cloned) without reading the table. Bringing it back is an explicit admin act,
`unretire` (audited, with a reason); it then needs a new enrolment token to reconnect through
the production broker.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from central import CentralError
from central.alarms.desk import ack_program, clear_program
from central.health.metrics import Metrics, RefusedKind
from central.identity.audit import AuditLog
from central.storage import Storage, StorageError, UnknownGatewayError
from central.storage.program import Program, Sql
from protocols.envelope import Birth
from protocols.errors import DetailedError
from runtime import clock

log = structlog.get_logger(__name__)
REFRESH_S = 5.0  # how soon another worker's ingest sees a retire or unretire
FLUSH_S = 5.0  # how long refused messages may be counted in memory before they are written


class RetireError(CentralError):
    """Base of the retire errors: the gateway's state refuses the act (409)."""


class AlreadyRetiredError(RetireError, DetailedError):
    template = "gateway {gw} is retired already"
    gw: str


class NotRetiredError(RetireError, DetailedError):
    template = "gateway {gw} is not retired"
    gw: str


class OpenAlarmsError(RetireError, DetailedError):
    template = ("gateway {gw} has {count} open alarm(s) (ids {ids}): handle them, or retire "
                "with force to clear and acknowledge them with the reason")
    gw: str
    count: int
    ids: str


class GatewayRetiredError(RetireError, DetailedError):
    template = "gateway {gw} is retired: bring it back first (central gateways unretire)"
    gw: str


@dataclass(frozen=True, slots=True)
class Retirement:
    gw: str
    retired_ms: int
    retired_by: str
    reason: str
    alarms_cleared: int  # open alarms the retire cleared or acknowledged (force)
    refused: int  # messages the gateway sent since, refused by ingest
    last_refused_ms: int | None


_COLS = "gw, retired_ms, retired_by, reason, alarms_cleared, refused, last_refused_ms"


def _retirement(r: Sequence[Any]) -> Retirement:
    return Retirement(str(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), int(r[5]),
                      None if r[6] is None else int(r[6]))


def retirement_program(gw: str) -> Program[Retirement | None]:
    rows = yield Sql(f"SELECT {_COLS} FROM retired_gateways WHERE gw = ?", (gw,))
    return _retirement(rows[0]) if rows else None


def retirements_program() -> Program[list[Retirement]]:
    rows = yield Sql(f"SELECT {_COLS} FROM retired_gateways ORDER BY gw")
    return [_retirement(r) for r in rows]


def retired_since_program() -> Program[dict[str, int]]:
    """The retired gateways and when each was retired (which names the retirement)."""
    rows = yield Sql("SELECT gw, retired_ms FROM retired_gateways")
    return {str(r[0]): int(r[1]) for r in rows}


def retired_set_program() -> Program[frozenset[str]]:
    return frozenset((yield from retired_since_program()))


def _known_program(gw: str) -> Program[None]:
    """`UnknownGatewayError` unless central has heard of `gw` or placed it at a site."""
    rows = yield Sql("SELECT gw FROM gateways WHERE gw = ? UNION SELECT gw FROM gateway_sites"
                     " WHERE gw = ?", (gw, gw))
    if not rows:
        raise UnknownGatewayError(gw)


def _close_alarms(gw: str, user: str, comment: str, force: bool, now: int) -> Program[int]:
    """Clear and acknowledge the gateway's open alarms (force), else refuse if any."""
    rows = yield Sql("SELECT id, state, ack_state FROM alarms WHERE gw = ? AND"
                     " (state = 'active' OR ack_state = 'unacknowledged') ORDER BY id", (gw,))
    if rows and not force:
        raise OpenAlarmsError(gw, len(rows), ", ".join(str(r[0]) for r in rows))
    for alarm_id, state, ack_state in rows:
        if state == "active":
            yield from clear_program(int(alarm_id), user, comment, now)
        if ack_state == "unacknowledged":
            yield from ack_program(int(alarm_id), user, comment, now)
    return len(rows)


def retire_program(audit: AuditLog, gw: str, user: str, reason: str, force: bool,
                   now: int) -> Program[Retirement]:
    yield from _known_program(gw)
    if (yield from retirement_program(gw)) is not None:
        raise AlreadyRetiredError(gw)
    cleared = yield from _close_alarms(gw, user, f"gateway retired: {reason}", force, now)
    yield Sql("INSERT INTO retired_gateways (gw, retired_ms, retired_by, reason, alarms_cleared)"
              " VALUES (?, ?, ?, ?, ?)", (gw, now, user, reason, cleared))
    yield from audit.program(user, "gateway.retired", f"gateway:{gw}",
                             {"reason": reason, "force": force, "alarms_cleared": cleared})
    return Retirement(gw, now, user, reason, cleared, 0, None)


def unretire_program(audit: AuditLog, gw: str, user: str, reason: str) -> Program[Retirement]:
    was = yield from retirement_program(gw)
    if was is None:
        yield from _known_program(gw)
        raise NotRetiredError(gw)
    yield Sql("DELETE FROM retired_gateways WHERE gw = ?", (gw,))
    yield from audit.program(user, "gateway.unretired", f"gateway:{gw}",
                             {"reason": reason, "retired_ms": was.retired_ms,
                              "refused_while_retired": was.refused})
    return was


async def retire(storage: Storage, audit: AuditLog, gw: str, *, user: str, reason: str,
                 force: bool = False) -> Retirement:
    """Raises `UnknownGatewayError`, `AlreadyRetiredError`, `OpenAlarmsError`."""
    now = clock.now_ms()
    done = await storage.run(lambda: retire_program(audit, gw, user, reason, force, now))
    log.warning("gateway_retired", gw=gw, user=user, alarms_cleared=done.alarms_cleared)
    return done


async def unretire(storage: Storage, audit: AuditLog, gw: str, *, user: str,
                   reason: str) -> Retirement:
    """Raises `UnknownGatewayError`, `NotRetiredError`; returns the retirement it undid."""
    was = await storage.run(lambda: unretire_program(audit, gw, user, reason))
    log.warning("gateway_unretired", gw=gw, user=user, refused_while_retired=was.refused)
    return was


# --- the ingest side --------------------------------------------------------------------------


class FromGateway(Protocol):
    @property
    def gw(self) -> str: ...


class InfoFromGateway(FromGateway, Protocol):
    @property
    def msg(self) -> object: ...  # a state or a birth


M = TypeVar("M", bound=InfoFromGateway)
B = TypeVar("B", bound=FromGateway)


@dataclass(slots=True)
class _Refusals:
    """One retirement's messages refused since the last flush."""

    messages: int
    last_ms: int


def count_refused_program(pending: Mapping[tuple[str, int], _Refusals]) -> Program[None]:
    """Add refusals to their retirements' rows, `(gw, retired_ms)` naming the retirement: the
    counts of one undone meanwhile go nowhere, also if the gateway was retired again. The
    last refusal time only moves forward (workers flush in any order)."""
    for (gw, retired_ms), r in sorted(pending.items(), key=lambda kv: kv[0]):
        yield Sql("UPDATE retired_gateways SET refused = refused + ?, last_refused_ms = CASE"
                  " WHEN last_refused_ms IS NULL OR last_refused_ms < ? THEN ?"
                  " ELSE last_refused_ms END WHERE gw = ? AND retired_ms = ?",
                  (r.messages, r.last_ms, r.last_ms, gw, retired_ms))


class RetiredGate:
    """Which gateways are retired, as one central process shares the list among what only
    decides with it what to store, show or call (ingest, the radio receiver, 叫应's scheduler
    and directory): re-read at most every `refresh_s`, and at once after `forget`, which the
    retire and unretire API calls in its own process; another worker (PostgreSQL) sees the
    change at its next re-read. A check that closes a race with a retire reads the table in
    its own transaction instead (the command store's insert and last look, 叫应's create and
    due steps).

    Refused messages are counted in memory and written by `flush`, one transaction for every
    gateway: the first refusal at once, later ones at most every `flush_s` (with the next
    group that comes after), and whatever is left when the API reads the counts (its list,
    an unretire) and at shutdown. The counts are a record, not only a metric: the admin's
    list shows them, an unretire copies them into its audit entry, and the counts of several
    workers add up in the row."""

    def __init__(self, storage: Storage, *, refresh_s: float = REFRESH_S,
                 flush_s: float = FLUSH_S, metrics: Metrics | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.refresh_s = refresh_s
        self.flush_s = flush_s
        self.metrics = metrics
        self.refused = 0  # messages refused by this process
        self._monotonic = monotonic
        self._since: dict[str, int] = {}  # gw -> retired_ms, as last read
        self._retired: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._logged: set[str] = set()
        self._pending: dict[tuple[str, int], _Refusals] = {}
        self._flushed_at: float | None = None
        self._unreadable = 0  # checks against a stale list in the current read outage
        self._flush_failing = False

    def forget(self) -> None:
        self._read_at = None

    async def retired(self) -> frozenset[str]:
        """The retired gateways; raises `StorageError` if they are due for a re-read and
        cannot be read."""
        now = self._monotonic()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._since = await self.storage.run(retired_since_program, write=False)
            self._retired = frozenset(self._since)
            self._read_at = now
            self._logged &= self._retired  # an unretired gateway is logged again if retired
        return self._retired

    async def admit(self, infos: list[M], batches: list[B]) -> tuple[list[M], list[B]]:
        """The messages of gateways in service; the others are counted and dropped. Raises
        nothing: if the retired list cannot be re-read, the last one read decides (logged
        once per outage) and the next group tries again."""
        retired = await self._checked()
        if not retired and not self._pending:
            return infos, batches
        refused_infos = [m for m in infos if m.gw in retired]
        refused_data = [b for b in batches if b.gw in retired]
        if not refused_infos and not refused_data:
            await self._flush_if_due()
            return infos, batches
        kinds = Counter(RefusedKind.BIRTH if isinstance(m.msg, Birth) else RefusedKind.STATE
                        for m in refused_infos)
        kinds[RefusedKind.DATA] += len(refused_data)
        await self._refuse(Counter(m.gw for m in [*refused_infos, *refused_data]), kinds)
        return ([m for m in infos if m.gw not in retired],
                [b for b in batches if b.gw not in retired])

    async def refuses(self, gw: str) -> bool:
        """Whether a message of `gw` (a radio frame) is refused: counted and logged as
        `admit` counts ingest's. A frame of a gateway in service allocates nothing here (the
        radio receiver asks for every frame); it only lets a due flush go out."""
        if gw not in await self._checked():
            await self._flush_if_due()
            return False
        await self._refuse(Counter({gw: 1}), Counter({RefusedKind.RADIO: 1}))
        return True

    async def flush(self) -> None:
        """Write the refusals counted since the last flush, in one transaction. Raises
        nothing: if storage fails they wait for the next flush (logged once per outage)."""
        if not self._pending:
            return
        self._flushed_at = self._monotonic()
        pending, self._pending = self._pending, {}
        try:
            await self.storage.run(lambda: count_refused_program(pending))
        except StorageError as exc:
            for key, r in pending.items():
                self._add(key, r.messages, r.last_ms)
            if not self._flush_failing:
                log.error("retired_gateway_count_failed", error=str(exc),
                          messages=sum(r.messages for r in pending.values()))
            self._flush_failing = True
            return
        if self._flush_failing:
            log.info("retired_gateway_count_recovered",
                     messages=sum(r.messages for r in pending.values()))
        self._flush_failing = False

    async def _checked(self) -> frozenset[str]:
        try:
            retired = await self.retired()
        except StorageError as exc:
            if self.metrics is not None:
                self.metrics.retired_list_unreadable += 1
            if not self._unreadable:
                log.error("retired_gateways_unreadable", error=str(exc),
                          checking_against=len(self._retired))
            self._unreadable += 1
            return self._retired
        if self._unreadable:
            log.info("retired_gateways_recovered", unreadable_checks=self._unreadable)
            self._unreadable = 0
        return retired

    async def _refuse(self, counts: Counter[str], kinds: Counter[RefusedKind]) -> None:
        """Count refusals (`counts` by gateway, the same messages `kinds` by kind) in memory
        and in the metric; flush if due."""
        self.refused += counts.total()
        if self.metrics is not None:
            self.metrics.retired_messages.update(kinds)
        now = clock.now_ms()
        for gw, n in counts.items():
            if gw not in self._logged:
                log.warning("retired_gateway_heard", gw=gw, messages=n)
                self._logged.add(gw)
            self._add((gw, self._since[gw]), n, now)
        await self._flush_if_due()

    async def _flush_if_due(self) -> None:
        """Flush if anything waits and the last flush is `flush_s` old."""
        if self._pending and (self._flushed_at is None
                              or self._monotonic() - self._flushed_at >= self.flush_s):
            await self.flush()

    def _add(self, key: tuple[str, int], messages: int, last_ms: int) -> None:
        r = self._pending.get(key)
        if r is None:
            self._pending[key] = _Refusals(messages, last_ms)
        else:
            r.messages += messages
            r.last_ms = max(r.last_ms, last_ms)
