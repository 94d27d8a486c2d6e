"""`edge-agent scan` and `edge-agent doctor`: commissioning a site.

`scan` is a Modbus master of its own and runs only while the agent does not own the port;
`doctor` only looks (see `edge_agent.cli.doctor`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_agent.cli.common import ConfigOpt, JsonOpt, err, errors, fail, out, print_json
from edge_agent.config.site import Hj212TransportConfig, RtuTransportConfig, load_config
from edge_agent.control.client import ControlClientError, request
from edge_agent.field.bus import SerialBus
from edge_agent.field.scan import ProbeResult, ScanError, parse_ids, probe_lock, scan_bus


def register(app: typer.Typer) -> None:
    app.command(short_help="Find Modbus RTU slave ids on a serial bus.  "
                "e.g. [cyan]edge-agent scan --port /dev/ttyUSB0 --baud 9600[/cyan]")(scan)
    app.command(short_help="Check this gateway's setup, with a hint for each problem.  "
                "e.g. [cyan]edge-agent doctor -c site.toml[/cyan]")(doctor)


# --- scan -------------------------------------------------------------------------------------


def scan(
    port: Annotated[str, typer.Option("--port", "-p", help="serial port, e.g. /dev/ttyUSB0",
                                      show_default=False)],
    baud: Annotated[int, typer.Option("--baud", "-b", min=50, max=4_000_000,
                                      help="baud rate")] = 9600,
    parity: Annotated[str, typer.Option(help="N, E or O")] = "N",
    stopbits: Annotated[int, typer.Option(min=1, max=2)] = 1,
    ids: Annotated[str, typer.Option(
        help="ids to probe: ranges and lists, e.g. 1-32,100")] = "1-247",
    timeout: Annotated[float, typer.Option(min=0.02, max=10.0,
                                           help="seconds to wait for each answer")] = 0.2,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="the gateway's config: refuse if its running agent uses the port",
        envvar="FIELDLINK_CONFIG", show_envvar=True)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the Modbus slave ids that answer on a serial bus (function 3, then 4, register 0;
    an exception answer counts as present). Refuses while the agent owns the port.

    Example: edge-agent scan --port /dev/ttyUSB0 --baud 9600 --ids 1-32 --timeout 0.2
    """
    parity = parity.upper()
    if parity not in ("N", "E", "O"):
        raise typer.BadParameter("one of N, E, O", param_hint="--parity")
    try:
        id_list = parse_ids(ids)
    except ScanError as exc:  # a usage error: exit 2, as for any option typer checks
        raise typer.BadParameter(str(exc), param_hint="--ids") from exc
    if config is not None:
        _refuse_if_agent_owns(config, port)
    with errors():
        probe_lock(port)
    with errors():  # the port failing mid-scan (unplugged) ends it with its reason
        results = asyncio.run(_scan(port, baud, parity, stopbits, id_list, timeout, as_json))
    found = [r for r in results if r.present]
    garbled = [r for r in results if r.answer == "garbled"]
    if as_json:
        print_json({"port": port, "baud": baud, "parity": parity, "stopbits": stopbits,
                    "scanned": len(results), "found": [r.device_id for r in found],
                    "garbled": [r.device_id for r in garbled],
                    "results": [r.to_dict() for r in found + garbled]})
        return
    if found:
        t = Table("id", "answer", title=f"{port} at {baud} 8{parity}{stopbits}")
        for r in found:
            t.add_row(str(r.device_id), escape(r.describe()))
        out.print(t)
    out.print(f"found {len(found)} slave(s) among {len(results)} id(s)"
              + (f": {', '.join(str(r.device_id) for r in found)}" if found else ""))
    if garbled:
        ids = ", ".join(str(r.device_id) for r in garbled)
        err.print(f"[yellow]garbled answers[/yellow] from {ids}: "
                  "a slave may be there at another baud rate or parity")


def _refuse_if_agent_owns(config: Path, port: str) -> None:
    with errors():
        cfg = load_config(config, check_profiles=False)
    used = [d.id for d in cfg.devices if d.enabled
            and isinstance(d.transport, RtuTransportConfig | Hj212TransportConfig)
            and Path(d.transport.port).resolve() == Path(port).resolve()]
    if not used:
        return
    try:
        status = request(cfg.control_socket_path, "status", timeout=5.0)
    except ControlClientError:
        return  # not running: the port lock decides
    fail(f"the edge agent (pid {status.get('pid')}) owns {port} for {', '.join(used)}: stop it "
         "first (sudo systemctl stop fieldlink-edge) or use `edge-agent devices` / `read`")


async def _scan(port: str, baud: int, parity: str, stopbits: int, ids: list[int],
                timeout: float, quiet: bool) -> list[ProbeResult]:
    bus = SerialBus(port, baudrate=baud, parity=parity, stopbits=stopbits, timeout_s=timeout,
                    crc_retries=0)
    columns = (TextColumn("[bold]scanning[/bold] {task.fields[port]}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("found: {task.fields[found]}"),
               TimeElapsedColumn())
    found: list[str] = []
    async with bus:
        with Progress(*columns, console=err, transient=True, disable=quiet) as progress:
            task = progress.add_task("scan", total=len(ids), port=port, found="-")

            def step(r: ProbeResult) -> None:
                if r.present:
                    found.append(str(r.device_id))
                progress.update(task, advance=1, found=", ".join(found) or "-")

            return await scan_bus(bus, ids, step)


# --- doctor -----------------------------------------------------------------------------------

_MARK: dict[str, str] = {"pass": "[green]✓[/green]", "fail": "[red]✗[/red]",
                         "warn": "[yellow]![/yellow]", "skip": "[dim]-[/dim]"}


def doctor(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Check the setup: config, profiles, data folder and disk, outbox integrity, serial
    ports, Modbus TCP devices, broker (TCP and MQTT CONNECT), clock, the running agent, its
    devices and its 叫应 terminals. Prints ✓/✗ with a hint for each problem; exit 1 if any
    check fails.

    Example: edge-agent doctor --config /etc/fieldlink/site.toml
    """
    from edge_agent.cli.doctor import run_checks

    checks = run_checks(config)
    failed = [c for c in checks if c.failed]
    if as_json:
        print_json({"ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        for c in checks:
            out.print(f"{_MARK[c.status]} {escape(c.name)}  [dim]{escape(c.detail)}[/dim]")
            if c.hint and c.status != "pass":
                out.print(f"    hint: {escape(c.hint)}")
        out.print(f"[red]{len(failed)} check(s) failed[/red]" if failed
                  else "[green]all checks passed[/green]")
    if failed:
        raise typer.Exit(1)


__all__ = ["register"]
