"""`edge-agent status`: the outbox backlog, the uplink, the devices, the RTU buses and the
叫应 terminals, read-only, from the outbox file and (while the agent runs) its control socket."""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edge_agent.cli.buffer import outbox_report, print_outbox
from edge_agent.cli.common import (
    CERTIFICATE_HINT,
    REFUSED_HINT,
    ConfigOpt,
    JsonOpt,
    ago,
    err,
    errors,
    fail,
    fmt_bytes,
    out,
    print_json,
    state_text,
)
from edge_agent.cli.devices import framing_text
from edge_agent.cli.disk import disk_markup, disk_report, disk_text
from edge_agent.cli.terminals import print_terminals, terminals_report
from edge_agent.config.site import AgentConfig, load_config
from runtime.clock import now_ms


def register(app: typer.Typer) -> None:
    app.command(short_help="Backlog, uplink, device and 叫应 terminal health, read-only.  "
                "e.g. [cyan]edge-agent status -c site.toml --json[/cyan]")(status)


def status(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Show the outbox backlog, the uplink, device and 叫应 terminal health, read-only (daemon
    up or not). While the agent runs, device health, the RTU bus counters and the terminals'
    links come live from its socket; without it, the terminals' open faults and answers come
    from terminals.db.
    The disk line says "disk full" (with the numbers) when the outbox's file system is.

    Example: edge-agent status --config /etc/fieldlink/site.toml --json
    """
    from edge_agent.outbox.store import OutboxError, read_status

    with errors():
        cfg = load_config(config, check_profiles=False)
    live = _live_status(cfg)
    disk = disk_report(cfg, (live or {}).get("disk"))
    try:
        stats = read_status(cfg.outbox_path, live_window_s=cfg.outbox.live_window_s)
    except OutboxError as exc:
        if disk["state"] != "disk full":
            fail(str(exc))
        # Too full even to open the file read-only (no room for its -shm): say so, and why.
        err.print(f"[red]disk full:[/red] cannot read {escape(str(cfg.outbox_path))}: "
                  f"{escape(str(exc))}")
        if as_json:
            print_json({"gateway": cfg.gateway.id, "disk": disk, "error": str(exc)})
        else:
            out.print(disk_text(disk))
        raise typer.Exit(1) from exc
    report = _status_report(cfg, stats.to_jsonable()) | outbox_report(stats)
    report["disk"] = disk
    report["live"] = live is not None
    report["terminals"] = terminals_report(cfg, live)
    if live is not None:
        report["agent"]["running"] = True
        report["devices"] = live.get("devices", report["devices"])
        report["buses"] = live.get("buses", [])
        report["alarms_active"] = live.get("alarms_active")
        report["narrowband"] = live.get("narrowband", report["narrowband"])
        report["uplink"] |= _ack_counters({}, live)
        report["uplink"]["refused"] = (live.get("uplink") or {}).get("refused")
    if as_json:
        print_json(report)
        return
    _print_status(report)


def _live_status(cfg: AgentConfig) -> dict[str, Any] | None:
    """The running agent's own status over its socket, or None when it does not answer."""
    from edge_agent.control.client import ControlClientError, request

    try:
        return request(cfg.control_socket_path, "status", timeout=5.0)
    except ControlClientError:
        return None


def _status_report(cfg: AgentConfig, stats: dict[str, Any]) -> dict[str, Any]:
    now = now_ms()
    meta: dict[str, str] = dict(stats.get("meta") or {})
    agent: dict[str, Any] | None = None
    if "agent_status" in meta:
        try:
            agent = json.loads(meta.pop("agent_status"))
        except ValueError:
            agent = None
    oldest = stats.get("oldest_undelivered_ts_ms")

    def ms(key: str) -> int | None:
        value = meta.get(key, "")
        return int(value) if value.lstrip("-").isdigit() else None

    running = False
    if agent and not agent.get("stopped_ms"):
        fresh = now - int(agent.get("updated_ms", 0)) <= 3_000 * cfg.status.interval_s + 2_000
        running = fresh and _pid_alive(agent.get("pid"))
    return {
        "gateway": cfg.gateway.id,
        "outbox": str(cfg.outbox_path),
        "stream": stats.get("stream"),
        "backlog": stats.get("backlog"),
        "backlog_by_kind": stats.get("backlog_by_kind"),
        "oldest_unsent_ts_ms": oldest,
        "oldest_unsent_age_s": round((now - oldest) / 1000, 1) if oldest else None,
        "last_seq": stats.get("last_seq"),
        "delivered_total": stats.get("delivered_total"),
        "db_bytes": stats.get("db_bytes"),
        "agent": {"running": running,
                  **({k: agent.get(k) for k in ("pid", "boot_id", "version", "started_ms",
                                                 "updated_ms", "stopped_ms")} if agent else {})},
        "uplink": {"state": meta.get("uplink_state", "unknown"),
                   "since_ms": ms("uplink_since_ms"), "last_ack_ms": ms("last_ack_ms"),
                   # why the broker refused the last attempt (our certificate, a CONNACK)
                   "refused": _refused(meta.get("uplink_refused")),
                   # acks naming records this uplink never sent: ignored, counted (§8)
                   **_ack_counters(meta, agent)},
        "devices": (agent or {}).get("devices", []),
        "narrowband": (agent or {}).get("narrowband"),
        "meta": meta,
    }


def _ack_counters(meta: dict[str, str], agent: dict[str, Any] | None) -> dict[str, int]:
    """The uplink's ack screening counters: from the running agent, else its last meta."""
    keys = ("acks_refused", "ack_records_unsent", "ack_records_duplicate")
    live = (agent or {}).get("uplink") or {}
    try:
        saved = json.loads(meta.get("uplink_acks", "{}"))
    except ValueError:
        saved = {}
    src = live if "acks_refused" in live else saved if isinstance(saved, dict) else {}
    return {k: int(src.get(k, 0)) for k in keys}


def _refused(text: str | None) -> dict[str, str] | None:
    """The uplink's last refusal as it kept it (`Uplink.refused`), or None."""
    try:
        refused = json.loads(text or "null")
    except ValueError:
        return None
    return refused if isinstance(refused, dict) else None


def _narrowband_line(nb: dict[str, Any]) -> str:
    """`active on beidou /dev/ttyUSB1: 3 alarm(s), 1 heartbeat(s) sent, refused interval 2`."""
    c = nb.get("counters") or {}
    state = "[red]active[/red]" if nb.get("active") else "[green]idle[/green] (IP is up)"
    refused = ", ".join(f"{k} {v}" for k, v in (c.get("refusals") or {}).items())
    line = (f"{state} on {nb.get('bearer')} {escape(str(nb.get('port')))}: "
            f"{c.get('alarms_sent', 0)} alarm(s), {c.get('heartbeats_sent', 0)} heartbeat(s) sent"
            + (f", refused {refused}" if refused else ""))
    if nb.get("last_error"):
        line += f", last error: {escape(str(nb['last_error']))}"
    return line


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user (the service account)
    return True


def _print_status(r: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None, padding=(0, 2))
    agent = r["agent"]
    t.add_row("gateway", r["gateway"])
    running = "[green]running[/green]" if agent["running"] else "[yellow]not running[/yellow]"
    pid = f"  pid {agent['pid']}, boot {agent.get('boot_id', '')[:8]}" if agent.get("pid") else ""
    t.add_row("agent", running + pid)
    t.add_row("outbox", f"{r['outbox']}  ({fmt_bytes(r['db_bytes'])}, stream {r['stream']})")
    t.add_row("backlog", f"{r['backlog']} record(s) " + ", ".join(
        f"{k} {v}" for k, v in (r["backlog_by_kind"] or {}).items()))
    t.add_row("oldest unsent", ago(r["oldest_unsent_ts_ms"]))
    t.add_row("last seq", str(r["last_seq"]))
    t.add_row("delivered", str(r["delivered_total"]))
    up = r["uplink"]
    colour = {"connected": "green", "disconnected": "red"}.get(up["state"], "yellow")
    t.add_row("uplink", f"[{colour}]{up['state']}[/{colour}] since {ago(up['since_ms'])}")
    if (refused := up.get("refused")) and up["state"] != "connected":
        hint = CERTIFICATE_HINT if refused.get("cause") == "certificate" else REFUSED_HINT
        t.add_row("refused", f"[red]{escape(str(refused.get('error')))}[/red]; {escape(hint)}")
    t.add_row("last ack", ago(up["last_ack_ms"]))
    if up.get("acks_refused"):
        t.add_row("acks refused", f"[red]{up['acks_refused']}[/red] ack(s) named "
                  f"{up['ack_records_unsent']} record(s) never sent: ignored (forged?)")
    if nb := r.get("narrowband"):
        t.add_row("narrowband", _narrowband_line(nb))
    print_outbox(t, r)
    if "disk" in r:
        t.add_row("disk", disk_markup(r["disk"]))
    out.print(t)
    if r["devices"]:
        d = Table("device", "state", "cycles", "timeouts", "exc", "decode err",
                  "last ok", "last error")
        for dev in r["devices"]:
            d.add_row(dev["device"], state_text(dev["state"]), str(dev["cycles"]),
                      str(dev["timeouts"]), str(dev["exceptions"]), str(dev["decode_errors"]),
                      ago(dev.get("last_ok_ms"), short=True), escape(dev.get("last_error") or ""))
        out.print(d)
    buses = [dev for dev in r["devices"] if dev.get("bus")]
    if buses:
        b = Table("device", "bus", "unit", "requests", "responses", "timeouts", "crc err",
                  "framing err", "exceptions", title="RTU bus counters")
        for dev in buses:
            c = dev["bus"]
            b.add_row(dev["device"], escape(dev.get("endpoint", "")), str(c["device_id"]),
                      str(c["requests"]), str(c["responses"]), str(c["timeouts"]),
                      str(c["crc_errors"]), framing_text(c),
                      ", ".join(f"code {k}: {v}" for k, v in c["exceptions"].items()) or "0")
        out.print(b)
    print_terminals(out, r["terminals"])


__all__ = ["register"]
