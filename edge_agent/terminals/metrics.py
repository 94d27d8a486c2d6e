"""The terminals' Prometheus families, from `TerminalService.status()` (the agent's metrics
collector calls this at scrape time, on its snapshot: nothing here touches a live object)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

P = "fieldlink_edge_terminal"
_COUNTERS = {"frames": "Good frames received.", "bad_frames": "Frames dropped as bad (CRC, "
             "length, malformed), by terminal.", "plays_sent": "PLAY frames sent (first sends).",
             "plays_unanswered": "PLAYs given up after 5 sends without an answer.",
             "acks": "Button presses received (repeats included).",
             "lost": "Connections lost (line down or silent for 3 heartbeat intervals)."}


def terminal_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    terms = status.get("terminals") or []
    up = GaugeMetricFamily(f"{P}_up", "1 while the terminal's line is connected.",
                           labels=["terminal"])
    battery = GaugeMetricFamily(f"{P}_battery_percent", "Battery charge from the last "
                                "heartbeat (absent: none or unknown).", labels=["terminal"])
    mains = GaugeMetricFamily(f"{P}_mains", "1 while the last heartbeat said mains present.",
                              labels=["terminal"])
    faults = GaugeMetricFamily(f"{P}_fault", "1 for each open fault of a terminal.",
                               labels=["terminal", "fault"])
    counters = {k: CounterMetricFamily(f"{P}_{k}", h, labels=["terminal"])
                for k, h in _COUNTERS.items()}
    for t in terms:
        tid = str(t.get("id"))
        up.add_metric([tid], 1.0 if t.get("connected") else 0.0)
        hb = t.get("heartbeat") or {}
        if hb.get("battery") is not None:
            battery.add_metric([tid], float(hb["battery"]))
        if hb:
            mains.add_metric([tid], 1.0 if hb.get("mains") else 0.0)
        for fault in t.get("faults") or ():
            faults.add_metric([tid, str(fault)], 1.0)
        for k, family in counters.items():
            family.add_metric([tid], float((t.get("counters") or {}).get(k, 0)))
    yield from (up, battery, mains, faults, *counters.values())


__all__ = ["terminal_metrics"]
