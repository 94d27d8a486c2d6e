"""The audit log (DESIGN.md §8): append-only and hash-chained, in central's database.

Each row is `(seq, ts_ms, actor, action, target, detail)` plus `prev_hash` and `hash`, where
`hash = sha256(prev_hash + "\\n" + canonical JSON of the row)` and `seq` runs 1, 2, 3 … without
a gap. `audit_head` keeps the newest seq and hash. `verify` walks the chain and names the first
row that does not fit: an edited row's hash no longer matches, a removed row leaves a gap in
`seq` or a broken link, a removed newest row leaves the head pointing past the end.

Other components get an `AuditLog` through their constructors and call `append(...)` (its own
transaction) or compose `append_program(...)` into theirs, so an alarm acknowledgement and its
audit row commit together.

Actions are fixed dotted names: `login.ok`, `login.failed`, `logout`, `user.created`,
`user.password_changed`, `user.disabled`, `user.enabled`, `area.created`, `gateway.placed`,
`alarm.ack`, `alarm.clear`, `alarm.comment`, `command.issued`, `command.approved`,
`command.signed`, `command.result`, `gateway.enrolled`, `gateway.revoked` …
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from central import CentralError
from central.storage import Storage
from central.storage.program import Program, Sql
from runtime import clock

log = structlog.get_logger(__name__)
SYSTEM = "system"  # the actor of what central does by itself (signing, results)


class AuditError(CentralError):
    """Base of the audit log's errors."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    ts_ms: int
    actor: str
    action: str
    target: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    rows: int  # rows checked
    head_seq: int
    bad_seq: int | None = None  # the first row that does not fit
    reason: str | None = None


def canonical(seq: int, ts_ms: int, actor: str, action: str, target: str, detail: str) -> bytes:
    return json.dumps([seq, ts_ms, actor, action, target, detail], ensure_ascii=False,
                      separators=(",", ":")).encode()


def chain_hash(prev_hash: str, seq: int, ts_ms: int, actor: str, action: str, target: str,
               detail: str) -> str:
    h = hashlib.sha256(prev_hash.encode() + b"\n")
    h.update(canonical(seq, ts_ms, actor, action, target, detail))
    return h.hexdigest()


def _detail_text(detail: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(detail or {}), ensure_ascii=False, sort_keys=True, default=str,
                      separators=(",", ":"))


def append_program(actor: str, action: str, target: str, detail: Mapping[str, Any] | None,
                   now: int) -> Program[int]:
    """Append one row in the caller's transaction; returns its seq."""
    head = yield Sql("SELECT seq, hash FROM audit_head WHERE id = 1", lock=True)
    prev_seq, prev_hash = int(head[0][0]), str(head[0][1])
    seq = prev_seq + 1
    text = _detail_text(detail)
    digest = chain_hash(prev_hash, seq, now, actor, action, target, text)
    yield Sql("INSERT INTO audit_log (seq, ts_ms, actor, action, target, detail, prev_hash,"
              " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
              (seq, now, actor, action, target, text, prev_hash, digest))
    yield Sql("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
    return seq


def _entry(r: Sequence[Any]) -> AuditEntry:
    try:
        detail = json.loads(r[5])
    except ValueError:
        detail = {"unparsable": r[5]}
    return AuditEntry(seq=r[0], ts_ms=r[1], actor=r[2], action=r[3], target=r[4],
                      detail=detail if isinstance(detail, dict) else {"value": detail},
                      prev_hash=r[6], hash=r[7])


_COLS = "seq, ts_ms, actor, action, target, detail, prev_hash, hash"


def list_program(after_seq: int, limit: int, actor: str | None, action: str | None,
                 newest_first: bool) -> Program[list[AuditEntry]]:
    where, args = ["seq > ?"], [after_seq]
    if actor is not None:
        where.append("actor = ?")
        args.append(actor)  # type: ignore[arg-type]
    if action is not None:
        where.append("action = ?")
        args.append(action)  # type: ignore[arg-type]
    order = "DESC" if newest_first else "ASC"
    rows = yield Sql(f"SELECT {_COLS} FROM audit_log WHERE {' AND '.join(where)}"
                     f" ORDER BY seq {order} LIMIT ?", (*args, limit))
    return [_entry(r) for r in rows]


def verify_chunk_program(after_seq: int, limit: int) -> Program[list[tuple[Any, ...]]]:
    rows = yield Sql(f"SELECT {_COLS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
                     (after_seq, limit))
    return rows


def head_program() -> Program[tuple[int, str]]:
    rows = yield Sql("SELECT seq, hash FROM audit_head WHERE id = 1")
    return int(rows[0][0]), str(rows[0][1])


class AuditLog:
    """Appends to and reads the audit log on `storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.appended = 0

    async def append(self, actor: str, action: str, target: str,
                     detail: Mapping[str, Any] | None = None) -> int:
        """Append one row in its own transaction; returns its seq."""
        now = clock.now_ms()
        seq = await self.storage.run(lambda: append_program(actor, action, target, detail, now))
        self.appended += 1
        log.info("audit_appended", seq=seq, actor=actor, action=action, target=target)
        return seq

    def program(self, actor: str, action: str, target: str,
                detail: Mapping[str, Any] | None = None) -> Program[int]:
        """`append` as a program, to commit in the same transaction as the change it records."""
        self.appended += 1
        return append_program(actor, action, target, detail, clock.now_ms())

    async def entries(self, *, after_seq: int = 0, limit: int = 200, actor: str | None = None,
                      action: str | None = None, newest_first: bool = True) -> list[AuditEntry]:
        return await self.storage.run(
            lambda: list_program(after_seq, limit, actor, action, newest_first), write=False)

    async def verify(self, *, chunk: int = 5000) -> Verdict:
        """Walk the whole chain; the verdict names the first row that does not fit."""
        head_seq, head_hash = await self.storage.run(head_program, write=False)
        prev_hash, expected, rows = "", 1, 0
        after = 0
        while True:
            batch = await self.storage.run(lambda a=after: verify_chunk_program(a, chunk),  # type: ignore[misc]
                                           write=False)
            for seq, ts_ms, actor, action, target, detail, stored_prev, digest in batch:
                rows += 1
                if seq != expected:
                    return Verdict(False, rows, head_seq, expected,
                                   f"row {expected} is missing (next row is {seq})")
                if stored_prev != prev_hash:
                    return Verdict(False, rows, head_seq, seq,
                                   "prev_hash does not match the row before")
                if chain_hash(prev_hash, seq, ts_ms, actor, action, target, detail) != digest:
                    return Verdict(False, rows, head_seq, seq, "hash does not match its content")
                prev_hash, expected = digest, expected + 1
                after = seq
            if len(batch) < chunk:
                break
        last = expected - 1
        if last != head_seq or prev_hash != head_hash:
            bad = last + 1 if last < head_seq else head_seq + 1
            return Verdict(False, rows, head_seq, bad,
                           f"the chain ends at row {last} but the head names row {head_seq}")
        return Verdict(True, rows, head_seq)
