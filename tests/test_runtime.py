"""The shared runtime on real things: a serial line on a pseudo-terminal, SQLite files, and
the logging set-up in a child process (so its cached loggers stay out of this test run)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import tty
from pathlib import Path

import pytest
import serial

from protocols.errors import DetailedError
from runtime.serial import LineReader, PortLostError, open_serial
from runtime.sqlite import SqliteOwner
from tests.helpers import python_env


class LineError(DetailedError):
    """What `open_serial` raises as a caller's error: `error(path, reason)`."""

    template = "{path}: {reason}"
    path: str
    reason: str


class StoreError(Exception):
    """A store's own error class."""


async def test_line_reader_reads_chunks_until_the_far_end_closes() -> None:
    """Bytes written at the far end of a pty come out of read(); when the far end closes,
    read() raises PortLostError with the reason, and the fd is no longer watched."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = await open_serial(os.ttyname(slave), LineError, baudrate=9600)
    try:
        with LineReader(port) as reader:
            os.write(master, b"$BDTCI,1*00\r\n")
            got = b""
            while not got.endswith(b"\r\n"):
                got += await asyncio.wait_for(reader.read(), 5)
            assert got == b"$BDTCI,1*00\r\n"
            os.close(master)
            with pytest.raises(PortLostError) as lost:
                await asyncio.wait_for(reader.read(), 5)
            assert lost.value.reason.startswith(("read failed", "end of file"))
            assert not asyncio.get_running_loop().remove_reader(reader.fd)  # already stopped
    finally:
        port.close()
        os.close(slave)


async def test_open_serial_raises_the_callers_error_for_a_missing_port(tmp_path: Path) -> None:
    """A port that cannot be opened is the caller's error class, with the path and reason."""
    missing = str(tmp_path / "ttyUSB9")
    with pytest.raises(LineError) as err:
        await open_serial(missing, LineError)
    assert err.value.path == missing and err.value.reason
    assert isinstance(err.value.__cause__, serial.SerialException | OSError)


async def test_sqlite_owner_opens_closes_reopens_and_translates_errors(tmp_path: Path) -> None:
    """Calls run on the owner's thread; while closed they raise the store's error; driver
    errors become the store's error unless the owner leaves them to the caller."""
    db = tmp_path / "s.db"
    owner = SqliteOwner(thread_name="t", error=StoreError, closed_message="store is closed")
    with pytest.raises(StoreError, match="store is closed"):
        await owner.call(lambda: None)
    for _ in range(2):  # reopenable
        async with owner.running(lambda: sqlite3.connect(db, isolation_level=None)):
            await owner.call(owner.transaction,
                             lambda c: c.execute("CREATE TABLE IF NOT EXISTS t (x)"))
            with pytest.raises(StoreError, match="no such table"):
                await owner.call(lambda: owner.conn.execute("SELECT * FROM nope"))
            thread = await owner.call(lambda: threading.current_thread().name)
            assert thread.startswith("t")
        assert not owner.is_open
    raw = SqliteOwner(thread_name="r", error=StoreError, closed_message="closed", translate=())
    await raw.open(lambda: sqlite3.connect(db, isolation_level=None))
    with pytest.raises(sqlite3.OperationalError):
        await raw.call(lambda: raw.conn.execute("SELECT * FROM nope"))
    await raw.close()


LOGGING_CHILD = """
import logging, structlog
from runtime.logs import configure_logging
configure_logging("edge-agent")
log = structlog.get_logger("child")
log.info("hello", n=1)
logging.getLogger("somelib").warning("from stdlib")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("task_crashed", task="x")
print("stdout stays clean")
"""


def test_logs_are_json_lines_with_tracebacks_on_stderr_when_not_a_terminal() -> None:
    """Both programs log JSON lines to stderr when it is a pipe: one object per line with the
    program's name, stdlib records too, an exception as a structured traceback; stdout keeps
    only the program's own output."""
    proc = subprocess.run([sys.executable, "-c", LOGGING_CHILD], env=python_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stdout stays clean\n"
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["event"], e["program"], e["level"]) for e in lines] == [
        ("hello", "edge-agent", "info"), ("from stdlib", "edge-agent", "warning"),
        ("task_crashed", "edge-agent", "error")]
    (trace,) = lines[2]["exception"]
    assert trace["exc_type"] == "ZeroDivisionError"
