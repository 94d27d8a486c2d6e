"""The 叫应 terminals in `edge-agent status` and `edge-agent doctor`.

`terminals_report(cfg, live)` is one JSON-ready dict with stable keys:

    {"source": "agent" | "files", "note": str | None, "terminals": [
        {"id", "kind" (audio | video), "link" (tcp | serial), "endpoint", "enabled",
         "connected" (None: unknown, the agent is not running), "since_ms" (up or down since),
         "last_heartbeat_ms", "last_error", "battery", "mains",
         "faults": [{"fault", "since_ms"}], "plays_sent" (since the agent started),
         "delivered", "answered" (warnings with a receipt / a button press recorded in
         terminals.db, the last 30 days)}]}

While the agent runs, the link, heartbeat and faults come from its control socket (`status`,
key `terminals`); without it only `terminals.db` (open faults, recorded receipts and acks)
and the config can say anything, and the note says so. `terminal_diagnosis(row)` is doctor's
line for one terminal: status, detail and what to check.
"""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from edge_agent.cli.common import ago
from edge_agent.config.site import AgentConfig
from edge_agent.terminals.ledger import LedgerSummary, TerminalLedgerError, read_summary

NOT_RUNNING = "live terminal state (link, heartbeat) needs the running agent"
_FAULT_HINTS = {
    "lost": "the terminal stopped answering: check its power and cable",
    "mains_lost": "the terminal runs on battery: check its mains supply",
    "battery_low": "the battery is nearly flat and mains is off: restore mains",
    "speaker_fault": "the terminal reports its speaker (horn) faulty: check the horn and its "
                     "wiring",
    "display_fault": "the terminal reports its display faulty",
    "tamper": "the case was opened: check the terminal on site",
    "camera_fault": "the camera is faulty or obstructed: check the lens and its cable",
}


def terminals_report(cfg: AgentConfig, live: dict[str, Any] | None) -> dict[str, Any]:
    """The terminals of `cfg`, live from the agent's `status` answer when it gave one."""
    ledger, ledger_error = _ledger(cfg)
    running = live is not None
    live_rows = {str(t.get("id")): t for t in ((live or {}).get("terminals") or {})
                 .get("terminals") or []}
    rows = [_row(t.id, t.kind, t.endpoint, t.enabled, live_rows.get(t.id), ledger, running)
            for t in cfg.terminals]
    notes = [] if running else [NOT_RUNNING]
    if ledger_error:
        notes.append(ledger_error)
    return {"source": "agent" if running else "files", "note": "; ".join(notes) or None,
            "terminals": rows}


def _ledger(cfg: AgentConfig) -> tuple[LedgerSummary | None, str | None]:
    if not cfg.terminals:
        return None, None
    try:
        return read_summary(cfg.terminals_path), None
    except TerminalLedgerError as exc:
        return None, f"cannot read {exc}"


def _row(tid: str, kind: str, endpoint: str, enabled: bool, live: dict[str, Any] | None,
         ledger: LedgerSummary | None, running: bool) -> dict[str, Any]:
    hb = (live or {}).get("heartbeat") or {}
    if live is not None:
        since = live.get("fault_since") or {}
        faults = [{"fault": f, "since_ms": since.get(f)} for f in live.get("faults") or ()]
    else:
        saved = (ledger.faults if ledger else {}).get(tid, {})
        faults = [{"fault": f, "since_ms": ms} for f, ms in sorted(saved.items())]
    events = (ledger.events if ledger else {}).get(tid, {})
    return {
        "id": tid, "kind": kind, "link": endpoint.partition("://")[0], "endpoint": endpoint,
        "enabled": enabled,
        "connected": bool(live.get("connected")) if live is not None else
        (False if running and enabled else None),
        "since_ms": (live or {}).get("since_ms"),
        "last_heartbeat_ms": (live or {}).get("last_heartbeat_ms"),
        "last_error": (live or {}).get("last_error"),
        "battery": hb.get("battery"), "mains": hb.get("mains"),
        "faults": faults,
        "plays_sent": ((live or {}).get("counters") or {}).get("plays_sent"),
        "delivered": events.get("delivered", 0) if ledger else None,
        "answered": events.get("ack", 0) if ledger else None,
    }


# --- status ---------------------------------------------------------------------------------


def when(ts_ms: int | None) -> str:
    """`10:02:07 (3 min ago)`, the date too when it is not today."""
    if not ts_ms:
        return "-"
    t = time.localtime(ts_ms / 1000)
    today = time.localtime()[:3] == t[:3]
    stamp = time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S", t)
    return f"{stamp} ({ago(ts_ms, short=True)})"


def _link_state(row: dict[str, Any]) -> str:
    if not row["enabled"]:
        return "[dim]disabled[/dim]"
    if row["connected"] is None:
        return "[yellow]unknown[/yellow]"
    if row["connected"]:
        return "[yellow]connected[/yellow]" if row["faults"] else "[green]connected[/green]"
    return "[red]down[/red]"


def _faults_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{f['fault']} since {when(f['since_ms'])}" for f in row["faults"]) or "-"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def print_terminals(out: Any, report: dict[str, Any]) -> None:
    """The terminals table of `edge-agent status` (nothing without [[terminals]])."""
    rows = report["terminals"]
    if not rows:
        return
    t = Table("terminal", "kind", "link", "state", "since", "last heartbeat", "open faults",
              "played", "delivered", "answered", "last error", title="叫应 terminals")
    for r in rows:
        t.add_row(escape(r["id"]), r["kind"], escape(r["endpoint"]), _link_state(r),
                  when(r["since_ms"]), when(r["last_heartbeat_ms"]), escape(_faults_text(r)),
                  _n(r["plays_sent"]), _n(r["delivered"]), _n(r["answered"]),
                  escape(r["last_error"] or ""))
    out.print(t)
    if report["note"]:
        out.print(f"[yellow]terminals:[/yellow] {escape(report['note'])}")


# --- doctor ---------------------------------------------------------------------------------


def terminal_diagnosis(row: dict[str, Any]) -> tuple[str, str, str | None]:
    """(status, detail, hint) of doctor's line for one terminal (pass, warn, fail, skip)."""
    where = row["endpoint"]
    if not row["enabled"]:
        return "skip", f"disabled in the config ({where})", None
    if row["connected"] is None:
        faults = f"; terminals.db: {_faults_text(row)}" if row["faults"] else ""
        return "skip", f"{NOT_RUNNING}{faults}", "start the agent, then run doctor again"
    if not row["connected"]:
        detail = f"no link to {where}" + (f" since {when(row['since_ms'])}"
                                          if row["since_ms"] else "")
        if row["last_error"]:
            detail += f"; last error: {row['last_error']}"
        if row["last_heartbeat_ms"]:
            detail += f"; last heartbeat {when(row['last_heartbeat_ms'])}"
        return "fail", detail, _down_hint(row)
    detail = (f"connected to {where} since {when(row['since_ms'])}, last heartbeat "
              f"{when(row['last_heartbeat_ms'])}")
    if row["faults"]:
        hints = "; ".join(_FAULT_HINTS.get(f["fault"], f["fault"]) for f in row["faults"])
        return "warn", f"{detail}; open faults: {_faults_text(row)}", hints
    return "pass", detail, None


def _down_hint(row: dict[str, Any]) -> str:
    if row["link"] == "tcp":
        return (f"check the terminal's power and network cable, that it listens on "
                f"{row['endpoint'].removeprefix('tcp://')} (ping it) and no firewall is in between")
    return (f"check the terminal's power and its serial cable or USB adapter "
            f"({row['endpoint'].removeprefix('serial://')}; ls -l /dev/serial/by-id/, "
            "dmesg | tail) and its baud rate")


__all__ = ["NOT_RUNNING", "print_terminals", "terminal_diagnosis", "terminals_report", "when"]
