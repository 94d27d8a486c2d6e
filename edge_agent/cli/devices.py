"""`edge-agent devices`, `read`, `write` and `alarms`: the technician's view into the running
agent through its control socket (`edge_agent.control.server`).

`devices` and `alarms` still answer when the agent is stopped: `devices` from the config and
the last status snapshot in the outbox, `alarms` read-only from `alarms.db`. `read` and `write`
need the agent, because only it may talk to the devices (it owns the serial ports, and a
second master on a bus would garble both).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edge_agent.alarms.store import read_alarms
from edge_agent.cli.common import (
    ConfigOpt,
    JsonOpt,
    ago,
    err,
    errors,
    fmt_value,
    out,
    print_json,
    state_text,
)
from edge_agent.config.site import AgentConfig, load_config
from edge_agent.control.client import AgentNotRunningError, request

DeviceArg = Annotated[str, typer.Argument(metavar="DEVICE", help="device id from the config",
                                          show_default=False)]


def register(app: typer.Typer) -> None:
    app.command(short_help="Configured devices and their live health.  "
                "e.g. [cyan]edge-agent devices -c site.toml[/cyan]")(devices)
    app.command(short_help="Read a device's points now.  "
                "e.g. [cyan]edge-agent read -c site.toml gas-1 gas_lel[/cyan]")(read)
    app.command(short_help="Write a writable point, with read-back.  "
                "e.g. [cyan]edge-agent write -c site.toml gas-1 sample_interval_s 5[/cyan]")(write)
    app.command(short_help="Active alarms on this gateway.  "
                "e.g. [cyan]edge-agent alarms -c site.toml[/cyan]")(alarms)


def _config(path: Any) -> AgentConfig:
    with errors():
        return load_config(path, check_profiles=False)


def _from_agent(cfg: AgentConfig, what: str, saved: Callable[[], list[dict[str, Any]]], *,
                stopped: str, as_json: bool) -> tuple[list[dict[str, Any]], str]:
    """The agent's answer to `what` and `"agent"`; when it is stopped, `saved()` and `stopped`
    (where they came from). With `as_json` they are printed as `{"source": ..., what: rows}`."""
    with errors():
        try:
            rows, source = request(cfg.control_socket_path, what, timeout=10.0)[what], "agent"
        except AgentNotRunningError:
            rows, source = saved(), stopped
    if as_json:
        print_json({"source": source, what: rows})
    return rows, source


# --- devices --------------------------------------------------------------------------------


def devices(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """List the configured devices with their live health and RTU bus counters (from the
    running agent; from the config and the last status snapshot when it is stopped).

    Example: edge-agent devices --config /etc/fieldlink/site.toml --json
    """
    cfg = _config(config)
    rows, source = _from_agent(cfg, "devices", lambda: _offline_rows(cfg), stopped="config",
                               as_json=as_json)
    if as_json:
        return
    if source != "agent":
        err.print("[yellow]the agent is not running[/yellow]: health from its last status "
                  "snapshot")
    _print_devices(rows)


def _offline_rows(cfg: AgentConfig) -> list[dict[str, Any]]:
    """The configured devices with the health the agent last wrote into the outbox."""
    from edge_agent.outbox.store import OutboxError, read_status

    last: dict[str, Any] = {}
    try:
        snapshot = json.loads(read_status(cfg.outbox_path).meta.get("agent_status") or "{}")
        last = {d["device"]: d for d in snapshot.get("devices", [])}
    except (OutboxError, ValueError, KeyError, TypeError):
        pass
    rows = []
    for dev in cfg.devices:
        t = dev.transport
        health = last.get(dev.id) or {"device": dev.id,
                                      "state": "unknown" if dev.enabled else "disabled"}
        rows.append({"id": dev.id, "profile": dev.profile, "kind": t.kind,
                     "endpoint": t.endpoint, "unit": None if t.kind == "hj212" else dev.device_id,
                     "enabled": dev.enabled, "interval_s": dev.poll_interval_s,
                     "health": health})
    return rows


def _print_devices(rows: list[dict[str, Any]]) -> None:
    t = Table("device", "profile", "link", "unit", "state", "cycles", "timeouts", "last ok",
              "bus req/resp", "crc", "wrong answers", "last error")
    for row in rows:
        h = row.get("health") or {}
        bus = h.get("bus")
        t.add_row(row["id"], row["profile"], escape(row["endpoint"]),
                  "" if row.get("unit") is None else str(row["unit"]),
                  state_text(str(h.get("state", "?"))), str(h.get("cycles", "")),
                  str(h.get("timeouts", "")), ago(h.get("last_ok_ms"), short=True),
                  f"{bus['requests']}/{bus['responses']}" if bus else "",
                  str(bus["crc_errors"]) if bus else "", framing_text(bus),
                  escape(h.get("last_error") or ""))
    out.print(t)


def framing_text(bus: dict[str, Any] | None) -> str:
    """An RTU bus's framing errors with their reasons: `2 (wrong_unit 1, short_frame 1)`."""
    if not bus:
        return ""
    reasons = bus.get("framing_reasons") or {}
    detail = ", ".join(f"{k} {v}" for k, v in reasons.items())
    return f"{bus['framing_errors']} ({detail})" if detail else str(bus["framing_errors"])


# --- read -------------------------------------------------------------------------------------


def read(
    config: ConfigOpt,
    device: DeviceArg,
    point: Annotated[str | None, typer.Argument(metavar="[POINT]",
                                                help="point key; all points when left out",
                                                show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Read a device's points (or one point) now, through the running agent: the request
    waits its turn behind the poller on the device's link.

    Example: edge-agent read --config /etc/fieldlink/site.toml gas-1 gas_lel
    """
    cfg = _config(config)
    fields: dict[str, Any] = {"device": device}
    if point is not None:
        fields["point"] = point
    with errors():
        reply = request(cfg.control_socket_path, "read", **fields)
    if as_json:
        print_json(reply)
        return
    t = Table("point", "名称", "value", "rw", "error", title=f"{device}  {ago(reply['ts_ms'])}")
    for row in reply["points"]:
        t.add_row(row["key"], row["name_zh"], fmt_value(row["value"], row["unit"]),
                  "w" if row["writable"] else "", f"[red]{escape(row['error'])}[/red]"
                  if row.get("error") else "")
    out.print(t)


# --- write ------------------------------------------------------------------------------------


def write(
    config: ConfigOpt,
    device: DeviceArg,
    point: Annotated[str, typer.Argument(metavar="POINT", help="a writable point's key",
                                         show_default=False)],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="new value (bools: 1/0, on/off)",
                                         show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write one writable point through the running agent, read it back and compare. Asks
    first, showing the current value and the new one (--yes skips the question).

    Example: edge-agent write --config /etc/fieldlink/site.toml gas-1 sample_interval_s 5
    """
    cfg = _config(config)
    path = cfg.control_socket_path
    with errors():
        # A dry run checks device, point, writability and value, and reads the current value.
        check = request(path, "write", device=device, point=point, value=value, dry_run=True)
    unit = check.get("unit") or ""
    current = (fmt_value(check["current"], unit) if check.get("current_error") is None
               else f"unknown ({check['current_error']})")
    if not yes:
        question = (f"Write {device}/{point} ({check.get('name_zh', '')}): {current} → "
                    f"{fmt_value(check['value'], unit)}?")
        if not typer.confirm(  # not click: typer no longer depends on it
                question, default=False, err=True):
            err.print("not written")
            raise typer.Exit(1)
    with errors():
        reply = request(path, "write", device=device, point=point, value=value)
    if as_json:
        print_json({"device": device, "point": point, "previous": check.get("current"),
                    "value": reply["value"], "readback": reply["readback"]})
        return
    out.print(f"[green]written[/green] {device}/{point}: {current} → "
              f"{fmt_value(reply['value'], unit)}; read back "
              f"[bold]{fmt_value(reply['readback'], unit)}[/bold]")


# --- alarms -----------------------------------------------------------------------------------


def alarms(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Active alarms: from the running agent, or read-only from alarms.db when it is stopped.

    Example: edge-agent alarms --config /etc/fieldlink/site.toml --json
    """
    cfg = _config(config)
    rows, source = _from_agent(
        cfg, "alarms", lambda: [_snapshot_dict(s) for s in read_alarms(cfg.alarms_path)],
        stopped="alarms.db", as_json=as_json)
    if as_json:
        return
    if source != "agent":
        err.print(f"[yellow]the agent is not running[/yellow]: last saved state from "
                  f"{cfg.alarms_path}")
    if not rows:
        out.print("[green]no active alarm[/green]")
        return
    t = Table("point", "rule", "level", "value", "threshold", "since")
    for a in rows:
        colour = "red" if a["level"] >= 2 else "yellow"
        t.add_row(a["point"], a["rule"], f"[{colour}]{a['level']}[/{colour}]",
                  fmt_value(a["value"]), fmt_value(a["threshold"]),
                  ago(a.get("since_ms") or a.get("changed_ms")))
    out.print(t)


def _snapshot_dict(s: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(s), default=str))


__all__ = ["register"]
