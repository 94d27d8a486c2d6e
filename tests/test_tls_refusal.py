"""A broker that refuses the gateway's certificate is a refusal, not a path failure
(runtime.mqtt_refusal): on a real Mosquitto with the production mutual-TLS config, a CRL and
TLS 1.3, where the broker's alert comes after the client's handshake, on the first read."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
from typer.testing import CliRunner

from central.config.settings import Settings
from central.health.metrics import Metrics
from central.identity.ca import (
    CertificateAuthority,
    Revoked,
    load_or_create_ca,
)
from central.ingest.subscriber import Ingest
from central.storage import open_storage
from edge_agent.agent import AgentRuntime
from edge_agent.cli.app import app as edge_cli
from edge_agent.cli.common import CERTIFICATE_HINT
from edge_agent.cli.doctor import run_checks
from edge_agent.config.site import AgentConfig, load_config
from edge_agent.control.server import ControlOps, ControlServer
from edge_agent.health.metrics import AgentCollector, take_snapshot
from edge_agent.outbox.store import Outbox
from edge_agent.uplink.link import BrokerRefusal
from runtime.mqtt import Client, client_tls_context
from runtime.mqtt_refusal import (
    AlertCatcher,
    CertificateRefusedError,
    Refusal,
    TlsClosedError,
    refusal_of,
)
from tests.helpers import Mosquitto, until
from tests.mtls import issue, start_broker
from tests.uplinks import running_uplink

GW = "gw-revoked"
REFUSED = ("the broker refused our certificate (revoked or untrusted): "
           "SSLV3_ALERT_CERTIFICATE_REVOKED")
# As `edge-agent status --json` shows it and the outbox keeps it.
REFUSED_JSON = {"cause": "certificate", "error": REFUSED}


@dataclass
class Site:
    ca: CertificateAuthority
    broker: Mosquitto
    config: Path  # the gateway's site.toml, with [mqtt.tls]
    cert: Path
    key: Path
    serial: int  # the gateway certificate's

    def revoke(self) -> None:
        """Central revokes the gateway; a restart makes the broker read the CRL and ends the
        sessions it has."""
        self.ca.write_crl([Revoked(self.serial, dt.datetime.now(dt.UTC))])
        self.broker.stop()
        self.broker.start()


def _issue(ca: CertificateAuthority, folder: Path) -> tuple[Path, Path, int]:
    """A key and certificate for GW from `ca`, in `folder`."""
    cert, key = folder / "gateway.crt", folder / "gateway.key"
    return cert, key, issue(ca, GW, cert, key)


@contextlib.contextmanager
def revoked_site(tmp_path: Path, tls_version: str | None, *, revoked: bool = True
                 ) -> Iterator[Site]:
    """Central's CA, a gateway certificate its CRL revokes (unless not `revoked`), and the
    broker `central broker-config` writes, with its listeners held to `tls_version` (a
    minimum) if given."""
    ca = load_or_create_ca(tmp_path / "pki")
    cert, key, serial = _issue(ca, tmp_path / "gw" / "pki")
    ca.write_crl([Revoked(serial, dt.datetime.now(dt.UTC))] if revoked else [])
    broker = start_broker(ca, tmp_path, tls_version)
    config = tmp_path / "gw" / "site.toml"
    config.write_text(f'[gateway]\nid = "{GW}"\ndata_dir = "data"\n\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nack_timeout_s = 30\n'
                      "reconnect_min_s = 0.1\nreconnect_max_s = 0.3\n\n"
                      f'[mqtt.tls]\nca = "{ca.cert_path}"\ncert = "{cert}"\nkey = "{key}"\n')
    try:
        yield Site(ca, broker, config, cert, key, serial)
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def running(site: Site) -> AsyncIterator[AgentRuntime]:
    """The site's gateway: its outbox, uplink and control socket, as the agent runs them."""
    cfg = load_config(site.config, check_profiles=False)
    async with Outbox.open(cfg.outbox_path) as ob, _serving(cfg, ob) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def _serving(cfg: AgentConfig, ob: Outbox) -> AsyncIterator[AgentRuntime]:
    async with running_uplink(GW, ob, cfg.mqtt) as up:
        runtime = AgentRuntime(config=cfg, boot_id="b", started_ms=0, uplink=up, outbox=ob)
        server = asyncio.create_task(
            ControlServer(cfg.control_socket_path, ControlOps(runtime)).serve())
        try:
            yield runtime
        finally:
            server.cancel()
            await asyncio.wait((server,))


def _refusal_counts(collector: AgentCollector) -> dict[str, float]:
    family = next(f for f in collector.collect()
                  if f.name == "fieldlink_edge_uplink_connect_refusals")
    return {s.labels["cause"]: s.value for s in family.samples}


async def test_a_revoked_gateway_is_refused_and_backs_off_as_a_refusal(tmp_path: Path) -> None:
    """Under TLS 1.3 the uplink of a gateway the CRL revokes classifies each attempt as a
    certificate refusal (counted, none a path failure, so the full back-off), logs one
    WARNING naming the cause, and `status`, `doctor` and /metrics say so alike."""
    with revoked_site(tmp_path, "tlsv1.3") as site:
        with structlog.testing.capture_logs() as logs:
            async with running(site) as runtime:
                up = runtime.uplink
                assert up is not None
                await until(lambda: up.session.refusals.get(Refusal.CERTIFICATE, 0) >= 3,
                            "three refused attempts")
                assert up.session.path_failures == 0 and not up.connected, [
                    e for e in logs if e.get("cause") == "path"]
                assert up.session.refused is Refusal.CERTIFICATE
                assert up.refused == BrokerRefusal(Refusal.CERTIFICATE, REFUSED)
                collector = AgentCollector()
                collector.snapshot = await take_snapshot(runtime)
                assert _refusal_counts(collector)["certificate"] >= 3
                assert _refusal_counts(collector)["connack"] == 0
                status = await asyncio.to_thread(
                    CliRunner().invoke, edge_cli, ["status", "-c", str(site.config), "--json"])
                checks = {c.name: c for c in await asyncio.to_thread(run_checks, site.config)}
                assert runtime.outbox is not None
                saved = await runtime.outbox.get_meta("uplink_refused")
            assert json.loads(saved or "{}") == REFUSED_JSON
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["uplink"]["refused"] == REFUSED_JSON
    broker = checks[f"broker 127.0.0.1:{site.broker.port}"]
    assert (broker.status, broker.detail, broker.hint) == ("fail", REFUSED, CERTIFICATE_HINT)
    uplink = checks["agent uplink"]
    assert (uplink.status, uplink.detail, uplink.hint) == ("fail", REFUSED, CERTIFICATE_HINT)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["cause"], e["error"]) for e in warnings] == [
        ("mqtt_disconnected", "certificate", REFUSED)]
    retries = [e for e in logs if e["event"] == "mqtt_connect_failed"]
    assert retries and all(e["cause"] == "certificate" and not e["path_down"] for e in retries)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_a_gateway_revoked_while_connected_says_so_once_the_broker_is_back(
        tmp_path: Path) -> None:
    """Connected, then revoked and the broker restarted: the outage starts as a dropped
    connection (one WARNING) and the refusal that follows is named in one more WARNING, not
    lost among the DEBUG retries; the refusals are counted as such, and forgotten once a new
    certificate connects."""
    with revoked_site(tmp_path, "tlsv1.3", revoked=False) as site:
        with structlog.testing.capture_logs() as logs:
            async with running(site) as runtime:
                up = runtime.uplink
                assert up is not None
                await until(lambda: up.connected, "connected before the revocation")
                await asyncio.to_thread(site.revoke)
                await until(lambda: up.session.refusals.get(Refusal.CERTIFICATE, 0) >= 3,
                            "three refused attempts")
                assert up.refused == BrokerRefusal(Refusal.CERTIFICATE, REFUSED)
                assert runtime.outbox is not None
                assert json.loads(await runtime.outbox.get_meta("uplink_refused") or "{}") \
                    == REFUSED_JSON
                # Enrolled again: a new certificate in the same files; once connected the
                # refusal is gone, from status and from the outbox alike.
                await asyncio.to_thread(issue, site.ca, GW, site.cert, site.key)
                await until(lambda: up.connected, "connected with the new certificate")
                assert up.refused is None
                ob = runtime.outbox

                async def forgotten() -> bool:  # written by the connect, after `connected`
                    return await ob.get_meta("uplink_refused") == ""

                await until(forgotten, "the refusal forgotten in the outbox")
    warnings = [(e["event"], e["cause"]) for e in logs if e["log_level"] == "warning"]
    assert warnings == [("mqtt_disconnected", "dropped"), ("mqtt_refused", "certificate")]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_an_alert_lost_to_a_reset_keeps_the_refusal(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other attempt's alert is lost (its read ends in an EOF, as when the broker resets
    a connection with our CONNECT unread): each such attempt is the refusal again, so the
    state, the counts and the back-off stay those of a certificate refusal."""
    hear = AlertCatcher.log
    reads: list[int] = []  # TLS errors heard, one item each

    def lossy(self: AlertCatcher, level: int, msg: object, *args: Any, **kw: Any) -> None:
        if any(isinstance(a, ssl.SSLError) for a in args):
            reads.append(1)
        if len(reads) % 2 == 0 and any(isinstance(a, ssl.SSLError) for a in args):
            args = tuple(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
                         if isinstance(a, ssl.SSLError) else a for a in args)
        hear(self, level, msg, *args, **kw)

    monkeypatch.setattr(AlertCatcher, "log", lossy)
    with revoked_site(tmp_path, "tlsv1.3") as site:
        async with running(site) as runtime:
            up = runtime.uplink
            assert up is not None
            await until(lambda: len(reads) >= 8, "four alerts and four lost ones")
            assert up.session.path_failures == 0 and up.session.refused is Refusal.CERTIFICATE
            assert up.refused == BrokerRefusal(Refusal.CERTIFICATE, REFUSED)


def _rogue(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for the same CN from a CA the broker does not trust."""
    cert, key, _ = _issue(load_or_create_ca(tmp_path / "rogue-pki"), tmp_path / "rogue")
    return cert, key


@pytest.mark.parametrize("case, tls_version, client_max, alert", [
    ("revoked", "tlsv1.3", None, "SSLV3_ALERT_CERTIFICATE_REVOKED"),
    ("revoked", None, ssl.TLSVersion.TLSv1_2, "SSLV3_ALERT_CERTIFICATE_REVOKED"),
    ("untrusted", "tlsv1.3", None, "TLSV1_ALERT_UNKNOWN_CA"),
])
async def test_an_attempt_with_a_refused_certificate_fails_at_once_as_a_refusal(
        tmp_path: Path, case: str, tls_version: str | None,
        client_max: ssl.TLSVersion | None, alert: str) -> None:
    """A revoked or untrusted certificate fails the attempt with `CertificateRefusedError`
    naming the alert, whether TLS 1.3 reports it after the handshake or TLS 1.2 in it (not
    with "no CONNACK" at the end of its CONNACK timeout). Under TLS 1.3 the broker may close
    before our read takes its alert in (seen under load): such an attempt fails at once as
    `TlsClosedError`, and the next one names the alert."""
    with revoked_site(tmp_path, tls_version) as site:
        cert, key = (site.cert, site.key) if case == "revoked" else _rogue(tmp_path)
        ctx = client_tls_context(site.ca.cert_path, cert, key)
        if client_max is not None:
            ctx.maximum_version = client_max
        heard: str | None = None  # the alert named; not the error, which holds the socket
        for _attempt in range(5):
            client: Any = Client("127.0.0.1", site.broker.port, identifier=GW,
                                 tls_context=ctx, timeout=5, connect_timeout=5)
            with pytest.raises((CertificateRefusedError, TlsClosedError)) as info:
                async with client:
                    pass
            if isinstance(info.value, CertificateRefusedError):
                heard = info.value.alert
                break
        del client, info  # so that the collection below frees every attempt's socket
        assert _unclosed_sockets_collected() == [], "an attempt left its socket open"
    assert heard == alert, "five attempts and not one heard the alert"


def _unclosed_sockets_collected() -> list[str]:
    """What a collection now says it closed for its owners: paho 2.2 does not close the socket
    of a handshake that failed, and the error's frames hold it (`runtime.mqtt.Client` does)."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in said if issubclass(w.category, ResourceWarning)]


async def test_an_attempt_that_refuses_the_brokers_certificate_closes_its_socket(
        tmp_path: Path) -> None:
    """A handshake that we end (the broker's certificate from a CA we do not trust) fails
    the attempt as a TLS refusal with its socket closed, not left for the collector."""
    with revoked_site(tmp_path, "tlsv1.3", revoked=False) as site:
        rogue = load_or_create_ca(tmp_path / "rogue-pki")
        client: Any = Client("127.0.0.1", site.broker.port, identifier=GW,
                             tls_context=client_tls_context(rogue.cert_path, site.cert, site.key),
                             timeout=5, connect_timeout=5)
        with pytest.raises(aiomqtt.MqttError) as info:
            async with client:
                pass
        assert refusal_of(info.value) is Refusal.TLS
        del client, info
        assert _unclosed_sockets_collected() == []


async def test_central_ingest_counts_a_refused_certificate(tmp_path: Path) -> None:
    """Central's ingest shares the session: its own certificate refused (here one the CRL
    revokes) is counted by cause in central's /metrics, not taken for a path failure."""
    with revoked_site(tmp_path, "tlsv1.3") as site:
        settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", mqtt_host="127.0.0.1",
                            mqtt_port=site.broker.port, mqtt_client_id="central-revoked",
                            mqtt_tls_ca=str(site.ca.cert_path), mqtt_tls_cert=str(site.cert),
                            mqtt_tls_key=str(site.key))
        metrics = Metrics()
        async with open_storage(settings.db_url) as storage:
            ingest = Ingest(settings, storage, metrics)
            task = asyncio.create_task(ingest.run())
            try:
                await until(lambda: metrics.mqtt_connect_refusals[Refusal.CERTIFICATE] >= 2,
                            "two refused attempts")
            finally:
                task.cancel()
                await asyncio.wait((task,))
    assert ingest.session.path_failures == 0 and not ingest.connected
    text = metrics.render()
    assert 'fieldlink_central_mqtt_connect_refusals_total{cause="connack"} 0.0' in text
    assert 'fieldlink_central_mqtt_connect_refusals_total{cause="certificate"}' in text


def test_an_alert_logged_after_the_loop_closed_is_dropped() -> None:
    """paho's thread may log a TLS error while central or the agent shuts down, after the
    loop has closed: the catcher drops it instead of raising in paho's thread."""
    async def make() -> AlertCatcher:
        return AlertCatcher(logging.getLogger("test.alert_catcher"))

    loop = asyncio.new_event_loop()
    catcher = loop.run_until_complete(make())
    loop.close()
    catcher.warning("failed to receive on socket: %s", ssl.SSLError(1, "closed"))
