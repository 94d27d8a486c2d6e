"""`central demo` stops on Ctrl-C within a bound, also with a console's event stream open, and
says nothing at ERROR on the way out (issue 15: it had hung past 30 s, and amqtt had logged
"Broadcast loop stopped by exception" with a traceback)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, python_env, wait_for
from tests.identity import bearer

pytestmark = pytest.mark.e2e

STOP_BOUND_S = 25.0  # server grace 5 s + children 5 s + radio 5 s + broker, with room


def _login(out: Path, base: str) -> dict[str, str] | None:
    m = re.search(r"Console login: user (\S+)  password (\S+)", out.read_text(errors="replace"))
    return None if m is None else bearer(base, m.group(1), m.group(2))


def _hold_stream(url: str, headers: dict[str, str], received: list[bytes]) -> None:
    """A console's live view: reads the event stream until the server ends it."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            while chunk := resp.read1(4096):
                received.append(chunk)
    except (OSError, http.client.HTTPException):
        received.append(b"<cut>")  # the server dropped the stream instead of ending it


def test_demo_stops_within_a_bound_on_ctrl_c_with_a_console_stream_open(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) while a console holds /api/console/events: every process is gone within 25 s, the stream ended, and stderr has no ERROR and no traceback from the stop."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out_path, err_path = tmp_path / "demo.out", tmp_path / "demo.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "central", "demo", "--data-dir", str(tmp_path / "d"),
             "--http-port", str(port), "--log-json", "--log-level", "info"],
            env=python_env(), stdout=out, stderr=err, start_new_session=True)
    try:
        headers = wait_for(lambda: _login(out_path, base), timeout=120, interval=0.5,
                           what="the demo's console login")
        received: list[bytes] = []
        stream = threading.Thread(target=_hold_stream, daemon=True, args=(
            f"{base}/api/console/events", headers, received))
        stream.start()
        wait_for(lambda: b"event: overview" in b"".join(received), timeout=30,
                 what="the console stream's first event")
        before_stop = err_path.stat().st_size
        stopped_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within {STOP_BOUND_S} s of Ctrl-C")
        took = time.monotonic() - stopped_at
        stream.join(timeout=5)
        assert not stream.is_alive(), "the console stream was not ended"
        assert received[-1] != b"<cut>", "the console stream was cut, not ended"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc in (0, 130), rc
    shutdown_log = err_path.read_bytes()[before_stop:].decode(errors="replace")
    assert '"central_stopping"' in shutdown_log and '"broker_stopped"' in shutdown_log
    bad = [line for line in shutdown_log.splitlines()
           if '"level": "error"' in line or "Traceback" in line or "ERROR" in line]
    assert not bad, bad[:3]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "d")], capture_output=True,
                               text=True, check=False).stdout
    assert not leftovers.strip(), f"children left running: {leftovers}"
    print(f"demo stopped {took:.1f} s after Ctrl-C")
