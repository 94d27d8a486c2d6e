"""The disk line of `edge-agent status` and `edge-agent doctor`: is the outbox's file system
full, and what does that cost (issue 10).

Read without the daemon (`statvfs` and file sizes, `outbox_disk.disk_usage`) and merged with
what the running agent says over its socket (`disk` in its status: records held in memory,
telemetry dropped, delivery marks pending, alarm states not saved). The state is

- `disk full`: the agent is in a full-disk episode, or the file system has (almost) no room;
- `disk low`: less free than the reserve, so old telemetry is being thinned and dropped;
- `ok`.
"""

from __future__ import annotations

from typing import Any

from edge_agent.cli.common import fmt_bytes
from edge_agent.config.site import AgentConfig
from edge_agent.outbox.disk import disk_usage

FULL_BELOW_BYTES = 64 * 1024  # less free than this: SQLite cannot count on its next page


def disk_report(cfg: AgentConfig, live: dict[str, Any] | None) -> dict[str, Any]:
    """JSON-ready: the state, the file system's numbers, the outbox's files, and (while the
    agent runs) what a full disk has made it hold, drop or postpone."""
    usage = disk_usage(cfg.outbox_path, cfg.outbox.disk_reserve_bytes).to_jsonable()
    episode = {k: live.get(k) for k in ("full", "since_ms", "held", "capacity",
                                        "telemetry_dropped", "held_lost", "marks_pending",
                                        "alarm_states_unsaved", "error")} if live else {}
    if episode.get("full") or usage["fs_free_bytes"] < FULL_BELOW_BYTES:
        state = "disk full"
    elif usage["short"]:
        state = "disk low"
    else:
        state = "ok"
    return {"state": state, **usage, "episode": episode or None}


def disk_text(d: dict[str, Any]) -> str:
    """One line: `disk full: 0 B free of 16.0 MiB (reserve 1.0 MiB); outbox 3.1 MiB; 12
    alarm/event record(s) held in memory, 3400 telemetry dropped, 20 ack(s) pending`."""
    b = {k: fmt_bytes(d[k]) for k in ("fs_free_bytes", "fs_total_bytes", "reserve_bytes",
                                      "owned_bytes", "wal_bytes", "ballast_bytes")}
    line = (f"{d['state']}: {b['fs_free_bytes']} free of {b['fs_total_bytes']}"
            f" (reserve {b['reserve_bytes']}); outbox files {b['owned_bytes']}"
            f" (wal {b['wal_bytes']}, ballast {b['ballast_bytes']})")
    ep = d.get("episode") or {}
    if ep.get("full"):
        line += (f"; {ep.get('held', 0)} alarm/event record(s) held in memory"
                 f" (room for {ep.get('capacity')}), {ep.get('telemetry_dropped', 0)} telemetry"
                 f" dropped, {ep.get('held_lost', 0)} held record(s) given up,"
                 f" {ep.get('marks_pending', 0)} ack(s) pending")
    if ep.get("alarm_states_unsaved"):
        line += f"; {ep['alarm_states_unsaved']} alarm state(s) not saved yet"
    return line


def disk_markup(d: dict[str, Any]) -> str:
    colour = {"disk full": "red", "disk low": "yellow"}.get(d["state"], "green")
    text = disk_text(d)
    head, _, rest = text.partition(":")
    return f"[{colour}]{head}[/{colour}]:{rest}"


__all__ = ["FULL_BELOW_BYTES", "disk_markup", "disk_report", "disk_text"]
