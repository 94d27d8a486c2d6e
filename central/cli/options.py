"""The typer options that several `central` command groups share, written once so that
`--config`, `--db`, `--json` and `--yes` read and explain themselves the same in every group.

A module of its own, importing nothing of central, because `central.cli` registers the
sub-apps (`central.identity.cli`, `central.identity.pki_cli`) that use these options: were
they in `central/cli/__init__.py`, those sub-apps would import the package that imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file.",
                                                exists=True, dir_okay=False)]
DbOpt = Annotated[str | None, typer.Option(
    "--db", help="Database URL: sqlite:///PATH (sqlite:////ABSOLUTE/PATH) or "
                 "postgresql://USER@HOST/DB.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
