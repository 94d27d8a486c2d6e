"""Central's Prometheus counters, rendered as the text exposition format (no client library).

One `Metrics` object lives on `app.state`; the ingest loop counts into it and `GET /metrics`
renders it. Everything runs on the event loop thread, so plain ints are enough.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "fieldlink_central"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class Metrics:
    batches: int = 0
    commits: int = 0
    records_inserted: int = 0
    records_duplicate: int = 0
    acks_published: int = 0
    acks_failed: int = 0
    states: int = 0
    births: int = 0
    write_failures: int = 0
    mqtt_connects: int = 0
    mqtt_connected: bool = False
    records_clock_suspect: int = 0
    records_time_corrected: int = 0
    records_merged: int = 0  # IP copies that replaced a narrowband copy (also duplicates)
    samples_aggregated: int = 0
    # rows deleted by retention, by table
    purged: Counter[str] = field(default_factory=Counter)
    # bad input by error class name, e.g. {"MalformedEnvelopeError": 3, "TopicError": 1}
    decode_errors: Counter[str] = field(default_factory=Counter)
    # ingest refusals by reason (protocols.limits.Reason and central.ingest's own): whole
    # messages dropped, and single records of otherwise good batches (refused and acked)
    messages_rejected: Counter[str] = field(default_factory=Counter)
    records_rejected: Counter[str] = field(default_factory=Counter)
    # narrowband receiver (central.narrowband): frames by kind, rejects by reason, the port
    narrowband_received: Counter[str] = field(default_factory=Counter)
    narrowband_rejected: Counter[str] = field(default_factory=Counter)
    narrowband_records: int = 0
    narrowband_port_open: bool = False
    narrowband_port_failures: int = 0

    def count_error(self, error_class: str) -> None:
        self.decode_errors[error_class] += 1

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: int | float) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            lines.append(f"{PREFIX}_{name} {value}")

        metric("batches_total", "counter", "Data batches written and acknowledged.", self.batches)
        metric("commits_total", "counter", "Ingest write transactions committed.", self.commits)
        metric("records_inserted_total", "counter", "Records newly stored.", self.records_inserted)
        metric("records_duplicate_total", "counter", "Records received again and already held.",
               self.records_duplicate)
        metric("acks_published_total", "counter", "down/ack messages published.",
               self.acks_published)
        metric("acks_failed_total", "counter", "down/ack publishes that failed (the gateway "
               "sends those records again).", self.acks_failed)
        metric("states_total", "counter", "Gateway state messages stored.", self.states)
        metric("births_total", "counter", "Gateway birth messages stored.", self.births)
        metric("write_failures_total", "counter", "Write transactions rolled back.",
               self.write_failures)
        metric("mqtt_connects_total", "counter", "Successful MQTT connections.",
               self.mqtt_connects)
        metric("mqtt_connected", "gauge", "1 while connected to the broker.",
               int(self.mqtt_connected))
        metric("records_clock_suspect_total", "counter", "Records stored with a time central "
               "judged implausible (future or before 2020).", self.records_clock_suspect)
        metric("records_time_corrected_total", "counter", "Suspect-time records replaced by a "
               "corrected copy.", self.records_time_corrected)
        metric("records_merged_total", "counter", "Records whose full copy came over IP after "
               "a narrowband copy, which it replaced.", self.records_merged)
        metric("samples_aggregated_total", "counter", "Readings folded into the 1m/1h "
               "aggregates.", self.samples_aggregated)
        name = f"{PREFIX}_purged_rows_total"
        lines.append(f"# HELP {name} Rows deleted by retention, by table.")
        lines.append(f"# TYPE {name} counter")
        for table, n in sorted(self.purged.items()):
            lines.append(f'{name}{{table="{_escape(table)}"}} {n}')
        name = f"{PREFIX}_decode_errors_total"
        lines.append(f"# HELP {name} Bad messages dropped, by error class.")
        lines.append(f"# TYPE {name} counter")
        for cls, n in sorted(self.decode_errors.items()):
            lines.append(f'{name}{{class="{_escape(cls)}"}} {n}')
        for name, help_, counts in (
                ("messages_rejected_total", "Ingested messages dropped whole, by reason.",
                 self.messages_rejected),
                ("records_rejected_total", "Records refused inside good batches (acked, "
                 "counted as reported lost), by reason.", self.records_rejected)):
            full = f"{PREFIX}_{name}"
            lines.append(f"# HELP {full} {help_}")
            lines.append(f"# TYPE {full} counter")
            for reason, n in sorted(counts.items()):
                lines.append(f'{full}{{reason="{_escape(reason)}"}} {n}')
        self._render_narrowband(lines, metric)
        return "\n".join(lines) + "\n"

    def _render_narrowband(self, lines: list[str], metric: Callable[..., None]) -> None:
        for name, help_, counts, label in (
                ("narrowband_received_total", "Narrowband frames accepted, by kind.",
                 self.narrowband_received, "kind"),
                ("narrowband_rejected_total", "Narrowband messages dropped, by reason.",
                 self.narrowband_rejected, "reason")):
            full = f"{PREFIX}_{name}"
            lines.append(f"# HELP {full} {help_}")
            lines.append(f"# TYPE {full} counter")
            for key, n in sorted(counts.items()):
                lines.append(f'{full}{{{label}="{_escape(key)}"}} {n}')
        metric("narrowband_records_total", "counter", "Alarm records stored from narrowband "
               "frames (the full copy over IP merges into them).", self.narrowband_records)
        metric("narrowband_port_open", "gauge", "1 while central's narrowband radio port is "
               "open.", int(self.narrowband_port_open))
        metric("narrowband_port_failures_total", "counter", "Times the narrowband radio port "
               "could not be opened or was lost.", self.narrowband_port_failures)
