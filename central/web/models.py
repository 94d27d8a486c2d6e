"""The HTTP API's response bodies (DESIGN.md §4): what `central.app` returns, as pydantic
models, so that the OpenAPI description says exactly what each route answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(_Out):
    status: str
    db: bool
    mqtt_connected: bool
    version: str


class GatewayOut(_Out):
    gw: str
    online: bool  # effective: its state says online AND it was heard within offline_after_s
    state_online: bool
    stream: str | None
    boot_id: str | None
    version: str | None
    bearer: str | None
    backlog: int | None
    last_seen_ms: int | None
    state_ts_ms: int | None
    # delivery, summed over the gateway's streams (detail: /api/gateways/{gw}/delivery)
    held: int = 0  # records central holds (ever received; retention does not lower it)
    missing: int = 0  # seqs up to the highest received that central does not hold
    reported_lost: int = 0  # of the missing, those the edge reported evicted


class StreamDeliveryOut(_Out):
    stream: str
    current: bool
    held: int
    max_seq: int
    missing: int
    gaps: list[tuple[int, int]]  # the first 100 missing [first, last] ranges
    gap_count: int
    reported_lost: int
    pending: int  # missing and not reported lost: not arrived yet (or lost silently)
    lost_records_reported: int
    lost_ranges: list[tuple[int, int]]
    first_ms: int | None
    last_ms: int | None


class DeliveryOut(_Out):
    gw: str
    stream: str | None
    last_seen_ms: int | None
    backlog: int | None  # as the gateway's last state reported it
    streams: list[StreamDeliveryOut]


class LatestOut(_Out):
    ts_ms: int
    value: float | None
    text: str | None


class PointOut(_Out):
    ref: str
    device: str
    point: str
    name_zh: str
    unit: str
    latest: LatestOut | None


class DeviceOut(_Out):
    ref: str
    device: str
    profile: str
    points: list[PointOut]


class GatewayDetail(GatewayOut):
    devices: list[DeviceOut]


class SampleOut(_Out):
    ts_ms: int
    value: float | None
    text: str | None
    flags: int


class BucketOut(_Out):
    ts_ms: int  # bucket start
    value: float  # average
    min: float
    max: float
    count: int


class SeriesOut(_Out):
    point: str
    from_ms: int
    to_ms: int
    resolution: Literal["raw", "1m", "1h"]
    limit: int
    truncated: bool  # more samples exist in the window: ask again with cursor=`next`
    next: str | None = Field(default=None, description="when truncated: pass as `cursor` "
                             "(with the same from, to and resolution) for the next page")
    samples: list[SampleOut] | list[BucketOut]


class Problem(_Out):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, object]] | None = None
