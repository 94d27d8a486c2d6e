"""Logging tests in (DESIGN.md §8): every central endpoint but a few needs a user.

In-process apps: `await authorize(app, client)` makes a user (an admin unless told otherwise)
through the app's own `Accounts`, logs in with `POST /api/login` and puts the bearer token on
the client. Central as a process: `cli_user(db_url, ...)` does what `central user add` does,
and `bearer(base_url, name)` logs in over HTTP.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi import FastAPI

from central.cli.database import require_existing_database
from central.identity.accounts import Accounts
from central.identity.audit import AuditLog
from central.identity.cli import cli_actor
from central.identity.users import DuplicateUserError, UnknownUserError
from central.storage import open_storage

PASSWORD = "correct-horse-battery-9"
ADMIN = "test-admin"


async def ensure_user(app: FastAPI, name: str = ADMIN, role: str = "admin",
                      area: str | None = None, password: str = PASSWORD) -> None:
    accounts = app.state.accounts
    try:
        await accounts.get_user(name)
    except UnknownUserError:
        await accounts.add_user("test-setup", name, role, password, area_code=area)


async def token_for(app: FastAPI, client: httpx.AsyncClient, name: str = ADMIN,
                    role: str = "admin", area: str | None = None) -> str:
    """Make the user if needed and log in; returns a bearer token."""
    await ensure_user(app, name, role, area)
    r = await client.post("/api/login", json={"name": name, "password": PASSWORD},
                          headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def authorize(app: FastAPI, client: httpx.AsyncClient, name: str = ADMIN,
                    role: str = "admin", area: str | None = None) -> str:
    """Log `client` in (all its requests carry the token from now on); returns the token."""
    token = await token_for(app, client, name, role, area)
    client.headers["Authorization"] = f"Bearer {token}"
    return token


def cli_user(db_url: str, name: str = ADMIN, role: str = "admin", area: str | None = None,
             password: str = PASSWORD) -> None:
    """What `central user add` does, against a database central may be running on, in this
    process: a child interpreter importing central cost a second of CPU per user, for setup
    (test_identity_cli and test_cli_database run the command itself)."""
    require_existing_database(db_url)

    async def add() -> None:
        async with open_storage(db_url) as storage:
            try:
                await Accounts(storage, AuditLog(storage)).add_user(
                    cli_actor(), name, role, password, area_code=area)
            except DuplicateUserError:  # several workers on one database: it may be there
                pass

    # In a thread with its own event loop: the calling test may be running one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, add()).result(timeout=60)


def bearer(base_url: str, name: str = ADMIN, password: str = PASSWORD) -> dict[str, str]:
    """Log in to a running central; returns the Authorization header."""
    r = httpx.post(f"{base_url}/api/login", json={"name": name, "password": password},
                   timeout=30)
    assert r.status_code == 200, r.text
    return auth(r.json()["token"])
