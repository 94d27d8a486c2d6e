"""`central demo` stops on Ctrl-C within a bound, in order and quietly, also with a console's
event stream open, and leaves no process behind however it is stopped.

Issue 15: it had hung past 30 s, and amqtt had logged "Broadcast loop stopped by exception"
with a traceback. Later: a terminal's Ctrl-C reached every child at once (they shared the
demo's process group), the BeiDou simulator exited first, and central logged
`narrowband_port_failed`, the Xinzhou gateway `beidou_port_lost`, the Jiang'an gateway
`terminal_offline` for each 叫应 terminal (central/demo/shutdown.py has the order now)."""

from __future__ import annotations

import contextlib
import http.client
import json
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

STOP_BOUND_S = 25.0  # server grace 5 s + agents 5 s + simulators 5 s + terminals, with room
START_S = 120.0  # a dozen Python processes on a box that runs other tests beside
SUMMARY = re.compile(r"Fieldlink demo stopped in [\d.]+ s \(演示已停止\): \d+ child processes "
                     r"ended in order, none killed\.")
# The scripted gas leak raises alarms at warning level whenever it comes: not about the stop.
SCENARIO_EVENTS = {"alarm_raised", "alarm_changed"}


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


def _start_demo(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    """`central demo` in a session of its own (as a shell runs a job in its own process
    group), JSON logs at info on stderr (demo.err), its output in demo.out."""
    with (tmp_path / "demo.out").open("wb") as out, (tmp_path / "demo.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "central", "demo", "--data-dir", str(tmp_path / "d"),
             "--http-port", str(port), "--log-json", "--log-level", "info"],
            env=python_env(), stdout=out, stderr=err, start_new_session=True)


def _log_sizes(tmp_path: Path) -> dict[Path, int]:
    """The demo's log and each child's (gateways, simulators, terminals) and their sizes now."""
    logs = [tmp_path / "demo.err", *(tmp_path / "d").rglob("*.log")]
    return {p: p.stat().st_size for p in logs}


def _complaints_since(sizes: dict[Path, int]) -> list[str]:
    """Every line at WARNING or above, and every traceback, that the demo or a child logged
    after `sizes` was taken (but the scripted leak's alarms)."""
    bad = []
    for path, size in sizes.items():
        with path.open("rb") as f:
            f.seek(size)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                complaint = (record.get("level") in ("warning", "error", "critical")
                             and record.get("event") not in SCENARIO_EVENTS)
            else:
                complaint = "Traceback" in line or "ERROR" in line
            if complaint:
                bad.append(f"{path.relative_to(path.parents[1])}: {line}")
    return bad


def _leftovers(tmp_path: Path) -> str:
    """The processes still running that belong to this demo (by its data directory)."""
    return subprocess.run(["pgrep", "-af", str(tmp_path / "d")], capture_output=True,
                          text=True, check=False).stdout.strip()


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals, *, group: bool) -> int:
    """Send `sig` to the demo (to its whole process group if `group`, as a terminal sends
    Ctrl-C) and wait for it within the bound; its exit code."""
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo did not stop within {STOP_BOUND_S} s of {sig.name}")


def test_demo_stops_in_order_on_ctrl_c_with_a_console_stream_open(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) while a console holds /api/console/events: the demo exits 0 within 25 s with its one-line summary, the stream ended, nothing (central, a gateway, a simulator) logged a warning, an error or a traceback on the way out (no lost BeiDou port, link or terminal), and no process is left."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_demo(tmp_path, port)
    try:
        headers = wait_for(lambda: _login(tmp_path / "demo.out", base), timeout=START_S,
                           interval=0.5, what="the demo's console login")
        received: list[bytes] = []
        stream = threading.Thread(target=_hold_stream, daemon=True, args=(
            f"{base}/api/console/events", headers, received))
        stream.start()
        wait_for(lambda: b"event: overview" in b"".join(received), timeout=30,
                 what="the console stream's first event")
        before_stop = _log_sizes(tmp_path)
        stopped_at = time.monotonic()
        rc = _stop(proc, signal.SIGINT, group=True)
        took = time.monotonic() - stopped_at
        stream.join(timeout=5)
        assert not stream.is_alive(), "the console stream was not ended"
        assert received[-1] != b"<cut>", "the console stream was cut, not ended"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, rc
    assert SUMMARY.search((tmp_path / "demo.out").read_text()), (
        (tmp_path / "demo.out").read_text()[-500:])
    shutdown_log = (tmp_path / "demo.err").read_bytes()[before_stop[tmp_path / "demo.err"]:]
    assert b'"central_stopping"' in shutdown_log and b'"broker_stopped"' in shutdown_log
    # In order: central begins its stop first, the broker everyone uses stops last.
    assert shutdown_log.index(b'"central_stopping"') < shutdown_log.index(b'"broker_stopped"')
    bad = _complaints_since(before_stop)
    assert not bad, "logged during the stop:\n" + "\n".join(bad[:5])
    assert not _leftovers(tmp_path), f"children left running: {_leftovers(tmp_path)}"
    print(f"demo stopped {took:.1f} s after Ctrl-C")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["sigterm", "sighup", "sigkill"])
def test_demo_leaves_no_child_when_only_the_demo_gets_a_signal(tmp_path: Path,
                                                                  sig: signal.Signals) -> None:
    """The demo process alone gets SIGTERM (a service manager, `kill`) or SIGHUP (its terminal
    window closed): it stops as on Ctrl-C (exit 0, its summary, nothing left); or SIGKILL, which it cannot handle: its children stop on their own within the bound (their parent-death signal) and none is left."""
    proc = _start_demo(tmp_path, free_port())
    try:
        wait_for(lambda: "Console login:" in (tmp_path / "demo.out").read_text(errors="replace"),
                 timeout=START_S, interval=0.5, what="the demo's console login")
        assert len(_leftovers(tmp_path).splitlines()) >= 10, _leftovers(tmp_path)  # it has its fleet
        rc = _stop(proc, sig, group=False)
        if sig != signal.SIGKILL:
            assert rc == 0, rc
            assert SUMMARY.search((tmp_path / "demo.out").read_text())
        wait_for(lambda: not _leftovers(tmp_path), timeout=STOP_BOUND_S, interval=0.5,
                 what="the demo's children to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for line in _leftovers(tmp_path).splitlines():  # never leave them to the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
