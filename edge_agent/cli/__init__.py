"""`edge-agent`, the technician's command line (typer + rich): `app` is the entry point, one
module per group of commands; `daemon` runs a plain `edge-agent run` without loading them."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: `run` straight to the daemon, the rest to the typer app."""
    from edge_agent.cli.daemon import parse_run, run

    plain_run = parse_run(list(sys.argv[1:] if argv is None else argv))
    if plain_run is not None:
        run(plain_run)
        return
    from edge_agent.cli.app import main as cli_main

    cli_main(argv)


__all__ = ["main"]
