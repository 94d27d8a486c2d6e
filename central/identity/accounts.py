"""Managing users and logging them in, each step audited (DESIGN.md §8).

`Accounts` is what the API and the CLI call: `add_user`, `set_password`, `set_disabled`,
`list_users`, `login`, `logout`. Every change commits in the same transaction as its audit row;
every login, ok or failed, is audited. Hashing (argon2, deliberately slow) runs off the event
loop.
"""

from __future__ import annotations

import asyncio
import secrets

import structlog

from central import CentralError
from central.identity import sessions, users
from central.identity.audit import AuditLog
from central.identity.authz import AuthCounters, Principal
from central.identity.sessions import LoginThrottle
from central.identity.users import Role, User
from central.storage import Storage
from central.storage.program import Program, Sql
from protocols.errors import DetailedError
from runtime import clock

log = structlog.get_logger(__name__)


class LoginFailedError(CentralError, DetailedError):
    """Wrong name or password, or a disabled user (the caller is not told which)."""

    template = "wrong user name or password"


class LoginThrottledError(CentralError, DetailedError):
    template = "too many failed logins; try again in {retry_after} s"
    retry_after_s: float

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait, rounded up (the message and the Retry-After header)."""
        return int(self.retry_after_s) + 1


class Accounts:
    def __init__(self, storage: Storage, audit: AuditLog, *, throttle: LoginThrottle | None = None,
                 counters: AuthCounters | None = None, idle_s: float = 1800.0) -> None:
        self.storage = storage
        self.audit = audit
        self.idle_s = idle_s
        self.throttle = throttle or LoginThrottle()
        self.counters = counters or AuthCounters()

    # --- users -------------------------------------------------------------------------------

    async def add_user(self, actor: str, name: str, role: Role | str, password: str, *,
                       area_code: str | None = None, area_id: int | None = None) -> User:
        """Raises `DuplicateUserError`, `WeakPasswordError`, `UnknownAreaError`."""
        r = Role(role)
        digest = await asyncio.to_thread(users.hash_password, password)
        now = clock.now_ms()

        def program() -> Program[User]:
            aid = area_id
            if area_code is not None:
                aid = yield from users.area_id_program(area_code)
            user = yield from users.create_program(name, r, aid, digest, now)
            yield from self.audit.program(actor, "user.created", f"user:{name}",
                                          {"role": str(r), "area": user.area_code})
            return user

        return await self.storage.run(program)

    async def set_password(self, actor: str, name: str, password: str) -> User:
        digest = await asyncio.to_thread(users.hash_password, password)
        now = clock.now_ms()

        def program() -> Program[User]:
            user = yield from users.set_password_program(name, digest, now)
            yield from self.audit.program(actor, "user.password_changed", f"user:{name}", {})
            return user

        return await self.storage.run(program)

    async def set_disabled(self, actor: str, name: str, disabled: bool) -> User:
        now = clock.now_ms()

        def program() -> Program[User]:
            user = yield from users.set_disabled_program(name, disabled, now)
            yield from self.audit.program(actor, "user.disabled" if disabled else "user.enabled",
                                          f"user:{name}", {})
            return user

        return await self.storage.run(program)

    async def list_users(self, scope_path: str | None = None) -> list[User]:
        return await self.storage.run(lambda: users.list_program(scope_path), write=False)

    async def get_user(self, name: str) -> User:
        return await self.storage.run(lambda: users.get_program(name), write=False)

    async def count(self) -> int:
        return await self.storage.run(users.count_program, write=False)

    # --- sessions ----------------------------------------------------------------------------

    async def login(self, name: str, password: str, *, kind: str,
                    client: str) -> tuple[User, str, str]:
        """Check the password; returns the user, a new session token and its CSRF token.

        Raises `LoginThrottledError` or `LoginFailedError`; both are audited and counted.
        """
        wait = self.throttle.retry_after(name, client)
        if wait > 0:
            self.counters.logins["throttled"] += 1
            await self.audit.append(name, "login.failed", f"user:{name}",
                                    {"client": client, "reason": "throttled"})
            raise LoginThrottledError(wait)
        found = await self.storage.run(lambda: users.credentials_program(name), write=False)
        stored = found[1] if found else users.DUMMY_HASH
        ok = await asyncio.to_thread(users.verify_password, stored, password)
        if not ok or found is None or found[0].disabled:
            reason = ("unknown_user" if found is None else "disabled" if found[0].disabled
                      else "bad_password")
            self.throttle.failed(name, client)
            self.counters.logins["failed"] += 1
            await self.audit.append(name, "login.failed", f"user:{name}",
                                    {"client": client, "reason": reason, "kind": kind})
            log.info("login_failed", user=name, client=client, reason=reason)
            raise LoginFailedError()
        user, old_hash = found
        self.throttle.succeeded(name)
        token, csrf = sessions.new_token(), secrets.token_urlsafe(24)
        now = clock.now_ms()
        upgrade = users.needs_rehash(old_hash)
        new_hash = await asyncio.to_thread(users.rehash, password) if upgrade else None

        idle_ms = int(self.idle_s * 1000)

        def program() -> Program[None]:
            # abandoned tokens (never used again) go here, not only when presented
            yield from sessions.purge_idle_program(now, idle_ms)
            yield from sessions.create_program(user.id, kind, token, csrf, client, now)
            if new_hash is not None:
                yield Sql("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user.id))
            yield from self.audit.program(user.name, "login.ok", f"user:{user.name}",
                                          {"client": client, "kind": kind})

        await self.storage.run(program)
        self.counters.logins["ok"] += 1
        log.info("login_ok", user=user.name, client=client, kind=kind)
        return user, token, csrf

    async def logout(self, p: Principal) -> None:
        def program() -> Program[None]:
            yield from sessions.delete_program(p.token_hash)
            yield from self.audit.program(p.name, "logout", f"user:{p.name}", {"kind": p.kind})

        await self.storage.run(program)
