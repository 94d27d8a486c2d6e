"""`edge-agent buffer watch` and `edge-agent clock ok`, and the outbox part of `status`.

Kept apart from `cli.py` so that the technician's view of the outbox (lanes, drain, disk
budget, clock) lives next to nothing else; `cli.py` registers these sub-apps and calls
`outbox_report` / `print_outbox` from `status`.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from edge_agent.cli.common import CONTEXT, ConfigOpt, JsonOpt, err, errors, fail, fmt_bytes, out
from edge_agent.config.site import load_config
from edge_agent.health.clock import boottime_ns, current_boot_id
from edge_agent.outbox.store import OutboxStats, read_status, request_clock_ok

buffer_app = typer.Typer(help="Watch the outbox drain.  "
                         "e.g. [cyan]edge-agent buffer watch -c site.toml[/cyan]",
                         context_settings=CONTEXT, no_args_is_help=True, rich_markup_mode="rich")
clock_app = typer.Typer(help="Confirm the gateway's wall clock.  "
                        "e.g. [cyan]edge-agent clock ok -c site.toml[/cyan]",
                        context_settings=CONTEXT, no_args_is_help=True, rich_markup_mode="rich")

LANES = ("alarm", "event", "live", "backlog")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the outbox part of `status` ------------------------------------------------------------


def outbox_report(stats: OutboxStats, now_ms: int | None = None) -> dict[str, Any]:
    """Lanes, drain estimate, disk budget and clock, JSON-ready (for `status`)."""
    now_ms = _now_ms() if now_ms is None else now_ms
    lanes = {}
    for name in LANES:
        lane = stats.lanes.get(name)
        ts = lane.oldest_ts_ms if lane else None
        lanes[name] = {"count": lane.count if lane else 0, "oldest_ts_ms": ts,
                       "oldest_age_s": round((now_ms - ts) / 1000, 1) if ts else None}
    c = stats.counters
    pct = (round(100 * stats.used_bytes / stats.max_bytes, 1) if stats.max_bytes else None)
    pacing: dict[str, Any] | None = None
    if "uplink_pacing" in stats.meta:
        try:
            pacing = json.loads(stats.meta["uplink_pacing"])
        except ValueError:
            pacing = None
    return {
        "lanes": lanes,
        "drain": {"ack_rate_per_s": stats.ack_rate_per_s, "eta_s": stats.drain_eta_s,
                  "pacing": pacing},
        "budget": {"used_bytes": stats.used_bytes, "max_bytes": stats.max_bytes,
                   "used_pct": pct, "thinned_total": c.get("thinned_total", 0),
                   "dropped_total": c.get("dropped_total", 0),
                   "reports": c.get("budget_events", 0), "full_retries": c.get("full_retries", 0)},
        "clock": {**stats.clock, "corrected_total": c.get("clock_corrected_total", 0)},
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def print_outbox(table: Table, r: dict[str, Any]) -> None:
    """Rows for the `status` table."""
    lanes = "  ".join(f"{name} {v['count']}" + (f" (oldest {_age(v['oldest_age_s'])})"
                                                 if v["count"] else "")
                      for name, v in r["lanes"].items())
    table.add_row("lanes", lanes)
    d = r["drain"]
    if d["eta_s"] == 0:
        drain = "nothing to send"
    elif d["eta_s"] is not None:
        drain = f"~{_age(d['eta_s'])} at {d['ack_rate_per_s']:.0f} records/s acknowledged"
    else:
        drain = "[yellow]unknown[/yellow] (nothing acknowledged lately)"
    table.add_row("drain", drain)
    b = r["budget"]
    disk = fmt_bytes(b["used_bytes"])
    if b["max_bytes"]:
        colour = "red" if (b["used_pct"] or 0) >= 90 else "green"
        disk += f" of {fmt_bytes(b['max_bytes'])} ([{colour}]{b['used_pct']:.0f} %[/{colour}])"
    lost = b["thinned_total"] or b["dropped_total"]
    disk += (f"  [{'yellow' if lost else 'green'}]thinned {b['thinned_total']}, dropped "
             f"{b['dropped_total']}[/{'yellow' if lost else 'green'}]")
    table.add_row("disk budget", disk)
    clock = r["clock"]
    if clock.get("suspect"):
        table.add_row("clock", f"[red]suspect[/red] ({clock.get('reason')}): records are "
                      "flagged; run `edge-agent clock ok` once the time is right")
    elif clock:
        source = clock.get("trusted_source")
        table.add_row("clock", f"[green]ok[/green]  corrected {clock.get('corrected_total', 0)}"
                      + (f", confirmed by {source}" if source else ""))


# --- buffer watch ---------------------------------------------------------------------------


@buffer_app.command("watch")
def watch(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON line per sample")] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="seconds between samples")] = 1.0,
    timeout: Annotated[float | None, typer.Option(
        min=0, help="give up (exit 1) if the backlog is not 0 after this many seconds")] = None,
) -> None:
    """Follow the outbox drain with a progress bar until the backlog is 0 (or Ctrl-C).

    Example: edge-agent buffer watch --config /etc/fieldlink/site.toml
    """
    with errors():
        cfg = load_config(config, check_profiles=False)
        path = cfg.outbox_path
        first = read_status(path)
    started = time.monotonic()
    base = first.delivered_total
    samples: deque[tuple[float, int]] = deque()
    try:
        if as_json:
            _watch_json(path, base, samples, interval, timeout, started)
        else:
            _watch_bar(path, base, samples, interval, timeout, started)
    except KeyboardInterrupt:
        err.print("stopped")
        raise typer.Exit(0) from None


def _sample(path: Path, base: int, samples: deque[tuple[float, int]]) -> dict[str, Any]:
    with errors():
        st = read_status(path)
    now = time.monotonic()
    samples.append((now, st.delivered_total))
    while len(samples) > 2 and samples[0][0] < now - 10:
        samples.popleft()
    t0, d0 = samples[0]
    rate = (st.delivered_total - d0) / (now - t0) if now - t0 >= 0.5 else None
    return {"ts_ms": _now_ms(), "backlog": st.backlog,
            "lanes": {n: (st.lanes[n].count if n in st.lanes else 0) for n in LANES},
            "delivered": st.delivered_total - base,
            "rate_per_s": None if rate is None else round(rate, 1),
            "eta_s": (round(st.backlog / rate, 1) if rate else None) if st.backlog else 0.0,
            "thinned_total": st.counters.get("thinned_total", 0),
            "dropped_total": st.counters.get("dropped_total", 0)}


def _timed_out(timeout: float | None, started: float) -> bool:
    return timeout is not None and time.monotonic() - started >= timeout


def _watch_json(path: Path, base: int, samples: deque[tuple[float, int]], interval: float,
                timeout: float | None, started: float) -> None:
    while True:
        s = _sample(path, base, samples)
        done = s["backlog"] == 0
        print(json.dumps(s | {"done": done}), flush=True)
        if done:
            return
        if _timed_out(timeout, started):
            fail(f"backlog still {s['backlog']} after {timeout:g} s")
        time.sleep(interval)


def _watch_bar(path: Path, base: int, samples: deque[tuple[float, int]], interval: float,
               timeout: float | None, started: float) -> None:
    columns = (TextColumn("[bold]draining[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task("drain", total=None, detail="")
        while True:
            s = _sample(path, base, samples)
            lanes = " ".join(f"{n} {c}" for n, c in s["lanes"].items() if c)
            rate = f"{s['rate_per_s']:.0f}/s" if s["rate_per_s"] is not None else "-/s"
            eta = f"eta {_age(s['eta_s'])}" if s["eta_s"] is not None else "eta -"
            # Total moves with the outbox: new records add to it, thinning takes from it.
            progress.update(task, completed=s["delivered"], total=s["delivered"] + s["backlog"],
                            detail=f"{rate}  {eta}  {lanes}")
            if s["backlog"] == 0:
                break
            if _timed_out(timeout, started):
                progress.stop()
                fail(f"backlog still {s['backlog']} after {timeout:g} s")
            time.sleep(interval)
    out.print("[green]backlog drained[/green]")


# --- clock ok -------------------------------------------------------------------------------


@clock_app.command("ok")
def clock_ok(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Confirm that the wall clock is right now (set by hand, from BeiDou or a phone): the
    agent trusts it again and corrects this boot's suspect records within a few seconds.

    Example: edge-agent clock ok --config /etc/fieldlink/site.toml
    """
    wall, mono, boot = _now_ms(), boottime_ns() // 1_000_000, current_boot_id()
    with errors():
        cfg = load_config(config, check_profiles=False)
        request_clock_ok(cfg.outbox_path, wall_ms=wall, mono_ms=mono, boot_id=boot)
    if as_json:
        print(json.dumps({"requested": True, "wall_ms": wall, "mono_ms": mono, "boot_id": boot}))
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall / 1000))
    out.print(f"[green]OK[/green] clock confirmed at {stamp}; the running agent applies it "
              "within a few seconds (or when it next starts, in this boot)")


__all__ = ["buffer_app", "clock_app", "outbox_report", "print_outbox"]
