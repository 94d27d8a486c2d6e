"""Central's lifespan (`central.app._start`): start-up on one exit stack, and the order in which
central subscribes and announces itself online, against a real Mosquitto and real SQLite."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

import central.app
from central.app import create_app
from central.config.settings import Settings
from central.storage import Storage, StorageError
from protocols import topics
from tests.helpers import Mosquitto, until


def _settings(tmp_path: Path, broker: Mosquitto) -> Settings:
    return Settings(db_url=f"sqlite:///{tmp_path}/c.db", mqtt_host=broker.host,
                    mqtt_port=broker.port, mqtt_client_id=f"c-{uuid.uuid4().hex[:8]}")


async def test_a_start_up_failing_half_way_stops_its_tasks_and_closes_storage(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A starter that fails after the dispatcher and the alarm rules are running leaves no task
    running and the storage closed, and the failure reaches the caller."""
    opened: list[Storage] = []
    real_open = central.app.open_storage

    def recording_open(url: str, **kw: Any) -> Storage:
        storage = real_open(url, **kw)
        opened.append(storage)
        return storage

    def failing_history(*args: Any, **kw: Any) -> None:
        started = {t.get_name() for t in asyncio.all_tasks()}
        assert {"commands.dispatch", "alarms.rules"} <= started  # half-way indeed
        raise StorageError("injected: history cannot start")

    monkeypatch.setattr(central.app, "open_storage", recording_open)
    monkeypatch.setattr(central.app, "start_history", failing_history)
    before = asyncio.all_tasks()
    app = create_app(_settings(tmp_path, mosquitto))
    with pytest.raises(StorageError, match="injected"):
        async with app.router.lifespan_context(app):
            pytest.fail("the lifespan must not start")
    (storage,) = opened
    assert not await storage.ping()  # closed
    await asyncio.sleep(0)  # let cancelled tasks finish their callbacks
    left = [t for t in asyncio.all_tasks() - before if not t.done()
            and t is not asyncio.current_task()]
    assert not left, [t.get_name() for t in left]


async def test_central_subscribes_before_it_announces_itself_online(tmp_path: Path) -> None:
    """The broker receives ingest's SUBSCRIBE before the retained online state, so a gateway
    that acts on that state publishes into a subscription that is already there."""
    # The broker's debug log says in which order it received the packets. (`user root`: it
    # keeps the right to write its log in the test's private directory when run as root.)
    mosquitto = Mosquitto(tmp_path / "broker", extra="user root\nlog_type debug\n")
    mosquitto.start()
    try:
        settings = _settings(tmp_path, mosquitto)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await until(lambda: app.state.ingest.connected, "central subscribed")
    finally:
        mosquitto.stop()
    cid = re.escape(settings.mqtt_client_id)
    events = [line for line in mosquitto.log.read_text().splitlines()
              if re.search(rf"Received SUBSCRIBE from {cid}$", line)
              or re.search(rf"Received PUBLISH from {cid} \(d0, q1, r1, m\d+, "
                           rf"'{re.escape(topics.CENTRAL_STATE)}'", line)]
    assert len(events) >= 2, events
    assert "SUBSCRIBE" in events[0], events
