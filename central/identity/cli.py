"""`central user …` and `central audit …` (DESIGN.md §8): sub-apps of the `central` CLI.

They work on the database directly (central may be running on it) and refuse one that does
not exist (`central init` or `central serve` makes it): the first admin is made with
`central user add admin --role admin --password-stdin`. Each change is audited with the
actor `cli:<login name>`.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from central import CentralError
from central.cli.options import ConfigOpt, DbOpt, JsonOpt
from central.cli.output import error, say, table, when
from central.identity.accounts import Accounts
from central.identity.audit import AuditLog
from central.identity.users import Role
from central.storage import Storage

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # a path in an error stays one piece to copy

user_app = typer.Typer(
    name="user", help="Console and API users: add, list, set passwords, disable.",
    epilog="Examples\n\n"
           "printf '%s\\n' \"$PW\" | central user add admin --role admin --password-stdin "
           "--db sqlite:///central.db\n\n"
           "central user add hongshan-duty --role operator --area 420111 --db sqlite:///central.db"
           "\n\ncentral user list --json --db sqlite:///central.db",
    no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
audit_app = typer.Typer(
    name="audit", help="The append-only, hash-chained audit log: verify it, read it.",
    epilog="Examples\n\ncentral audit verify --db sqlite:///central.db\n\n"
           "central audit list --limit 20 --json --db sqlite:///central.db",
    no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


def cli_actor() -> str:
    """Who acts through the CLI, for the audit log: `cli:<login name>`."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _run(config: Path | None, db: str | None,
         body: Callable[[Storage, Accounts, AuditLog], Awaitable[T]]) -> T:
    from central.cli.database import require_existing_database
    from central.config.settings import load_settings
    from central.storage import open_storage

    async def main(db_url: str) -> T:
        async with open_storage(db_url) as storage:
            audit = AuditLog(storage)
            return await body(storage, Accounts(storage, audit), audit)

    try:
        settings = load_settings(config, env=os.environ, db_url=db)
        require_existing_database(settings.db_url)  # never make a new one (central init does)
        return asyncio.run(main(settings.db_url))
    except CentralError as exc:
        error(err, exc)
        raise typer.Exit(1) from exc


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            error(err, "--password-stdin: nothing on standard input")
            raise typer.Exit(1)
        return line.rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("add", short_help="Add a user.  e.g. central user add duty-01 --role "
                                    "operator --area 420111 --password-stdin")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name: letters, digits, _ . @ -")],
    role: Annotated[Role, typer.Option("--role", "-r", help="viewer, operator, admin or "
                                                            "auditor.")],
    area: Annotated[str | None, typer.Option(
        "--area", help="Area code the user is limited to (its subtree); default: all.")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password "
                                                 "from the first line of standard input.")] = False,
    config: ConfigOpt = None, db: DbOpt = None,
) -> None:
    """Add a user with a role and, optionally, an area.

    Example: printf '%s\\n' "$PW" | central user add admin --role admin --password-stdin --db sqlite:///central.db
    """
    password = _password(password_stdin)
    user = _run(config, db, lambda _s, accounts, _a: accounts.add_user(
        cli_actor(), name, role, password, area_code=area))
    say(out, f"added {user.name} ({user.role}, area {user.area_code or 'all'})")


@user_app.command("list", short_help="List users.  e.g. central user list --json")
def user_list(json_out: JsonOpt = False, config: ConfigOpt = None, db: DbOpt = None) -> None:
    """List every user with role, area and whether disabled.

    Example: central user list --json --db sqlite:///central.db
    """
    users = _run(config, db, lambda _s, accounts, _a: accounts.list_users())
    if json_out:
        typer.echo(json.dumps([{"name": u.name, "role": str(u.role), "area": u.area_code,
                                "disabled": u.disabled, "created_ms": u.created_ms}
                               for u in users], ensure_ascii=False))
        return
    out.print(table(["name", "role", "area", "disabled"],
                    [[u.name, str(u.role), u.area_code or "(all)", "yes" if u.disabled else ""]
                     for u in users]))


@user_app.command("passwd", short_help="Set a user's password.  e.g. central user passwd "
                                       "duty-01 --password-stdin")
def user_passwd(
    name: Annotated[str, typer.Argument(help="The user.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password "
                                                 "from the first line of standard input.")] = False,
    config: ConfigOpt = None, db: DbOpt = None,
) -> None:
    """Set a new password; the user's open sessions and tokens end.

    Example: printf '%s\\n' "$PW" | central user passwd duty-01 --password-stdin
    """
    password = _password(password_stdin)
    _run(config, db, lambda _s, accounts, _a: accounts.set_password(cli_actor(), name, password))
    say(out, f"password of {name} changed")


@user_app.command("disable", short_help="Disable a user.  e.g. central user disable duty-01")
def user_disable(
    name: Annotated[str, typer.Argument(help="The user.")],
    enable: Annotated[bool, typer.Option(
        "--enable", help="Enable the user again instead.")] = False,
    config: ConfigOpt = None, db: DbOpt = None,
) -> None:
    """Disable a user (their sessions end and logins fail), or --enable them again.

    Example: central user disable duty-01 --db sqlite:///central.db
    """
    _run(config, db, lambda _s, accounts, _a: accounts.set_disabled(cli_actor(), name, not enable))
    say(out, f"{name} {'enabled' if enable else 'disabled'}")


@audit_app.command("verify", short_help="Check the hash chain.  e.g. central audit verify")
def audit_verify(json_out: JsonOpt = False, config: ConfigOpt = None, db: DbOpt = None) -> None:
    """Walk the audit log's hash chain. Exit 0 if intact; exit 1 naming the first row that
    was altered or removed.

    Example: central audit verify --db sqlite:///central.db
    """
    v = _run(config, db, lambda _s, _acc, audit: audit.verify())
    if json_out:
        typer.echo(json.dumps({"ok": v.ok, "rows": v.rows, "head_seq": v.head_seq,
                               "bad_seq": v.bad_seq, "reason": v.reason}))
    elif v.ok:
        out.print(f"audit log intact: {v.rows} rows, head {v.head_seq}")
    else:
        error(err, f"audit log broken at row {v.bad_seq}: {v.reason}")
    if not v.ok:
        raise typer.Exit(1)


@audit_app.command("list", short_help="Show audit rows.  e.g. central audit list --limit 20")
def audit_list(
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Rows, newest first.")] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. login.failed.")] = None,
    json_out: JsonOpt = False, config: ConfigOpt = None, db: DbOpt = None,
) -> None:
    """Show the newest audit rows.

    Example: central audit list --action login.failed --json
    """
    rows = _run(config, db, lambda _s, _acc, audit: audit.entries(limit=limit, action=action))
    if json_out:
        typer.echo(json.dumps([{"seq": e.seq, "ts_ms": e.ts_ms, "actor": e.actor,
                                "action": e.action, "target": e.target,
                                "detail": dict(e.detail)} for e in rows], ensure_ascii=False))
        return
    out.print(table(["seq", "time", "actor", "action", "target", "detail"],
                    [[e.seq, when(e.ts_ms), e.actor, e.action, e.target,
                      json.dumps(dict(e.detail), ensure_ascii=False)] for e in rows]))
