"""`edge-agent doctor`: the checks a technician runs on site, each with a hint when it fails.

`run_checks(config_path)` returns one `Check` per item, in the order a person fixes them:
the config, the profiles, the data folder and disk, the outbox file, each serial port, each
Modbus TCP device, the broker, the clock, the running agent and, while it runs, its devices
and its 叫应 terminals (a terminal that is down fails, with since when and what to check).
A check is `pass`, `warn` (worth knowing, not a fault: an unsynchronised clock that is still
plausible) or `fail`; `skip` when an earlier failure makes it meaningless. Nothing here
writes anything but one temporary file in the data folder, and nothing opens a serial port
(the agent may own it): ports are checked with `stat` and `access`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from edge_agent.cli.common import CERTIFICATE_HINT, REFUSED_HINT, fmt_bytes
from edge_agent.cli.disk import disk_report, disk_text
from edge_agent.cli.terminals import terminal_diagnosis, terminals_report
from edge_agent.config.site import (
    AgentConfig,
    ConfigError,
    Hj212TransportConfig,
    RtuTransportConfig,
    TcpTransportConfig,
    load_config,
)
from edge_agent.control.client import ControlClientError, request
from edge_agent.health.clock import BUILD_FLOOR_MS, ntp_synchronized
from edge_agent.outbox.store import OutboxError, read_status

MIN_FREE_BYTES = 200 * 2**20  # below this the outbox soon has to thin and evict
_FREE_HINT = ("free space on that file system (old logs, journal: sudo journalctl "
              "--vacuum-size=50M) or lower [outbox] max_bytes; the agent writes what it holds "
              "and reports what it dropped as soon as there is room")
CONNECT_TIMEOUT_S = 2.0
MQTT_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str = ""
    hint: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "ok": self.status != "fail",
                "detail": self.detail, "hint": self.hint}


def _pass(name: str, detail: str = "") -> Check:
    return Check(name, "pass", detail)


def _fail(name: str, detail: str, hint: str) -> Check:
    return Check(name, "fail", detail, hint)


def run_checks(config_path: Path) -> list[Check]:
    """Every check, in order; never raises for what it checks."""
    checks: list[Check] = []
    try:
        cfg = load_config(config_path, check_profiles=False)
    except ConfigError as exc:
        return [_fail("config valid", str(exc),
                      "fix the named line; `edge-agent config check FILE` checks it again")]
    checks.append(_pass("config valid", f"{config_path}: gateway {cfg.gateway.id}, "
                        f"{len(cfg.devices)} device(s)"))
    checks.append(_profiles(config_path))
    checks.extend(_data_dir(cfg))
    checks.append(_outbox(cfg))
    checks.extend(_serial_ports(cfg))
    checks.extend(_tcp_devices(cfg))
    checks.extend(_key_files(cfg))
    checks.append(_broker(cfg))
    checks.append(_clock(cfg))
    checks.extend(_agent(cfg))
    return checks


# --- files --------------------------------------------------------------------------------------


def _profiles(path: Path) -> Check:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return _fail("profiles load", str(exc), "`edge-agent profiles validate DIR` shows every "
                     "problem of a profile folder; `edge-agent profiles show ID` one profile")
    names = sorted({d.profile for d in cfg.devices})
    return _pass("profiles load", ", ".join(names) or "no device configured")


def _data_dir(cfg: AgentConfig) -> Iterator[Check]:
    data = cfg.gateway.data_dir
    name = "data folder writable"
    existing = data
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if data.exists():
            with tempfile.NamedTemporaryFile(dir=data, prefix=".doctor-"):
                pass
            yield _pass(name, str(data))
        elif os.access(existing, os.W_OK | os.X_OK):
            yield _pass(name, f"{data} (created by the agent on start)")
        else:
            yield _fail(name, f"{data} does not exist and {existing} is not writable",
                        f"sudo install -d -o <agent user> {data}")
            return
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            yield _fail(name, f"{data}: disk full", _FREE_HINT)
            yield _fail("free disk", disk_text(disk_report(cfg, None)), _FREE_HINT)
            return
        yield _fail(name, f"{data}: {exc}", f"give the agent's user the folder: "
                    f"sudo chown -R <agent user> {data}")
        return
    usage = shutil.disk_usage(existing)
    free = f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)}"
    disk = disk_report(cfg, None) if data.exists() else None
    if disk is not None and disk["state"] != "ok":
        yield _fail("free disk", disk_text(disk), _FREE_HINT)
    elif usage.free < MIN_FREE_BYTES:
        yield _fail("free disk", free, _FREE_HINT)
    else:
        yield _pass("free disk", free)


def _outbox(cfg: AgentConfig) -> Check:
    name = "outbox intact"
    path = cfg.outbox_path
    if not path.exists():
        return _pass(name, f"{path} not created yet (the agent creates it on start)")
    hint = (f"stop the agent, move {path} aside (its unsent records go with it) and start "
            "the agent again: it creates a new outbox")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
        st = read_status(path)
    except (sqlite3.Error, OutboxError) as exc:
        return _fail(name, f"{path}: {exc}", hint)
    if rows != ["ok"]:
        return _fail(name, f"{path}: quick_check: {'; '.join(map(str, rows[:3]))}", hint)
    return _pass(name, f"{path}: {st.backlog} unsent, {fmt_bytes(st.db_bytes)}")


# --- links ----------------------------------------------------------------------------------------


def _serial_ports(cfg: AgentConfig) -> Iterator[Check]:
    ports: dict[str, list[str]] = {}
    for dev in cfg.devices:
        if dev.enabled and isinstance(dev.transport, RtuTransportConfig | Hj212TransportConfig):
            ports.setdefault(dev.transport.port, []).append(dev.id)
    for port, devices in ports.items():
        name = f"serial port {port}"
        who = ", ".join(devices)
        try:
            st = os.stat(port)
        except FileNotFoundError:
            yield _fail(name, f"missing (for {who})",
                        "check the cable or USB adapter (ls -l /dev/serial/by-id/, dmesg | tail) "
                        "and the port name in the config")
            continue
        except OSError as exc:
            yield _fail(name, f"{exc} (for {who})", "check the port name in the config")
            continue
        if not stat.S_ISCHR(st.st_mode):
            yield _fail(name, "not a character device", "name the tty in the config, "
                        "e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
            continue
        if not os.access(port, os.R_OK | os.W_OK):
            group = _group_name(st.st_gid)
            yield _fail(name, f"not readable and writable by {_user()} (owner group {group})",
                        f"add the agent's user to group {group}: sudo usermod -aG {group} "
                        f"{_user()} (then log in again or restart the service)")
            continue
        yield _pass(name, f"for {who}")


def _tcp_devices(cfg: AgentConfig) -> Iterator[Check]:
    seen: dict[tuple[str, int], list[str]] = {}
    for dev in cfg.devices:
        if dev.enabled and isinstance(dev.transport, TcpTransportConfig):
            seen.setdefault((dev.transport.host, dev.transport.port), []).append(dev.id)
    for (host, port), devices in seen.items():
        name = f"modbus tcp {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            yield _fail(name, f"{_reason(exc)} (for {', '.join(devices)})",
                        "check the device's power, cable and IP settings (ping it), that "
                        "Modbus TCP is enabled on it and no firewall is in between")
            continue
        yield _pass(name, f"reachable (for {', '.join(devices)})")


def _broker(cfg: AgentConfig) -> Check:
    mq = cfg.mqtt
    name = f"broker {mq.host}:{mq.port}"
    try:
        with socket.create_connection((mq.host, mq.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        return _fail(name, f"TCP: {_reason(exc)}", "check the uplink (ping central, the 4G "
                     "modem's signal and APN), [mqtt] host/port, and the firewall")
    if mq.tls is not None:
        return _tls_broker(cfg, name)
    try:
        asyncio.run(_mqtt_connect(cfg))
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        return _fail(name, f"MQTT CONNECT: {exc}", "the port answers but MQTT does not: "
                     "check [mqtt] port (TLS or plain?) and the broker's access rules")
    return _pass(name, "TCP and MQTT CONNECT ok")


def _key_files(cfg: AgentConfig) -> Iterator[Check]:
    """Secret files readable by group or others (issue 10): a warning with the fix."""
    from edge_agent.config.site import loose_key_files

    for setting, path, mode in loose_key_files(cfg):
        yield Check(f"key file {setting}", "warn", f"{path} is mode {mode:04o}: group or "
                    "others may read it", f"chmod 600 {path}")


def _tls_broker(cfg: AgentConfig, name: str) -> Check:
    """Mutual TLS: the handshake with the gateway's certificate, then a short wait for the
    broker's verdict (TLS 1.3 reports a refused certificate after the handshake). No MQTT
    CONNECT: the broker forces the client id to the CN and would end the agent's session."""
    import ssl

    from edge_agent.uplink.mqtt_config import MqttTlsError, tls_context
    from runtime.mqtt_refusal import CertificateRefusedError, alert_error

    mq = cfg.mqtt
    assert mq.tls is not None
    try:
        ctx = tls_context(mq.tls)
        with socket.create_connection((mq.host, mq.port), timeout=CONNECT_TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=mq.host) as tls:
            tls.settimeout(1.0)
            try:
                tls.recv(1)
            except TimeoutError:
                pass  # silence: the broker waits for our CONNECT, the certificate is accepted
    except MqttTlsError as exc:
        return _fail(name, str(exc), "check [mqtt.tls]; `edge-agent enroll` writes it")
    except ssl.SSLError as exc:
        if isinstance(refusal := alert_error(exc), CertificateRefusedError):
            return _fail(name, str(refusal), CERTIFICATE_HINT)
        return _fail(name, f"TLS: {exc}", REFUSED_HINT)
    except OSError as exc:
        return _fail(name, f"TLS: {exc}", REFUSED_HINT)
    return _pass(name, "TCP and mutual TLS ok (certificate accepted)")


async def _mqtt_connect(cfg: AgentConfig) -> None:
    # Its own client id: the agent's would make the broker drop the agent's session.
    ident = f"fieldlink-doctor-{cfg.gateway.id}-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(MQTT_TIMEOUT_S + 1):
        async with aiomqtt.Client(cfg.mqtt.host, cfg.mqtt.port, identifier=ident,
                                  timeout=MQTT_TIMEOUT_S, keepalive=10,
                                  username=cfg.mqtt.username, password=cfg.mqtt.password,
                                  protocol=aiomqtt.ProtocolVersion.V311):
            pass


# --- clock and agent ------------------------------------------------------------------------------


def _clock(cfg: AgentConfig) -> Check:
    name = "clock"
    now_ms = time.time_ns() // 1_000_000
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now_ms / 1000))
    if now_ms < BUILD_FLOOR_MS:
        return _fail(name, f"{stamp} is before this build was made",
                     "set the time (date -s, or let NTP/BeiDou sync), then `edge-agent clock ok`")
    suspect = None
    with contextlib.suppress(OutboxError):
        if cfg.outbox_path.exists():
            clock = read_status(cfg.outbox_path).clock
            if clock.get("suspect"):
                suspect = str(clock.get("reason"))
    if suspect:
        return _fail(name, f"{stamp}; the agent flags records: clock suspect ({suspect})",
                     "once the time is right: edge-agent clock ok -c CONFIG")
    if not ntp_synchronized():
        return Check(name, "warn", f"{stamp}, not NTP-synchronised",
                     "enable time sync (timedatectl set-ntp true, or chrony) if the gateway "
                     "has a network; otherwise check the time by hand")
    return _pass(name, f"{stamp}, NTP-synchronised")


def _agent(cfg: AgentConfig) -> Iterator[Check]:
    path = cfg.control_socket_path
    try:
        status = request(path, "status", timeout=5.0)
    except ControlClientError as exc:
        yield _fail("agent running", str(exc), "sudo systemctl start fieldlink-edge; "
                    "journalctl -u fieldlink-edge -n 50 shows why it stopped")
        yield from _terminals(cfg, None)
        return
    uplink = status.get("uplink") or {}
    yield _pass("agent running", f"pid {status.get('pid')}, version {status.get('version')}, "
                f"uplink {'connected' if uplink.get('connected') else 'down'}")
    if refused := uplink.get("refused"):  # the agent's own attempts, as `status` shows them
        yield _fail("agent uplink", str(refused.get("error")), CERTIFICATE_HINT
                    if refused.get("cause") == "certificate" else REFUSED_HINT)
    live_disk = status.get("disk")
    if isinstance(live_disk, dict) and (
        live_disk.get("full") or live_disk.get("alarm_states_unsaved")
    ):
        yield _fail("agent disk", disk_text(disk_report(cfg, live_disk)), _FREE_HINT)
    for dev in status.get("devices", []):
        state = dev.get("state")
        name = f"device {dev.get('device')}"
        if state == "offline":
            yield _fail(name, f"offline: {dev.get('last_error')}",
                        "check the device's power and wiring, its address (unit id) and the "
                        "line settings; `edge-agent scan` finds slaves on a stopped bus")
        elif state == "degraded":
            yield Check(name, "warn", f"degraded: {dev.get('last_error')}",
                        "some reads fail: compare the profile's registers with the device's manual")
        else:
            yield _pass(name, str(state))
    yield from _terminals(cfg, status)


def _terminals(cfg: AgentConfig, status: dict[str, Any] | None) -> Iterator[Check]:
    """One line per 叫应 terminal: connected, down (since when, why, what to check), or
    connected with open faults (a warning)."""
    for row in terminals_report(cfg, status)["terminals"]:
        verdict, detail, hint = terminal_diagnosis(row)
        yield Check(f"terminal {row['id']}", verdict, detail, hint)


# --- helpers --------------------------------------------------------------------------------------


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return exc.strerror or str(exc)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


__all__ = ["Check", "run_checks"]
