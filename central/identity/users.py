"""Console and API users (DESIGN.md §8): a role, an area scope, an argon2 password hash.

Roles and what they may do (`PERMISSIONS`):

- `viewer`: read gateways, values, alarms, commands within the user's area;
- `operator`: the same, and acknowledge, clear and comment alarms, issue and approve commands;
- `admin`: read and operate, and manage users, areas and gateway placement;
- `auditor`: read, and read the audit log (and nothing that changes state).

A user with an area sees and acts only in that area's subtree; a user without one (NULL)
covers the whole tree. Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's
second recommended profile); a hash made with older parameters is upgraded on the next login.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from central import CentralError, DuplicateError, RefusedError
from central.areas.tree import area_program
from central.storage import NotFoundError
from central.storage.program import Program, Sql

MIN_PASSWORD = 10
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
_HASHER = PasswordHasher()


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    AUDITOR = "auditor"


class Permission(enum.StrEnum):
    READ = "read"  # gateways, values, alarms, commands, areas (within the scope)
    OPERATE = "operate"  # ack/clear/comment alarms, issue/approve commands
    ADMINISTER = "administer"  # users, areas, gateway placement
    AUDIT = "audit"  # the audit log


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.OPERATE}),
    Role.ADMIN: frozenset({Permission.READ, Permission.OPERATE, Permission.ADMINISTER}),
    Role.AUDITOR: frozenset({Permission.READ, Permission.AUDIT}),
}


class UserError(CentralError):
    """Base of the user errors that are the caller's fault."""


class UnknownUserError(NotFoundError):
    kind = "user"


class DuplicateUserError(UserError, DuplicateError):
    kind = "user"


class WeakPasswordError(UserError, RefusedError):
    what = "password"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    role: Role
    area_id: int | None
    area_path: str | None  # the scope's path (`/1/4/`), None for the whole tree
    area_code: str | None
    disabled: bool
    created_ms: int
    updated_ms: int

    @property
    def permissions(self) -> frozenset[Permission]:
        return PERMISSIONS[self.role]


_COLS = ("u.id, u.name, u.role, u.area_id, ar.path, ar.code, u.disabled, u.created_ms,"
         " u.updated_ms FROM users u LEFT JOIN areas ar ON ar.id = u.area_id")


def _user(r: Sequence[Any]) -> User:
    return User(id=r[0], name=r[1], role=Role(r[2]), area_id=r[3], area_path=r[4],
                area_code=r[5], disabled=bool(r[6]), created_ms=r[7], updated_ms=r[8])


def check_password(password: str) -> None:
    """Refuse passwords a duty network should not accept."""
    if len(password) < MIN_PASSWORD:
        raise WeakPasswordError(f"at least {MIN_PASSWORD} characters")
    if password.strip() != password:
        raise WeakPasswordError("leading or trailing white space")
    if len(set(password)) < 4:
        raise WeakPasswordError("too few different characters")


def hash_password(password: str) -> str:
    check_password(password)
    return _HASHER.hash(password)


def rehash(password: str) -> str:
    """A fresh hash of a password that was just verified (no strength check: it is in use)."""
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    """True if `password` matches; a malformed stored hash matches nothing."""
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


# A hash of nothing anybody knows: an unknown name costs as much time as a wrong password.
DUMMY_HASH = _HASHER.hash("fieldlink-no-such-user-0000")


# --- programs ---------------------------------------------------------------------------------


def get_program(name: str) -> Program[User]:
    rows = yield Sql(f"SELECT {_COLS} WHERE u.name = ?", (name,))
    if not rows:
        raise UnknownUserError(name)
    return _user(rows[0])


def by_id_program(user_id: int) -> Program[User]:
    rows = yield Sql(f"SELECT {_COLS} WHERE u.id = ?", (user_id,))
    if not rows:
        raise UnknownUserError(str(user_id))
    return _user(rows[0])


def credentials_program(name: str) -> Program[tuple[User, str] | None]:
    rows = yield Sql(f"SELECT {_COLS.replace(' FROM', ', u.password_hash FROM')}"
                     " WHERE u.name = ?", (name,))
    return None if not rows else (_user(rows[0]), rows[0][9])


def area_id_program(code: str) -> Program[int]:
    from central.areas.tree import UnknownAreaError

    rows = yield Sql("SELECT id FROM areas WHERE code = ?", (code,))
    if not rows:
        raise UnknownAreaError(code)
    return int(rows[0][0])


def create_program(name: str, role: Role, area_id: int | None, password_hash: str,
                   now: int) -> Program[User]:
    if area_id is not None:
        yield from area_program(area_id)
    rows = yield Sql("INSERT INTO users (name, role, area_id, password_hash, disabled,"
                     " created_ms, updated_ms) VALUES (?, ?, ?, ?, 0, ?, ?)"
                     " ON CONFLICT (name) DO NOTHING RETURNING id",
                     (name, str(role), area_id, password_hash, now, now))
    if not rows:
        raise DuplicateUserError(name)
    return (yield from by_id_program(int(rows[0][0])))


def list_program(scope_path: str | None = None) -> Program[list[User]]:
    if scope_path is None:
        rows = yield Sql(f"SELECT {_COLS} ORDER BY u.name")
    else:
        rows = yield Sql(f"SELECT {_COLS} WHERE ar.path LIKE ? ORDER BY u.name",
                         (scope_path + "%",))
    return [_user(r) for r in rows]


def set_password_program(name: str, password_hash: str, now: int) -> Program[User]:
    user = yield from get_program(name)
    yield Sql("UPDATE users SET password_hash = ?, updated_ms = ? WHERE id = ?",
              (password_hash, now, user.id))
    # A new password ends every session opened with the old one.
    yield Sql("DELETE FROM sessions WHERE user_id = ?", (user.id,))
    return user


def set_disabled_program(name: str, disabled: bool, now: int) -> Program[User]:
    user = yield from get_program(name)
    yield Sql("UPDATE users SET disabled = ?, updated_ms = ? WHERE id = ?",
              (int(disabled), now, user.id))
    if disabled:
        yield Sql("DELETE FROM sessions WHERE user_id = ?", (user.id,))
    return (yield from by_id_program(user.id))


def count_program() -> Program[int]:
    rows = yield Sql("SELECT count(*) FROM users")
    return int(rows[0][0])
