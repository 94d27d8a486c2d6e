"""Brokers that authenticate by password (EMQX-style, DESIGN.md §8): the gateway's
`[mqtt] username/password` and central's `mqtt_username/mqtt_password` reach a real Mosquitto
that refuses anonymous clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from central.app import create_app
from central.config.settings import Settings
from edge_agent.config.site import load_config
from edge_agent.outbox.store import NewRecord, Outbox
from edge_agent.uplink.link import Uplink
from protocols.envelope import Birth, RecordKind
from tests.helpers import Mosquitto, until
from tests.identity import authorize


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    workdir = tmp_path / "mq"
    workdir.mkdir()
    passwd = workdir / "passwd"
    passwd.touch(mode=0o600)
    for user, password in (("gw-p", "gw-secret"), ("central", "central-secret")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    # Started as root, Mosquitto drops to `mosquitto`, which cannot read the test's folder.
    user = "user root\n" if os.geteuid() == 0 else ""
    broker = Mosquitto(workdir, extra=f"{user}allow_anonymous false\npassword_file {passwd}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_gateway_and_central_log_in_with_passwords(password_broker: Mosquitto,
                                                         tmp_path: Path) -> None:
    """With the right credentials records flow gateway → central → ack; a wrong password
    gets no connection."""
    b = password_broker
    site = tmp_path / "site.toml"

    def write_site(password: str) -> None:
        site.write_text(f'[gateway]\nid = "gw-p"\ndata_dir = "data"\n\n[mqtt]\nhost = "{b.host}"\n'
                        f'port = {b.port}\nusername = "gw-p"\npassword = "{password}"\n')

    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", mqtt_host=b.host, mqtt_port=b.port,
                        mqtt_client_id=f"c-{uuid.uuid4().hex[:6]}", mqtt_username="central",
                        mqtt_password="central-secret")
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await until(lambda: app.state.ingest.connected, "central logged in")
        await authorize(app, c)
        for password, works in (("wrong", False), ("gw-secret", True)):
            write_site(password)
            cfg = load_config(site, check_profiles=False)
            async with Outbox.open(tmp_path / f"{password}.db") as ob:
                mqtt = cfg.mqtt.model_copy(update={"reconnect_max_s": 0.5,
                                                   "backlog_batch_size": 500})
                up = Uplink(gw="gw-p", outbox=ob, mqtt=mqtt, boot_id="b", version="0",
                            birth=Birth(gw="gw-p", stream="", boot_id="", version=""))
                task = asyncio.create_task(up.run())
                try:
                    await ob.append([NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i,
                                               "d/t", float(i)) for i in range(5)])
                    if works:
                        await until(lambda up=up: up.counters.records_acked == 5, "records acked")
                    else:
                        await asyncio.sleep(2)
                        assert up.counters.connects == 0 and not up.connected
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        d = (await c.get("/api/gateways/gw-p/delivery")).json()
        assert sum(s["held"] for s in d["streams"]) == 5
