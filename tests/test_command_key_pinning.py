"""Central's command key and CA are where every worker finds them, and a key gateways pinned
is never silently replaced (central.commands.keys, Settings.beside_database)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from central import cli
from central.commands.keys import (
    SigningKeyMismatchError,
    SigningKeyMissingError,
    check_signing_key,
    key_path_for,
    load_or_create_key,
    signing_key,
)
from central.config.settings import Settings, SettingsError
from central.identity.enrolment_api import pki_dir_for
from protocols.command_keys import public_key_b64
from tests.pg import BACKENDS, database_url, pg_schema

PG = "postgresql://postgres@127.0.0.1:5432/test"


def test_postgres_needs_absolute_shared_paths(tmp_path: Path) -> None:
    """With PostgreSQL, no default in the working directory: pki_dir and command_key_path
    must be set, and absolute; SQLite keeps its default next to the file."""
    with pytest.raises(SettingsError, match="pki_dir: with PostgreSQL set it"):
        pki_dir_for(Settings(db_url=PG))
    with pytest.raises(SettingsError, match="command_key_path: with PostgreSQL set it"):
        key_path_for(Settings(db_url=PG))
    with pytest.raises(SettingsError, match="pki is relative"):
        pki_dir_for(Settings(db_url=PG, pki_dir=Path("pki")))
    with pytest.raises(SettingsError, match="is relative"):
        key_path_for(Settings(db_url=PG, command_key_path=Path("k.pem")))
    shared = Settings(db_url=PG, pki_dir=tmp_path / "pki", command_key_path=tmp_path / "k.pem")
    assert (pki_dir_for(shared), key_path_for(shared)) == (tmp_path / "pki", tmp_path / "k.pem")
    local = Settings(db_url=f"sqlite:///{tmp_path}/db/c.db")
    assert pki_dir_for(local) == tmp_path / "db" / "pki"
    assert key_path_for(local) == tmp_path / "db" / "central-command-key.pem"


@pytest.fixture
def busy_port() -> Iterator[str]:
    """A port that is taken: a `central serve` the check did not stop cannot start either
    (exit 1 without the expected line), rather than serving until the test times out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield str(s.getsockname()[1])


@pytest.mark.postgres
def test_serve_refuses_postgres_without_shared_paths(busy_port: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`central serve` on PostgreSQL without pki_dir: exit 1 with one line, not a start; no
    CA or key is made in the working directory."""
    monkeypatch.chdir(tmp_path)
    with capture_logs(), pg_schema("fl_keys") as url:  # were the check gone: a throwaway one
        result = CliRunner().invoke(cli.app, ["serve", "--db", url, "--http-port", busy_port])
    assert result.exit_code == 1
    assert "pki_dir: with PostgreSQL set it" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_pinned_key_is_never_replaced(tmp_path: Path, kind: str) -> None:
    """First start makes and records the key; with the file gone central refuses (naming the
    file) and makes none; the file back, it starts with the same key; a file with another
    key is refused; a key file from before the record existed is adopted."""
    with database_url(kind, tmp_path) as url:
        path = tmp_path / "keys" / "command-key.pem"
        settings = Settings(db_url=url, pki_dir=tmp_path / "pki", command_key_path=path)
        first, _ = asyncio.run(signing_key(settings))
        saved = path.read_bytes()
        path.unlink()
        for check in (signing_key, check_signing_key):
            with pytest.raises(SigningKeyMissingError, match=str(path)) as missing:
                asyncio.run(check(settings))
            assert missing.value.pinned == public_key_b64(first.public_key())
            assert not path.exists()
        path.write_bytes(saved)
        path.chmod(0o600)
        again, _ = asyncio.run(signing_key(settings))
        assert public_key_b64(again.public_key()) == public_key_b64(first.public_key())

        other = tmp_path / "other.pem"
        in_other = public_key_b64(load_or_create_key(other).public_key())
        wrong = settings.model_copy(update={"command_key_path": other})
        with pytest.raises(SigningKeyMismatchError):
            asyncio.run(signing_key(wrong))
        with pytest.raises(SigningKeyMismatchError):
            asyncio.run(check_signing_key(wrong))

    with database_url(kind, tmp_path / "older") as url:  # central from before the record
        adopted = Settings(db_url=url, pki_dir=tmp_path / "pki", command_key_path=other)
        key, _ = asyncio.run(signing_key(adopted))
        assert public_key_b64(key.public_key()) == in_other
        asyncio.run(check_signing_key(adopted))  # recorded now: the next start checks it


def test_serve_refuses_to_start_without_the_pinned_key(tmp_path: Path, busy_port: str) -> None:
    """`central serve` whose key file is gone: exit 1 naming the file, and no new key."""
    db = f"sqlite:///{tmp_path}/central.db"
    asyncio.run(signing_key(Settings(db_url=db)))
    key = tmp_path / "central-command-key.pem"
    key.unlink()
    with capture_logs():
        result = CliRunner().invoke(cli.app, ["serve", "--db", db, "--http-port", busy_port])
    assert result.exit_code == 1
    assert f"{key}: missing" in " ".join(result.output.split())
    assert not key.exists()
