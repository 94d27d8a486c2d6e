"""Only `central init` and `central serve` make central's database; every other command that
works on one refuses a database that does not exist (a mistyped --db, the default
./central.db in another folder, an empty PostgreSQL schema) with one clear line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from central import cli
from tests.pg import pg_schema

RUN = CliRunner()

# Every command that works on an existing database, with what it needs besides --db.
ON_A_DATABASE = [
    ("user", "list"), ("user", "disable", "duty-01"),
    ("user", "add", "duty-01", "--role", "viewer", "--password-stdin"),
    ("audit", "list"), ("audit", "verify"),
    ("gateway", "enroll-token", "gw-001"), ("gateway", "revoke", "gw-001"),
    ("gateway", "certs"),
]


def central(*args: str, stdin: str | None = None) -> tuple[int, str]:
    with capture_logs():
        result = RUN.invoke(cli.app, list(args), input=stdin)
    return result.exit_code, result.output


@pytest.mark.parametrize("command", ON_A_DATABASE, ids=" ".join)
def test_a_wrong_db_is_refused_and_nothing_is_created(tmp_path: Path,
                                                      command: tuple[str, ...]) -> None:
    """A --db naming no database: exit 1, the path and how to create it; no file, no CA."""
    db = tmp_path / "typo" / "centrl.db"
    pki = ["--pki-dir", str(tmp_path / "pki")] if command[0] == "gateway" else []
    code, out = central(*command, "--db", f"sqlite:///{db}", *pki, stdin="Some-password-1\n")
    assert code == 1, out
    flat = " ".join(out.split())
    assert f"no database at {db}" in flat and "central init" in flat, out
    assert not db.exists() and not db.parent.exists()
    assert not (tmp_path / "pki").exists()


def test_no_db_in_another_folder_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`central user list` without --db, in a folder without central.db: refused, naming the
    absolute path it looked at; ./central.db is not created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FIELDLINK_CENTRAL_DB_URL", raising=False)
    code, out = central("user", "list")
    assert code == 1 and f"no database at {tmp_path / 'central.db'}" in " ".join(out.split())
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_centrals_is_refused(tmp_path: Path) -> None:
    """An existing file without central's tables is not taken for a database (nor changed)."""
    other = tmp_path / "other.db"
    other.write_bytes(b"")
    code, out = central("audit", "verify", "--db", f"sqlite:///{other}")
    assert code == 1 and "not a central database" in out
    assert other.read_bytes() == b""


def test_init_creates_the_database_then_the_commands_work(tmp_path: Path) -> None:
    """`central init` makes the database (once; again it says up to date); then user add and
    list work on it."""
    db = f"sqlite:///{tmp_path}/var/central.db"
    code, out = central("init", "--db", db)
    assert code == 0 and f"created central's database at {tmp_path}/var/central.db" in out
    code, out = central("init", "--db", db)
    assert code == 0 and "is up to date" in out
    code, out = central("user", "add", "admin", "--role", "admin", "--password-stdin",
                        "--db", db, stdin="First-admin-pw-1\n")
    assert code == 0, out
    assert "admin" in central("user", "list", "--db", db)[1]


@pytest.mark.postgres
def test_an_empty_postgres_schema_is_refused_until_init() -> None:
    """PostgreSQL: a schema without central's tables is refused (no tables made in it);
    after `central init` the same command works."""
    with pg_schema("fl_clidb") as url:
        code, out = central("user", "list", "--json", "--db", url)
        assert code == 1 and "has no tables of central's" in " ".join(out.split()), out
        code, out = central("user", "list", "--json", "--db", url)
        assert code == 1, "the refusal made no tables"
        assert central("init", "--db", url)[0] == 0
        code, out = central("user", "list", "--json", "--db", url)
        assert code == 0 and out.strip() == "[]", out


def test_ca_commands_other_than_init_need_the_ca(tmp_path: Path) -> None:
    """central-cert and broker-config use the CA `central ca init` made; with none (a wrong
    --pki-dir) they refuse, naming the folder, and make no second CA."""
    pki = tmp_path / "pki"
    code, out = central("ca", "central-cert", "--out", str(tmp_path / "mqtt"),
                        "--pki-dir", str(pki))
    assert code == 1 and f"no CA in {pki}" in " ".join(out.split()) and "central ca init" in out
    code, out = central("broker-config", "--out", str(tmp_path / "mosq"), "--host", "mqtt.x",
                        "--pki-dir", str(pki))
    assert code == 1 and "no CA in" in out
    assert not pki.exists()
    assert central("ca", "init", "--pki-dir", str(pki))[0] == 0
    code, out = central("ca", "central-cert", "--out", str(tmp_path / "mqtt"),
                        "--pki-dir", str(pki))
    assert code == 0, out


def test_help_shows_an_absolute_sqlite_url_with_four_slashes() -> None:
    """`central --help`: an absolute SQLite path is sqlite:////var/..., never sqlite:///var/."""
    code, out = central("--help")
    assert code == 0
    assert "sqlite:////var/lib/fieldlink/central.db" in out
    assert "sqlite:///var/" not in out
