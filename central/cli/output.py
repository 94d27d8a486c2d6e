"""How every `central` command prints for people: times in the duty room's zone, and text
that is never read as rich markup.

rich reads `[word]` as a style tag and drops it, so text that comes from users, settings or
central (`[central]`, a name, a comment, a JSON detail) goes out through `say`, `error` and
`table`, which print it as it is. Only our own fixed labels use markup.

Times: the console and the API read and show the duty room's wall clock (Asia/Shanghai,
`central.web.times.DUTY_ZONE`), not the zone of the machine the CLI runs on (UTC on a server),
so an operator reading `08:00` in the CLI and in the console means the same moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from central.web.times import DUTY_ZONE


def when(ms: int | float | None, *, short: bool = False) -> str:
    """Epoch ms as the duty room's time, to the second ('-' for none): `2026-12-07 08:00:00
    +08:00`, or `12-07 08:00:00` in tables (`short`, without the year and the zone)."""
    if ms is None:
        return "-"
    t = datetime.fromtimestamp(ms / 1000, DUTY_ZONE)
    return t.strftime("%m-%d %H:%M:%S") if short else t.isoformat(sep=" ", timespec="seconds")


def say(console: Console, text: str) -> None:
    """Print `text` exactly (no markup, no highlighting)."""
    console.print(text, markup=False, highlight=False)


def error(console: Console, what: object, label: str = "error") -> None:
    """`error: WHAT` in red, `what` printed as it is."""
    color = "yellow" if label == "warning" else "red"
    console.print(f"[{color}]{label}:[/{color}] {escape(str(what))}", highlight=False)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
          keep_first: bool = False) -> Table:
    """A rich table whose cells are shown as they are (None as '-'); with `keep_first`, the
    first column (the id others copy into the next command) is never cut."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    t = Table(title=title, show_lines=False)
    for n, name in enumerate(columns):
        if n == 0 and keep_first:
            t.add_column(name, no_wrap=True,
                         min_width=max([len(name), *(len(row[0]) for row in cells)]))
        else:
            t.add_column(name)
    for row in cells:
        t.add_row(*(Text(c) for c in row))
    return t
