"""runtime.mqtt: one MQTT session across a broker restart (a real Mosquitto)."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import structlog

from runtime.mqtt import Endpoint, MqttSession
from runtime.tasks import Backoff
from tests.helpers import Mosquitto, until


async def test_a_broker_restart_is_one_warning_and_the_session_comes_back(
        mosquitto: Mosquitto) -> None:
    """Killing the broker ends the session's `serve` with MqttError; the outage is logged once
    at WARNING however many attempts fail, never at ERROR, and the session reconnects and
    serves again when the broker is back."""
    served: list[aiomqtt.Client] = []
    downs: list[bool] = []

    async def serve(client: aiomqtt.Client) -> None:
        served.append(client)
        await client.subscribe(f"t/{uuid.uuid4().hex}", qos=1)
        async for _ in client.messages:
            pass

    async def on_down(exc: aiomqtt.MqttError, first: bool) -> None:
        downs.append(first)

    with structlog.testing.capture_logs() as logs:
        session = MqttSession(Endpoint(mosquitto.host, mosquitto.port,
                                       client_id=f"s-{uuid.uuid4().hex[:8]}"),
                              name="test", backoff=Backoff(0.1, 0.3, healthy_after_s=0))
        task = asyncio.create_task(session.run(serve, on_down=on_down))
        try:
            await until(lambda: len(served) == 1, "first connection")
            mosquitto.kill()
            await until(lambda: len(downs) >= 3, "several failed attempts while it is down")
            mosquitto.start()
            await until(lambda: len(served) == 2, "reconnected")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert downs[0] and not any(downs[1:])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["mqtt_disconnected"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["mqtt_connected"] * 2
