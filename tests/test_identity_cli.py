"""`central user …` and `central audit …` (DESIGN.md §8) on a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from structlog.testing import capture_logs
from typer.testing import CliRunner

from central import cli

RUN = CliRunner()


def central(*args: str, stdin: str | None = None) -> tuple[int, str]:
    # In-process there is no entry point to send library logs to stderr (central.cli.main
    # does that): keep them out of the command's output.
    with capture_logs():
        result = RUN.invoke(cli.app, list(args), input=stdin)
    return result.exit_code, result.output


def test_user_lifecycle_and_audit(tmp_path: Path) -> None:
    """add (password on stdin) -> list --json -> passwd -> disable / --enable; each step is
    in the audit log, which verifies; bad input exits 1 or 2 with a clear line."""
    db = f"sqlite:///{tmp_path}/central.db"
    assert central("init", "--db", db)[0] == 0  # only init (or serve) makes the database
    code, out = central("user", "add", "admin", "--role", "admin", "--password-stdin",
                        "--db", db, stdin="First-admin-pw-1\n")
    assert code == 0 and "added admin (admin, area all)" in out, out
    code, out = central("user", "list", "--json", "--db", db)
    assert code == 0
    assert json.loads(out)[0] | {"created_ms": 0} == {
        "name": "admin", "role": "admin", "area": None, "disabled": False, "created_ms": 0}
    assert central("user", "passwd", "admin", "--password-stdin", "--db", db,
                   stdin="Second-admin-pw-2\n")[0] == 0
    assert central("user", "disable", "admin", "--db", db)[0] == 0
    code, out = central("user", "list", "--json", "--db", db)
    assert json.loads(out)[0]["disabled"] is True
    assert central("user", "disable", "admin", "--enable", "--db", db)[0] == 0

    code, out = central("user", "add", "admin", "--role", "viewer", "--password-stdin",
                        "--db", db, stdin="Another-pass-3\n")
    assert code == 1 and "exists" in out
    code, out = central("user", "add", "weak", "--role", "viewer", "--password-stdin",
                        "--db", db, stdin="short\n")
    assert code == 1 and "at least 10" in out
    code, out = central("user", "add", "x", "--role", "root", "--password-stdin", "--db", db,
                        stdin="Whatever-pass-4\n")
    assert code == 2  # not a role: usage error
    code, out = central("user", "add", "d1", "--role", "operator", "--area", "nowhere",
                        "--password-stdin", "--db", db, stdin="Whatever-pass-4\n")
    assert code == 1 and "nowhere" in out

    code, out = central("audit", "list", "--json", "--db", db)
    actions = [row["action"] for row in json.loads(out)]
    assert actions == ["user.enabled", "user.disabled", "user.password_changed", "user.created"]
    assert all(row["actor"].startswith("cli") for row in json.loads(out))
    code, out = central("audit", "verify", "--json", "--db", db)
    assert code == 0 and json.loads(out) == {"ok": True, "rows": 4, "head_seq": 4,
                                             "bad_seq": None, "reason": None}


def test_every_command_has_help_with_an_example() -> None:
    """Each user/audit command's --help shows an example."""
    for args in (("user", "add"), ("user", "list"), ("user", "passwd"), ("user", "disable"),
                 ("audit", "verify"), ("audit", "list")):
        code, out = central(*args, "--help")
        assert code == 0 and "Example" in out and "central " in out, args
