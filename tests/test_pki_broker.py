"""Issue 9 point 1 on a real Mosquitto started from `central broker-config` (DESIGN.md §8):
gateways enrolled with `edge-agent enroll` deliver to central over mutual TLS; the broker's
ACLs keep each gateway to its own topics; an unenrolled client cannot connect; a revoked one
cannot reconnect; a forged ack deletes nothing at the edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from central.app import create_app
from central.cli import app as central_cli
from central.config.settings import Settings
from central.identity.ca import load_or_create_ca, new_key_and_csr, write_private, write_public
from edge_agent.cli.app import app as edge_cli
from edge_agent.config.site import load_config
from edge_agent.outbox.store import NewRecord, Outbox
from edge_agent.uplink.link import Uplink
from protocols import topics
from protocols.envelope import Ack, RecordKind, encode
from tests.helpers import Mosquitto, free_port, until
from tests.identity import bearer, ensure_user
from tests.mtls import can_connect
from tests.uplinks import running_uplink

pytestmark = pytest.mark.e2e
NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87


@dataclass
class Site:
    """Central (HTTP + mTLS ingest) and a broker from `central broker-config`."""

    root: Path
    db: str
    pki: Path
    broker: Mosquitto
    central_port: int
    http_url: str
    central_tls: dict[str, Path]
    settings: Settings
    server: uvicorn.Server
    task: asyncio.Task[None]
    headers: dict[str, str] = field(default_factory=dict)  # a logged-in admin's bearer token

    async def stop_central(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def cli(self, *args: str) -> Any:
        res = CliRunner().invoke(central_cli, [*args, "--db", self.db, "--pki-dir", str(self.pki),
                                               "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout.strip().splitlines()[-1])

    def site_toml(self, gw: str) -> Path:
        path = self.root / gw / "site.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'[gateway]\nid = "{gw}"\ndata_dir = "data"\n\n'
                        f'[mqtt]\nhost = "127.0.0.1"\nport = {self.broker.port}\n'
                        "ack_timeout_s = 30\n")
        return path


def _broker_config(root: Path, db: str, pki: Path, port: int, central_port: int) -> Path:
    out = root / "broker"
    args = ["broker-config", "--out", str(out), "--host", "127.0.0.1", "--host", "localhost",
            "--port", str(port), "--bind", "127.0.0.1", "--central-port", str(central_port),
            "--db", db, "--pki-dir", str(pki)]
    if os.geteuid() == 0:
        args += ["--user", "root"]  # Mosquitto started as root drops to `mosquitto` otherwise
    res = CliRunner().invoke(central_cli, args)
    assert res.exit_code == 0, res.output
    conf = out / "mosquitto.conf"
    text = conf.read_text()
    assert "allow_anonymous false" in text and "require_certificate true" in text
    assert "use_identity_as_username true" in text and "crlfile" in text
    acl = (out / "acl").read_text()
    assert "pattern write fieldlink/v1/%u/up/#" in acl
    assert "pattern read fieldlink/v1/%u/down/#" in acl
    # Every gateway reads central's online state (it resends on central's return), and no more.
    assert [line for line in acl.splitlines() if line.startswith("pattern ")] == [
        "pattern write fieldlink/v1/%u/up/#", "pattern read fieldlink/v1/%u/down/#",
        f"pattern read {topics.CENTRAL_STATE}"]
    with conf.open("a") as f:  # the test's own log, beside the production config
        f.write(f"log_dest file {root / 'broker' / 'mosquitto.log'}\n")
    return conf


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    db, pki = f"sqlite:///{tmp_path}/central.db", tmp_path / "pki"
    load_or_create_ca(pki)
    port, central_port, http_port = free_port(), free_port(), free_port()
    conf = _broker_config(tmp_path, db, pki, port, central_port)
    res = CliRunner().invoke(central_cli, ["ca", "central-cert", "--out", str(tmp_path / "ctls"),
                                           "--db", db, "--pki-dir", str(pki), "--json"])
    assert res.exit_code == 0, res.output
    tls = {k: Path(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    broker = Mosquitto(tmp_path / "mq", port=port, conf=conf)  # its start/stop, our config
    broker.start()
    settings = Settings(db_url=db, pki_dir=pki, mqtt_host="127.0.0.1", mqtt_port=central_port,
                        mqtt_tls_ca=tls["mqtt_tls_ca"], mqtt_tls_cert=tls["mqtt_tls_cert"],
                        mqtt_tls_key=tls["mqtt_tls_key"], http_port=http_port)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1",
                                           port=http_port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started, "central to serve", timeout=20)
        site = Site(tmp_path, db, pki, broker, central_port, f"http://127.0.0.1:{http_port}",
                    tls, settings, server, task)
        await ensure_user(app)
        site.headers = await asyncio.to_thread(bearer, site.http_url)
        await until(lambda: _health(site), "central's mTLS ingest to connect", timeout=20)
        yield site
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        broker.stop()


async def _health(site: Site) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        r = await http.get(f"{site.http_url}/api/health")
    return bool(r.status_code == 200 and r.json()["mqtt_connected"])


@dataclass
class Gateway:
    gw: str
    config: Path
    cert: Path
    key: Path
    ca: Path


async def _enrol(site: Site, gw: str) -> Gateway:
    """`central gateway enroll-token GW`, then `edge-agent enroll --json` against central's
    HTTP (token from the environment)."""
    token = (await asyncio.to_thread(site.cli, "gateway", "enroll-token", gw))["token"]
    config = site.site_toml(gw)
    res = await asyncio.to_thread(CliRunner().invoke, edge_cli, [
        "enroll", "-c", str(config), "--central", site.http_url, "--json"],
        env={"FIELDLINK_ENROL_TOKEN": token})
    assert res.exit_code == 0, res.output
    # Central runs in this process: its log lines may land in the captured stdout too.
    printed = res.stdout[res.stdout.index("\n{") + 1 if not res.stdout.startswith("{") else 0:]
    printed = printed[:printed.index("\n}") + 2]
    result = {k: Path(v) if isinstance(v, str) and v.startswith("/") else v
              for k, v in json.loads(printed).items()}
    cfg = load_config(config, check_profiles=False)
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.key == result["key"]
    assert (result["key"].stat().st_mode & 0o777) == 0o600
    assert cfg.commands.central_public_key == str(result["central_public_key"])
    return Gateway(gw, config, result["cert"], result["key"], result["ca"])


@contextlib.asynccontextmanager
async def uplink_of(g: Gateway, **kw: Any) -> AsyncIterator[tuple[Uplink, Outbox]]:
    cfg = load_config(g.config, check_profiles=False)
    assert cfg.mqtt.tls is not None
    async with Outbox.open(cfg.outbox_path) as ob:
        kw.setdefault("backlog_batch_size", kw.get("batch_size", 500))
        mqtt = cfg.mqtt.model_copy(update={"reconnect_max_s": 1.0, **kw})
        async with running_uplink(g.gw, ob, mqtt, boot_id="boot-1") as up:
            yield up, ob


def tel(i: int) -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i, "gas-1/gas_lel", float(i))


@dataclass
class Probe:
    """A paho MQTT 5 client with a given certificate, in its own thread."""

    connected: threading.Event = field(default_factory=threading.Event)
    connect_rc: ReasonCode | None = None
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: list[list[ReasonCode]] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    client: paho.Client | None = None


@contextlib.contextmanager
def probe(port: int, ca: Path, cert: Path | None, key: Path | None,
          client_id: str = "probe") -> Iterator[Probe]:
    p = Probe()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    c.tls_set_context(ctx)

    def on_connect(cl: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        p.connect_rc = rc
        if not rc.is_failure:
            p.connected.set()

    c.on_connect = on_connect
    c.on_publish = lambda cl, u, mid, rc, props: p.pubacks.__setitem__(mid, rc)
    c.on_subscribe = lambda cl, u, mid, rcs, props: p.subacks.append(list(rcs))
    c.on_message = lambda cl, u, m: p.messages.append((m.topic, bytes(m.payload)))
    p.client = c
    try:
        c.connect("127.0.0.1", port, keepalive=10)
        c.loop_start()
        yield p
    finally:
        c.loop_stop()
        with contextlib.suppress(Exception):
            c.disconnect()


async def test_enrolled_gateways_deliver_and_acls_confine_them(site: Site) -> None:
    """A and B enrol and deliver over mTLS; A cannot publish into B's up/ nor read B's down/;
    it reads central's state."""
    a, b = await _enrol(site, "gw-a"), await _enrol(site, "gw-b")
    async with uplink_of(a) as (up_a, ob_a), uplink_of(b) as (up_b, ob_b):
        await ob_a.append([tel(i) for i in range(40)])
        await ob_b.append([tel(i) for i in range(25)])
        await until(lambda: up_a.counters.records_acked == 40 and up_b.counters.records_acked == 25,
                    "both gateways' records acknowledged by central", timeout=30)
        assert up_a.counters.acks_refused == 0 and up_b.counters.acks_refused == 0
        # The production ACL lets the uplink read central's online state.
        assert up_a.central_state is not None and up_a.central_state.online
    async with httpx.AsyncClient(base_url=site.http_url, headers=site.headers) as http:
        for gw, n in (("gw-a", 40), ("gw-b", 25)):
            d = (await http.get(f"/api/gateways/{gw}/delivery")).json()
            assert sum(s["held"] for s in d["streams"]) == n and d["streams"][0]["missing"] == 0

    port = site.broker.port
    with probe(port, a.ca, a.cert, a.key) as pa, \
            probe(site.central_port, site.central_tls["mqtt_tls_ca"],
                  site.central_tls["mqtt_tls_cert"], site.central_tls["mqtt_tls_key"],
                  client_id="central-probe") as pc:
        assert pa.connected.wait(5) and pc.connected.wait(5)
        assert pa.client is not None and pc.client is not None
        pa.client.subscribe([(topics.PREFIX + "/gw-b/down/#", 1), (topics.PREFIX + "/+/down/#", 1),
                             (topics.CENTRAL_STATE, 1)])
        pc.client.subscribe(topics.PREFIX + "/+/up/#", 1)
        await until(lambda: len(pa.subacks) == 1 and len(pc.subacks) == 1, "subacks")
        # A publishes into its own and B's uplink: the broker refuses B's (MQTT 5: 0x87).
        own = pa.client.publish(topics.up("gw-a", "state"), b"own", qos=1).mid
        foreign = pa.client.publish(topics.up("gw-b", "data"), b"forged", qos=1).mid
        await until(lambda: {own, foreign} <= pa.pubacks.keys(), "PUBACKs")
        assert not pa.pubacks[own].is_failure
        assert pa.pubacks[foreign].value == NOT_AUTHORIZED
        # Central writes to both downlinks: only A's reaches A, whatever A subscribed to.
        pc.client.publish(topics.down("gw-b", "cmd"), b"for-b", qos=1)
        pc.client.publish(topics.down("gw-a", "cmd"), b"for-a", qos=1)
        await until(lambda: len(pa.messages) >= 2, "central's state and A's own downlink")
        await asyncio.sleep(0.5)
        assert sorted(t for t, _ in pa.messages) == [topics.CENTRAL_STATE,
                                                     topics.down("gw-a", "cmd")]
        assert (topics.down("gw-a", "cmd"), b"for-a") in pa.messages
        assert (topics.up("gw-a", "state"), b"own") in pc.messages
        assert not [m for m in pc.messages if m[1] == b"forged"]


def _doctor_broker(config: Path) -> str:
    from edge_agent.cli.doctor import run_checks

    return next(c.status for c in run_checks(config) if c.name.startswith("broker "))


async def test_unenrolled_and_revoked_clients_cannot_connect(site: Site) -> None:
    """No certificate, a certificate from another CA, or a revoked one: no session."""
    a, b = await _enrol(site, "gw-a"), await _enrol(site, "gw-b")
    port = site.broker.port
    assert await can_connect(port, a.ca, a.cert, a.key)
    assert not await can_connect(port, a.ca, None, None)
    rogue = load_or_create_ca(site.root / "rogue-pki")  # same CN, wrong issuer
    key_pem, csr_pem = new_key_and_csr("gw-a")
    cert = rogue.issue("gw-a", x509.load_pem_x509_csr(csr_pem).public_key(), days=1)  # type: ignore[arg-type]
    write_private(site.root / "rogue.key", key_pem)
    write_public(site.root / "rogue.crt", cert.public_bytes(serialization.Encoding.PEM))
    assert not await can_connect(port, a.ca, site.root / "rogue.crt", site.root / "rogue.key")

    async with uplink_of(b) as (up_b, ob_b):
        await until(lambda: up_b.connected, "B connected")
        revoked = await asyncio.to_thread(site.cli, "gateway", "revoke", "gw-b")
        assert len(revoked["serials"]) == 1
        # The broker reads the new CRL on SIGHUP (production: systemctl reload mosquitto).
        assert site.broker.proc is not None
        site.broker.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert not await can_connect(port, b.ca, b.cert, b.key)
        assert await can_connect(port, a.ca, a.cert, a.key)
        # `edge-agent doctor` tells the technician, without taking the agent's session.
        assert await asyncio.to_thread(_doctor_broker, a.config) == "pass"
        assert await asyncio.to_thread(_doctor_broker, b.config) == "fail"
        # A restart drops B's open session; B's uplink cannot come back.
        site.broker.stop()
        site.broker.start()
        await ob_b.append([tel(1)])
        await asyncio.sleep(3)
        assert not up_b.connected
    await until(lambda: _health(site), "central back on the restarted broker", timeout=20)


async def test_forged_ack_names_unsent_records_and_deletes_nothing(site: Site) -> None:
    """A client with write access to A's downlink acks seqs A never sent: ignored, counted,
    nothing deleted (the edge's own check, DESIGN.md §8)."""
    a = await _enrol(site, "gw-a")
    await site.stop_central()  # nothing A sends is acknowledged for real
    tls = site.central_tls
    async with uplink_of(a, batch_size=10, max_inflight=1) as (up, ob):
        await ob.append([tel(i) for i in range(60)])
        await until(lambda: up.counters.records_sent == 10, "A's first batch (then it waits)")
        with probe(site.central_port, tls["mqtt_tls_ca"], tls["mqtt_tls_cert"],
                   tls["mqtt_tls_key"], client_id="forger") as forger:
            assert forger.connected.wait(5) and forger.client is not None
            forged = Ack(stream=ob.stream, ranges=((11, 1000),))  # 50 unsent, 940 nonexistent
            forger.client.publish(topics.down("gw-a", "ack"), encode(forged), qos=1)
            await until(lambda: up.counters.acks_refused == 1, "the forged ack screened")
        assert up.counters.ack_records_unsent == 990
        assert up.counters.records_acked == 0
        assert await ob.backlog() == 60  # nothing marked delivered, nothing deleted
        status = await _status_counters(ob, up)
        assert status["acks_refused"] == 1


async def _status_counters(ob: Outbox, up: Uplink) -> dict[str, int]:
    """The counters as `edge-agent status` shows them (from the agent's snapshot)."""
    from edge_agent.cli.app import _ack_counters

    return _ack_counters({}, {"uplink": {k: getattr(up.counters, k) for k in (
        "acks_refused", "ack_records_unsent", "ack_records_duplicate")}})


async def test_edge_renews_before_expiry_and_not_after_revocation(site: Site) -> None:
    """`edge-agent renew` swaps in a new key and certificate that the broker accepts; once
    revoked, renewal is refused and the files stay as they were."""
    from edge_agent.uplink.enrolment import EnrolmentError, renew

    a = await _enrol(site, "gw-a")
    first = x509.load_pem_x509_certificate(a.cert.read_bytes())
    result = await asyncio.to_thread(renew, a.config)  # central's URL from enrolment.json
    second = x509.load_pem_x509_certificate(a.cert.read_bytes())
    assert second.serial_number != first.serial_number and result.cert == a.cert
    assert await can_connect(site.broker.port, a.ca, a.cert, a.key)
    await asyncio.to_thread(site.cli, "gateway", "revoke", "gw-a")
    before = a.key.read_bytes()
    with pytest.raises(EnrolmentError, match="revoked"):
        await asyncio.to_thread(renew, a.config)
    assert a.key.read_bytes() == before


async def test_the_agent_connects_with_the_enrolled_identity(site: Site) -> None:
    """`edge-agent run` on the enrolled config (as written by enroll) comes online at central
    over mutual TLS, with central's key pinned for its commands."""
    from edge_agent.agent import run_agent

    a = await _enrol(site, "gw-a")
    cfg = load_config(a.config, check_profiles=False)
    stop = asyncio.Event()
    agent = asyncio.create_task(run_agent(cfg, stop=stop, install_signal_handlers=False))
    try:
        async def online() -> bool:
            async with httpx.AsyncClient(base_url=site.http_url, headers=site.headers) as http:
                r = await http.get("/api/gateways/gw-a")
                return r.status_code == 200 and bool(r.json()["online"])

        await until(online, "gw-a online at central", timeout=30)
        async with httpx.AsyncClient(base_url=site.http_url, headers=site.headers) as http:
            key = (await http.get("/api/keys/commands")).json()
        pinned = Path(str(cfg.commands.central_public_key)).read_text().strip()
        assert key["public_key"] == pinned
    finally:
        stop.set()
        await asyncio.wait_for(agent, 15)
