"""`edge-agent run` without the technician's CLI: the daemon's lean entry.

systemd starts `edge-agent run --config FILE` and the process then lives for months, so what
it imports stays resident. typer, click and rich (the interactive commands' tables, help and
colours) cost a gateway several MB for nothing once it runs, and structlog imports rich for
pretty tracebacks if it can. A plain `run` command line is therefore parsed here, with the
standard library only; anything else (`--help`, a typo, an unknown option, a missing default
config) goes to the typer app, so its help and its usage errors stay the same.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Kept equal to the typer options of `edge_agent.cli.app.run` (tests/test_edge_cli.py checks).
LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_CONFIG = Path("/etc/fieldlink/site.toml")
_VALUED = {"--config": "config", "-c": "config", "--log-level": "log_level"}
_FLAGS = {"--log-json": True, "--log-pretty": False}


@dataclass(frozen=True)
class RunArgs:
    config: Path
    log_level: str = "info"
    log_json: bool | None = None


def parse_run(args: list[str]) -> RunArgs | None:
    """The options of a plain `run` command line, or None for the typer app to handle."""
    if args[:1] != ["run"]:
        return None
    values: dict[str, str] = {}
    log_json: bool | None = None
    rest = args[1:]
    while rest:
        arg, rest = rest[0], rest[1:]
        name, eq, inline = arg.partition("=")
        if arg in _FLAGS:
            log_json = _FLAGS[arg]
        elif eq and name.startswith("--") and name in _VALUED:
            values[_VALUED[name]] = inline
        elif arg in _VALUED and rest and not rest[0].startswith("-"):
            values[_VALUED[arg]], rest = rest[0], rest[1:]
        else:
            return None  # --help, -cFILE, a typo: click's business
    config = Path(values.get("config") or os.environ.get("FIELDLINK_CONFIG") or DEFAULT_CONFIG)
    level = values.get("log_level", "info")
    if level.lower() not in LEVELS or (config == DEFAULT_CONFIG and not config.exists()):
        return None  # typer's usage error says why
    return RunArgs(config=config, log_level=level.lower(), log_json=log_json)


def daemon_imports(*, json: bool) -> tuple[Any, Any, Any, Any]:
    """Import what `run` needs: (run_agent, load_or_roll_back, run_with_trials,
    configure_logging). With JSON logs, rich stays unloaded: structlog uses it only to
    pretty-print tracebacks on a terminal and to render locals in JSON ones, where it falls
    back to repr (~3.5 MB a daemon keeps for nothing)."""
    if json:
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from edge_agent.agent import run_agent
    from edge_agent.config.trial import load_or_roll_back, run_with_trials
    from runtime.logs import configure_logging

    return run_agent, load_or_roll_back, run_with_trials, configure_logging


def run(args: RunArgs) -> None:
    """What `edge-agent run` does, with its exits: our errors as one red line and status 1,
    Ctrl-C as click's `Aborted!` and status 1."""
    json = args.log_json if args.log_json is not None else not sys.stderr.isatty()
    try:
        run_agent, load_or_roll_back, run_with_trials, configure_logging = daemon_imports(json=json)
        cfg = load_or_roll_back(args.config)  # a remote config in trial that does not load: undone
        configure_logging("edge-agent", level=args.log_level, json=args.log_json)
        asyncio.run(run_with_trials(cfg, run_agent))
    except (KeyboardInterrupt, EOFError):
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        _exit_if_ours(exc)
        raise


def _exit_if_ours(exc: Exception) -> None:
    """Our own errors print as the typer app prints them (rich markup: loaded only now)."""
    if sys.modules.get("rich", False) is None:
        del sys.modules["rich"]  # undo the block above: the message is rich markup
    from edge_agent.cli.common import OUR_ERRORS

    if isinstance(exc, OUR_ERRORS):
        from rich.markup import escape

        from edge_agent.cli.common import err

        message = str(exc)
        for line in message.splitlines() or [message]:
            err.print(f"[red]error:[/red] {escape(line)}")
        sys.exit(1)


__all__ = ["RunArgs", "daemon_imports", "parse_run", "run"]
