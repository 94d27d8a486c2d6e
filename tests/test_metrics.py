"""The Prometheus endpoints parse with prometheus_client's own parser and carry the families
operators alert on: a real agent process (simulator, private broker) and central's /metrics."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from central.config.settings import Settings
from protocols import topics
from protocols.envelope import DataBatch, Record, RecordKind, encode
from runtime.mqtt import Client as MqttClient
from tests.fleet import Agent, DeviceDef, Simulator
from tests.helpers import Mosquitto, free_port, wait_for
from tests.test_central_alarms import alarm
from tests.test_central_api import T0, serve

# Issue 15's list, item by item → the families that carry it (names as the parser gives them:
# a counter without `_total`).
EDGE_ISSUE_FAMILIES = {
    "poll cycles per device": {"fieldlink_edge_poll_cycles", "fieldlink_edge_poll_cycles_ok"},
    "poll errors per device": {"fieldlink_edge_poll_errors", "fieldlink_edge_device_up"},
    "outbox records per lane": {"fieldlink_edge_outbox_records"},
    "outbox bytes per lane": {"fieldlink_edge_outbox_lane_bytes", "fieldlink_edge_outbox_bytes",
                              "fieldlink_edge_outbox_used_bytes"},
    "oldest unsent age": {"fieldlink_edge_outbox_oldest_unsent_age_seconds"},
    "uplink state": {"fieldlink_edge_uplink_connected"},
    "acks and resends": {"fieldlink_edge_uplink_acks", "fieldlink_edge_uplink_batches_resent",
                         "fieldlink_edge_outbox_delivered", "fieldlink_edge_uplink_records_sent"},
    "narrowband sends and refusals": {"fieldlink_edge_narrowband_sends",
                                      "fieldlink_edge_narrowband_refusals",
                                      "fieldlink_edge_narrowband_active"},
    "disk": {"fieldlink_edge_disk", "fieldlink_edge_disk_full"},
    "clock": {"fieldlink_edge_clock_unix_seconds", "fieldlink_edge_clock_suspect"},
}


def _missing(issue: dict[str, set[str]], seen: set[str]) -> dict[str, list[str]]:
    """The issue's items whose families are not all in `seen`, with what is missing."""
    return {item: sorted(names - seen) for item, names in issue.items() if names - seen}


def _samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name → {sorted labels: value}, through prometheus_client's parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(family.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


@contextmanager
def agent_with_metrics(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[int]:
    """A real agent polling one simulated gas detector (`gas-1`), no central, its metrics
    endpoint on; yields the endpoint's port (tests/test_alert_rules.py uses it too)."""
    sim = Simulator(tmp_path, ["gas-detector-v1"])
    sim.start()
    port = free_port()
    agent = Agent(tmp_path, "gw-metrics", mosquitto.port, sim.port,
                  [DeviceDef("gas-1", "gas-detector-v1", 1)], poll_interval_s=0.2,
                  extra=f"\n[metrics]\nenabled = true\nport = {port}\ninterval_s = 0.2\n")
    try:
        agent.start()
        yield port
    finally:
        agent.stop()
        sim.stop()


def test_edge_metrics_endpoint_parses_and_counts_polls_and_acks(tmp_path: Path,
                                                                mosquitto: Mosquitto) -> None:
    """[metrics] enabled: 127.0.0.1 serves poll cycles per device, outbox lanes, uplink acks, disk, clock."""
    with agent_with_metrics(tmp_path, mosquitto) as port:

        def polled() -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
            try:
                m = _samples(_scrape(port))
            except OSError:
                return None
            cycles = m.get("fieldlink_edge_poll_cycles", {})
            return m if cycles.get((("device", "gas-1"),), 0) >= 3 else None

        m = wait_for(polled, timeout=60, what="metrics with 3 poll cycles of gas-1")
        assert m is not None and not _missing(EDGE_ISSUE_FAMILIES, set(m)), \
            _missing(EDGE_ISSUE_FAMILIES, set(m))
        assert m["fieldlink_edge_device_up"][(("device", "gas-1"),)] == 1
        assert set(m["fieldlink_edge_outbox_records"]) == {
            (("lane", lane),) for lane in ("alarm", "event", "live", "backlog")}
        assert (("device", "gas-1"), ("kind", "timeouts")) in m["fieldlink_edge_poll_errors"]
        assert m["fieldlink_edge_outbox_bytes"][()] > 0
        # Unacked telemetry takes room in its lane; no alarm is raised, so that lane has none;
        # the lanes never add up to more than the pages in use.
        lane_bytes = {dict(k)["lane"]: v for k, v in m["fieldlink_edge_outbox_lane_bytes"].items()}
        assert set(lane_bytes) == {"alarm", "event", "live", "backlog"}
        assert lane_bytes["live"] + lane_bytes["backlog"] > 0 and lane_bytes["alarm"] == 0
        assert sum(lane_bytes.values()) <= m["fieldlink_edge_outbox_used_bytes"][()]
        # No radio on this gateway: the narrowband series are there, at 0, every reason too.
        assert m["fieldlink_edge_narrowband_configured"][()] == 0
        assert m["fieldlink_edge_narrowband_refusals"][(("reason", "interval"),)] == 0
        assert m["fieldlink_edge_narrowband_sends"][(("kind", "alarm"),)] == 0
        assert (("field", "fs_free_bytes"),) in m["fieldlink_edge_disk"]
        # central is absent: nothing is acked, and the unsent records age.
        assert m["fieldlink_edge_uplink_connected"][()] == 1
        assert m["fieldlink_edge_uplink_acks"][()] == 0
        assert m["fieldlink_edge_outbox_oldest_unsent_age_seconds"][()] >= 0


CENTRAL_ISSUE_FAMILIES = {
    "ingest rate": {"fieldlink_central_records_inserted", "fieldlink_central_batches",
                    "fieldlink_central_acks_published"},
    "batch latency": {"fieldlink_central_batch_write_seconds"},
    "rejections by reason": {"fieldlink_central_messages_rejected",
                             "fieldlink_central_records_rejected"},
    # (gateway_backlog_records{gw} too, once a gateway has sent its up/state: not here)
    "lag per gateway": {"fieldlink_central_gateway_last_seen_age_seconds"},
    "alarm counts": {"fieldlink_central_alarms_active"},
    "command states": {"fieldlink_central_commands"},
    "broker and logins": {"fieldlink_central_mqtt_connected", "fieldlink_central_logins"},
}


@asynccontextmanager
async def central_on_broker(mosquitto: Mosquitto, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Central (SQLite) with its ingest connected to `mosquitto`; a logged-in client, 30 s."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", mqtt_host=mosquitto.host,
                        mqtt_port=mosquitto.port, mqtt_client_id=f"c-{uuid.uuid4().hex[:8]}")
    async with serve(settings, run_ingest=True) as c, asyncio.timeout(30):
        while not (await c.get("/api/health")).json()["mqtt_connected"]:
            await asyncio.sleep(0.05)
        yield c


async def test_central_metrics_parse_and_time_each_batch_commit(mosquitto: Mosquitto,
                                                                 tmp_path: Path) -> None:
    """central's /metrics parses with prometheus_client; a stored batch shows in the counters and the latency histogram."""
    async with central_on_broker(mosquitto, tmp_path) as c:
        batch = DataBatch(gw="gw-m", stream="s", records=(
            Record(seq=1, kind=RecordKind.TELEMETRY, ts_ms=T0, point="d/t", value=21.5),
            alarm(2, "raised", 1)))
        async with MqttClient(mosquitto.host, mosquitto.port, identifier="gw-m") as gw:
            await gw.publish(topics.up("gw-m", "data"), encode(batch), qos=1)
        while _samples((await c.get("/metrics")).text).get(
                "fieldlink_central_records_inserted", {}).get((), 0) < 1:
            await asyncio.sleep(0.05)
        m = _samples((await c.get("/metrics")).text)
    assert not _missing(CENTRAL_ISSUE_FAMILIES, set(m)), _missing(CENTRAL_ISSUE_FAMILIES, set(m))
    # Every command state and every alarm level x ack state is there from 0.
    assert m["fieldlink_central_commands"][(("state", "succeeded"),)] == 0
    assert m["fieldlink_central_alarms_active"][(("ack", "acknowledged"), ("level", "2"))] == 0
    assert m["fieldlink_central_messages_rejected"][(("reason", "not_cbor"),)] == 0
    assert m["fieldlink_central_mqtt_connected"][()] == 1
    latency = m["fieldlink_central_batch_write_seconds"]
    assert latency[(("le", "+Inf"),)] >= 1  # the parser keeps bucket, count and sum samples
    assert m["fieldlink_central_gateway_last_seen_age_seconds"][(("gw", "gw-m"),)] >= 0
    assert m["fieldlink_central_alarms_active"][(("ack", "unacknowledged"), ("level", "1"))] == 1
