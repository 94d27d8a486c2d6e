"""Sessions (DESIGN.md §8): console cookies and API bearer tokens, an idle timeout, and the
throttle on failed logins.

A token is 32 random bytes (URL-safe base64); the database keeps only its SHA-256, so a copy
of the database opens no session. A session unused for `idle_s` is gone: the next request with
it gets 401 and the row is deleted. `last_used_ms` is written at most every `TOUCH_MS`, so
reads do not turn into a write per request.

`LoginThrottle` counts failures per user name and per client address in a sliding window;
past `max_failures` for a name (or four times that from one address, which a duty room behind
one NAT shares) a login is refused with 429 until the window has passed, whether or not the
password is right, so guessing costs time. It lives in the process (several workers
each keep their own count, which only makes them stricter in sum).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from dataclasses import dataclass

from central.identity.users import User, by_id_program
from central.storage import Storage
from central.storage.program import Program, Sql

TOUCH_MS = 15_000


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: str
    user: User
    kind: str
    csrf: str
    created_ms: int
    last_used_ms: int


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_program(user_id: int, kind: str, token: str, csrf: str, client: str,
                   now: int) -> Program[None]:
    yield Sql("INSERT INTO sessions (token_hash, user_id, kind, csrf, created_ms, last_used_ms,"
              " client) VALUES (?, ?, ?, ?, ?, ?, ?)",
              (token_hash(token), user_id, kind, csrf, now, now, client[:100]))


def find_program(digest: str) -> Program[Session | None]:
    """The session with this token hash and its user, as stored (a read)."""
    rows = yield Sql("SELECT user_id, kind, csrf, created_ms, last_used_ms FROM sessions"
                     " WHERE token_hash = ?", (digest,))
    if not rows:
        return None
    user_id, kind, csrf, created, last = rows[0]
    user = yield from by_id_program(int(user_id))
    return Session(digest, user, str(kind), str(csrf), int(created), int(last))


def touch_program(digest: str, now: int) -> Program[None]:
    yield Sql("UPDATE sessions SET last_used_ms = ? WHERE token_hash = ? AND last_used_ms < ?",
              (now, digest, now))


async def resolve(storage: Storage, token: str, now: int, idle_ms: int) -> Session | None:
    """The live session of `token`, or None; an idle one, or one of a disabled user, is
    deleted. A read per request; a write only to delete or, every `TOUCH_MS`, to touch."""
    digest = token_hash(token)
    session = await storage.run(lambda: find_program(digest), write=False)
    if session is None:
        return None
    if session.user.disabled or now - session.last_used_ms > idle_ms:
        await storage.run(lambda: delete_program(digest))
        return None
    if now - session.last_used_ms >= TOUCH_MS:
        await storage.run(lambda: touch_program(digest, now))
    return session


def delete_program(digest: str) -> Program[None]:
    yield Sql("DELETE FROM sessions WHERE token_hash = ?", (digest,))


def purge_idle_program(now: int, idle_ms: int) -> Program[int]:
    rows = yield Sql("DELETE FROM sessions WHERE last_used_ms < ? RETURNING token_hash",
                     (now - idle_ms,))
    return len(rows)


class LoginThrottle:
    """Failed logins per name and per client address in a sliding window."""

    def __init__(self, *, max_failures: int = 5, window_s: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def retry_after(self, name: str, client: str, now: float | None = None) -> float:
        """Seconds until a login for `name` from `client` is allowed again; 0 when it is."""
        t = time.monotonic() if now is None else now
        wait = 0.0
        for key, limit in ((f"user:{name.lower()}", self.max_failures),
                           (f"client:{client}", 4 * self.max_failures)):
            q = self._recent(key, t)
            if len(q) >= limit:
                wait = max(wait, self.window_s - (t - q[0]))
        return wait

    def failed(self, name: str, client: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        for key in (f"user:{name.lower()}", f"client:{client}"):
            self._fails.setdefault(key, deque()).append(t)
            if len(self._fails) > 10_000:  # bound the memory a flood of names could take
                self._fails.pop(next(iter(self._fails)))

    def succeeded(self, name: str) -> None:
        self._fails.pop(f"user:{name.lower()}", None)
