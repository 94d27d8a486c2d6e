"""Logging tests in (DESIGN.md §8): every central endpoint but a few needs a user.

In-process apps: `await authorize(app, client)` makes a user (an admin unless told otherwise)
through the app's own `Accounts`, logs in with `POST /api/login` and puts the bearer token on
the client. Central as a process: `cli_user(db_url, ...)` runs `central user add`, and
`bearer(base_url, name)` logs in over HTTP.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
from fastapi import FastAPI

from central.identity.users import UnknownUserError

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
    """`central user add` against a database (central may be running on it)."""
    args = [sys.executable, "-m", "central", "user", "add", name, "--role", role,
            "--password-stdin", "--db", db_url]
    if area is not None:
        args += ["--area", area]
    out = subprocess.run(args, input=password + "\n", capture_output=True, text=True,
                         timeout=60, check=False)
    # several workers on one database: the user may be there already
    assert out.returncode == 0 or "exists" in out.stderr, out.stderr + out.stdout


def bearer(base_url: str, name: str = ADMIN, password: str = PASSWORD) -> dict[str, str]:
    """Log in to a running central; returns the Authorization header."""
    r = httpx.post(f"{base_url}/api/login", json={"name": name, "password": password},
                   timeout=30)
    assert r.status_code == 200, r.text
    return auth(r.json()["token"])
