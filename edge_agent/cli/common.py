"""What every `edge-agent` command module shares: consoles, options, errors, JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from device_profiles import DeviceProfileError
from edge_agent import EdgeError
from protocols.errors import ProtocolError

CONTEXT = {"help_option_names": ["-h", "--help"]}

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# Where the Debian package puts the gateway's config (packaging/README.md): every command finds
# it there when neither -c nor FIELDLINK_CONFIG names another file.
DEFAULT_CONFIG = Path("/etc/fieldlink/site.toml")


def _default_config() -> Path:
    return DEFAULT_CONFIG


def _config_given(value: Path) -> Path:
    if value == DEFAULT_CONFIG and not value.exists():
        raise typer.BadParameter(f"no {DEFAULT_CONFIG}: give --config FILE or set FIELDLINK_CONFIG")
    return value


ConfigOpt = Annotated[Path, typer.Option(
    "--config", "-c", help="the gateway's TOML config (else $FIELDLINK_CONFIG, else "
    f"{DEFAULT_CONFIG})", envvar="FIELDLINK_CONFIG", show_envvar=True,
    default_factory=_default_config, show_default=str(DEFAULT_CONFIG), callback=_config_given)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
# Our own errors become a message; anything else is a bug and keeps its traceback.
OUR_ERRORS = (EdgeError, DeviceProfileError, ProtocolError)
# What to do when the broker refuses the gateway's certificate (`edge-agent doctor` and
# `status` say it alike, whether the doctor's own handshake or the agent's uplink heard it).
REFUSED_HINT = ("the broker answers and refuses: check [mqtt.tls] ca (its certificate must "
                "chain to it and name the host), the credentials, and the broker's log")
CERTIFICATE_HINT = ("central revoked this gateway's certificate, or the broker does not trust "
                    "its CA, or it expired: `edge-agent renew` is refused then; enrol again "
                    "with a new token (central gateway enroll-token GW, then edge-agent "
                    "enroll), or fix [mqtt.tls] if it names the wrong files")


def fail(message: str) -> NoReturn:
    """Print `error: ...` (each line) on stderr and exit 1."""
    for line in message.splitlines() or [message]:
        err.print(f"[red]error:[/red] {escape(line)}")
    raise typer.Exit(1)


@contextmanager
def errors() -> Iterator[None]:
    try:
        yield
    except OUR_ERRORS as exc:
        fail(str(exc))


def print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, ensure_ascii=False, default=str))


def ago(ts_ms: int | None, *, short: bool = False) -> str:
    if not ts_ms:
        return "-"
    secs = max(0, time.time() - ts_ms / 1000)
    if secs < 120:
        text = f"{secs:.0f} s"
    elif secs < 7200:
        text = f"{secs / 60:.0f} min"
    else:
        text = f"{secs / 3600:.1f} h"
    if short:
        return f"{text} ago"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts_ms / 1000))
    return f"{stamp} ({text} ago)"


def fmt_value(value: Any, unit: str = "") -> str:
    """A value as a person reads it: floats to 6 significant digits, with the unit."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        text = "on (1)" if value else "off (0)"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip() if unit and not isinstance(value, bool) else text


def fmt_bytes(n: int | float | None) -> str:
    """A size in binary units, as every command prints one: `512 B`, `3.0 KiB`, `12.4 MiB`,
    `7.8 GiB` (`-` when unknown)."""
    if n is None:
        return "-"
    size = float(n)
    if abs(size) < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if abs(size) < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


STATE_COLOURS = {"ok": "green", "degraded": "yellow", "offline": "red", "disabled": "dim"}


def state_text(state: str) -> str:
    colour = STATE_COLOURS.get(state, "white")
    return f"[{colour}]{escape(state)}[/{colour}]"


__all__ = ["CONTEXT", "DEFAULT_CONFIG", "ConfigOpt", "JsonOpt", "OUR_ERRORS", "ago", "err",
           "errors", "fail", "fmt_bytes", "fmt_value", "out", "print_json", "state_text"]
