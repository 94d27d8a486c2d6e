"""`central serve` under systemd's notify protocol (Type=notify, DESIGN.md §10): READY=1 only
once storage is open and MQTT ingest is subscribed, WATCHDOG=1 while it runs, STOPPING=1 and
a clean exit on SIGTERM; the edge agent shares the same code (runtime.systemd)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import Mosquitto, free_port, port_open, python_env, wait_for

pytestmark = pytest.mark.e2e


def _messages(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives within `seconds`."""
    got: list[str] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_central_notifies_ready_after_mqtt_subscribed_pings_and_stops(tmp_path: Path,
                                                                      mosquitto: Mosquitto) -> None:
    """With the broker down central serves HTTP (health 503) but sends no READY=1, only WATCHDOG=1; once the broker is up READY=1 follows; SIGTERM gives STOPPING=1 and exit 0 within 15 s."""
    mosquitto.stop()
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    http_port = free_port()
    env = python_env() | {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "central.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "central", "serve", "--db", f"sqlite:///{tmp_path}/c.db",
         "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mosquitto.port), "--http-port",
         str(http_port), "--log-json"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open("127.0.0.1", http_port), timeout=60, what="central's port")
        assert _health(http_port) == 503  # storage open, MQTT not subscribed
        early = _messages(notify, 2.0)
        assert "WATCHDOG=1" in early
        assert not any(m.startswith("READY=1") for m in early), early

        mosquitto.start()
        seen: list[str] = []

        def ready() -> bool:
            seen.extend(_messages(notify, 0.5))
            return any(m.startswith("READY=1") for m in seen)

        wait_for(ready, timeout=30, what="READY=1 after the broker came up")
        assert _health(http_port) == 200

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        seen.extend(_messages(notify, 0.5))
        assert "STOPPING=1" in seen, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        notify.close()
    assert rc == 0, (tmp_path / "central.log").read_text()[-2000:]
