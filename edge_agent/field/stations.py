"""HJ 212 stations wired into the agent: a configured device around one `Hj212Source`.

`Hj212Station` is what the supervisor keeps for each device whose transport is `hj212`: it
builds the source from the device's config (port and line settings, `mn`, `tz`; the station's
real-time period is the device's `poll_interval_s`), runs it as task `hj212[<device>]` and
feeds its records to the same sink as the pollers (the alarm rules, then the outbox). It
looks like a poller to the rest of the agent (`device`, `profile`, `health`), so the rules'
tick sees a silent station go offline and `status`/`devices` show its health.

Like the poller, a full outbox (`OutboxFullError`) costs that frame's records only: it is
counted in `health.outbox_full`, logged once, and the source keeps reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from device_profiles import Profile
from edge_agent.config.site import DeviceConfig, Hj212TransportConfig
from edge_agent.field.hj212_source import Hj212Source, RecordSink
from edge_agent.field.poller import DeviceHealth
from edge_agent.outbox.store import NewRecord, OutboxFullError

log = structlog.get_logger(__name__)


class Hj212Station:
    """One configured HJ 212 device: its source, and the sink in front of the outbox."""

    def __init__(self, device: DeviceConfig, profile: Profile, sink: RecordSink, *,
                 notify: Callable[[], object] | None = None) -> None:
        t = device.transport
        if not isinstance(t, Hj212TransportConfig):
            raise TypeError(f"{device.id}: not an hj212 transport")
        self.device = device
        self.profile = profile
        self._sink = sink
        self.source = Hj212Source(device=device.id, profile=profile, port=t.port,
                                  baudrate=t.baudrate, bytesize=t.bytesize, parity=t.parity,
                                  stopbits=t.stopbits, interval_s=device.poll_interval_s,
                                  mn=t.mn, tz=t.tz, notify=notify)
        self._outbox_full = 0
        self._refusing = False
        self._log = log.bind(device=device.id)

    @property
    def endpoint(self) -> str:
        return self.device.transport.endpoint

    @property
    def health(self) -> DeviceHealth:
        return dataclasses.replace(self.source.health, outbox_full=self._outbox_full)

    def stats(self) -> dict[str, Any]:
        return self.source.stats.to_dict()

    async def run(self) -> None:
        await self.source.run(self)

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        """The source's sink: forwards to the rules; a full outbox drops this frame only."""
        try:
            seqs: list[int] = await self._sink.append(records)
        except OutboxFullError as exc:
            self._outbox_full += 1
            if not self._refusing:
                self._refusing = True
                self._log.error("hj212_outbox_full", error=str(exc), records=len(records))
            return []
        if self._refusing:
            self._refusing = False
            self._log.info("hj212_outbox_writable", refused=self._outbox_full)
        return seqs


__all__ = ["Hj212Station"]
