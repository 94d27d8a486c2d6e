"""`edge-agent`: the technician's command line (typer + rich).

A library first and a CLI on top: every command calls the package's functions and turns our
own exceptions into one red line and exit status 1 (2 is a usage error, from click). Read
commands take `--json` for scripts. The commands that talk to the running agent (`devices`,
`read`, `write`, `alarms`) live in `cli_devices`, the commissioning ones (`scan`, `doctor`)
in `cli_field`, the outbox ones (`buffer watch`, `clock ok`) in `cli_buffer`, `status` in
`cli_status` (its 叫应 terminals in `cli_terminals`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from device_profiles import (
    DeviceProfileError,
    Profile,
    ProfilePoint,
    find_profile,
    load_profile,
)
from edge_agent import __version__
from edge_agent.cli.buffer import buffer_app, clock_app
from edge_agent.cli.common import CONTEXT, ConfigOpt, JsonOpt, err, errors, out, print_json
from edge_agent.cli.devices import register as register_device_commands
from edge_agent.cli.enrol import register as register_enrol_commands
from edge_agent.cli.field import register as register_field_commands
from edge_agent.cli.status import _ack_counters  # noqa: F401  (tests/test_pki_broker.py)
from edge_agent.cli.status import register as register_status_commands
from edge_agent.config.site import load_config
from runtime.logs import LEVELS

EXAMPLES = """\
[bold]Examples[/bold]

  edge-agent run --config /etc/fieldlink/site.toml
  edge-agent status --config /etc/fieldlink/site.toml --json
  edge-agent devices --config /etc/fieldlink/site.toml
  edge-agent read --config /etc/fieldlink/site.toml gas-1 gas_lel
  edge-agent write --config /etc/fieldlink/site.toml gas-1 sample_interval_s 5
  edge-agent alarms --config /etc/fieldlink/site.toml
  edge-agent scan --port /dev/ttyUSB0 --baud 9600 --ids 1-32
  edge-agent doctor --config /etc/fieldlink/site.toml
  edge-agent buffer watch --config /etc/fieldlink/site.toml
  edge-agent clock ok --config /etc/fieldlink/site.toml
  edge-agent config check /etc/fieldlink/site.toml
  edge-agent profiles validate /etc/fieldlink/profiles
  edge-agent profiles show gas-detector-v1 --json
"""

app = typer.Typer(name="edge-agent", help="Fieldlink edge agent: polls field devices, buffers "
                  "readings in SQLite and syncs them to central over MQTT.",
                  epilog=EXAMPLES, context_settings=CONTEXT, rich_markup_mode="rich",
                  no_args_is_help=True, add_completion=False)
profiles_app = typer.Typer(help="Validate and inspect device profiles.  "
                           "e.g. [cyan]edge-agent profiles validate profiles/[/cyan]",
                           context_settings=CONTEXT, no_args_is_help=True,
                           rich_markup_mode="rich")
config_app = typer.Typer(help="Check the gateway config file.  "
                         "e.g. [cyan]edge-agent config check site.toml[/cyan]",
                         context_settings=CONTEXT, no_args_is_help=True,
                         rich_markup_mode="rich")
app.add_typer(profiles_app, name="profiles")
app.add_typer(config_app, name="config")
app.add_typer(buffer_app, name="buffer")
app.add_typer(clock_app, name="clock")
_errors = errors
_print_json = print_json


def _version(value: bool) -> None:
    if value:
        out.print(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    pass


# --- run ------------------------------------------------------------------------------------


@app.command(short_help="Run the agent in the foreground.  "
             "e.g. [cyan]edge-agent run -c /etc/fieldlink/site.toml[/cyan]")
def run(
    config: ConfigOpt,
    log_level: Annotated[str, typer.Option(help=f"one of {', '.join(LEVELS)}")] = "info",
    log_json: Annotated[bool | None, typer.Option(
        "--log-json/--log-pretty", help="log format (default: JSON unless stderr is a terminal)",
        show_default=False)] = None,
) -> None:
    """Run the agent in the foreground until SIGTERM or Ctrl-C (systemd runs this).

    Example: edge-agent run --config /etc/fieldlink/site.toml
    """
    from edge_agent.agent import run_agent
    from runtime.logs import configure_logging

    if log_level.lower() not in LEVELS:
        raise typer.BadParameter(f"one of {', '.join(LEVELS)}", param_hint="--log-level")
    from edge_agent.config.trial import load_or_roll_back, run_with_trials

    with _errors():
        cfg = load_or_roll_back(config)  # a remote config in trial that does not load: undone
        configure_logging("edge-agent", level=log_level.lower(), json=log_json)
        asyncio.run(run_with_trials(cfg, run_agent))


# status (cli_status), here so that `-h` lists it after `run`
register_status_commands(app)


# --- profiles -------------------------------------------------------------------------------


@profiles_app.command("validate")
def profiles_validate(
    paths: Annotated[list[Path], typer.Argument(help="profile files or folders of *.yaml",
                                                show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Validate profile files (folders: every *.yaml / *.yml); exit 1 if any fails.

    Example: edge-agent profiles validate /etc/fieldlink/profiles tank.yaml
    """
    files: list[Path] = []
    problems: list[dict[str, Any]] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                problems.append({"file": str(path), "ok": False,
                                 "error": f"{path}: no *.yaml or *.yml files"})
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append({"file": str(path), "ok": False,
                             "error": f"{path}: no such file or folder"})
    results: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for file in files:
        try:
            profile = load_profile(file)
        except DeviceProfileError as exc:
            results.append({"file": str(file), "ok": False, "error": str(exc)})
            continue
        if profile.id in seen:
            results.append({"file": str(file), "ok": False, "id": profile.id,
                            "error": f"{file}: id: profile {profile.id!r} is also defined in "
                                     f"{seen[profile.id]}"})
            continue
        seen[profile.id] = file
        results.append({"file": str(file), "ok": True, "id": profile.id, "hash": profile.hash,
                        "points": len(profile.points)})
    results.extend(problems)
    failed = [r for r in results if not r["ok"]]
    if as_json:
        _print_json({"ok": not failed, "results": results})
    else:
        for r in results:
            if r["ok"]:
                out.print(f"[green]OK[/green]   {r['id']:<24} {r['points']:>3} points  "
                          f"{r['hash'][:12]}  {escape(r['file'])}")
            else:
                err.print(f"[red]FAIL[/red] {escape(r['error'])}")
    if failed:
        raise typer.Exit(1)


@profiles_app.command("show")
def profiles_show(
    profile_id: Annotated[str, typer.Argument(metavar="ID", help="profile id or a .yaml path")],
    dirs: Annotated[list[Path] | None, typer.Option(
        "--dir", "-d", help="extra profile folder, searched before the built-in one")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one profile's points, types, addresses, poll tiers and alarm thresholds.

    Example: edge-agent profiles show storage-tank-v1 --dir /etc/fieldlink/profiles
    """
    with _errors():
        profile = find_profile(profile_id, extra_dirs=tuple(dirs or ()))
    if as_json:
        _print_json(profile_to_jsonable(profile))
        return
    out.print(f"[bold]{profile.id}[/bold]  {escape(profile.model)}  {profile.name_zh}  "
              f"{profile.protocol}  hash {profile.hash[:12]}")
    if profile.protocol == "hj212":
        # A station pushes factors; its points have no register, function or scaling.
        t = Table("key", "名称", "unit", "factor", "alarm (L2 L1 H1 H2)")
        for p in profile.points:
            t.add_row(p.key, p.name_zh, escape(p.unit), p.factor or "", _alarm_text(p))
        out.print(t)
        return
    t = Table("key", "名称", "unit", "fn", "addr", "type", "scale", "poll", "rw",
              "alarm (L2 L1 H1 H2)")
    for p in profile.points:
        s = p.spec
        t.add_row(p.key, p.name_zh, escape(p.unit), str(s.function), str(s.address),
                  str(s.dtype), "" if not s.scaled else f"×{s.scale:g}+{s.offset:g}", p.poll,
                  "w" if p.writable else "", _alarm_text(p))
    out.print(t)


def _alarm_text(p: ProfilePoint) -> str:
    if p.alarm is None:
        return ""
    return " ".join(f"{k[0].upper()}{k[-1]} {getattr(p.alarm, k):g}"
                    for k in ("low2", "low1", "high1", "high2") if getattr(p.alarm, k) is not None)


def profile_to_jsonable(profile: Profile) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    for p in profile.points:
        point: dict[str, Any] = {"key": p.key, "name": p.name, "name_zh": p.name_zh,
                                 "unit": p.unit}
        if p.modbus is not None:
            s = p.modbus
            point |= {"function": s.function, "address": s.address, "type": str(s.dtype),
                      "byte_order": str(s.byte_order), "word_order": str(s.word_order),
                      "scale": s.scale, "offset": s.offset, "bit": s.bit}
        else:
            point["factor"] = p.factor
        point |= {"poll": p.poll, "writable": p.writable,
                  "alarm": None if p.alarm is None else {
                      k: getattr(p.alarm, k) for k in ("high1", "high2", "low1", "low2",
                                                       "hysteresis")}}
        points.append(point)
    return {"id": profile.id, "model": profile.model, "name_zh": profile.name_zh,
            "protocol": profile.protocol, "hash": profile.hash, "points": points}


# --- config ---------------------------------------------------------------------------------


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="the gateway's TOML config")],
    as_json: JsonOpt = False,
) -> None:
    """Validate a config file and the profiles it names; errors give file:line field.

    Example: edge-agent config check /etc/fieldlink/site.toml
    """
    from edge_agent.config.site import loose_key_files

    with _errors():
        cfg = load_config(path)
    for name, key, mode in loose_key_files(cfg):
        err.print(f"[yellow]warning:[/yellow] {escape(name)} {escape(str(key))} is mode "
                  f"{mode:04o}: group or others may read this key (chmod 600)")
    if as_json:
        _print_json(cfg.public_dump())  # secrets as "***"
        return
    enabled = sum(1 for d in cfg.devices if d.enabled)
    out.print(f"[green]OK[/green] {escape(str(path))}: gateway {cfg.gateway.id}, "
              f"{len(cfg.devices)} device(s) ({enabled} enabled), broker "
              f"{cfg.mqtt.host}:{cfg.mqtt.port}, outbox {cfg.outbox_path}")


# devices, read, write, alarms (cli_devices); scan, doctor (cli_field)
register_device_commands(app)
register_field_commands(app)
register_enrol_commands(app)  # enroll, renew (cli_enrol; DESIGN.md §8)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from runtime.logs import configure_logging

    # Library logs (the serial bus opening for `scan`, aiomqtt for `doctor`) go to stderr and
    # only from warnings up, so stdout stays the command's output (and valid --json). `run`
    # configures its own: structlog caches loggers, so it must be configured once only.
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["run"]:
        configure_logging("edge-agent", level="warning", json=False)
    cmd: Callable[..., Any] = typer.main.get_command(app)
    cmd(args=argv, prog_name="edge-agent")


if __name__ == "__main__":  # pragma: no cover
    main()
