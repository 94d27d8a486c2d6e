"""runtime.mqtt: one MQTT session across a broker restart and a cut link (a real Mosquitto,
a real loopback proxy), how it retries, and that a stop is never lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from runtime.mqtt import Client, Endpoint, MqttSession, until_disconnected
from runtime.tasks import Backoff
from tests.helpers import Mosquitto, until
from tests.netproxy import LinkProxy


def _session(port: int, connect_timeout_s: float = 1.0, **kw: Any) -> MqttSession:
    endpoint = Endpoint("127.0.0.1", port, client_id=f"s-{uuid.uuid4().hex[:8]}",
                        connect_timeout_s=connect_timeout_s)
    return MqttSession(endpoint, name="test", **kw)


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel once, as a TaskGroup or `runtime.tasks.stop` does, and wait (bounded: a lost
    cancel fails the test instead of hanging it)."""
    task.cancel()
    done, _ = await asyncio.wait((task,), timeout=15)
    assert task in done, "the session did not stop on its cancel"


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
        session = _session(mosquitto.port, backoff=Backoff(0.1, 0.3, healthy_after_s=0))
        task = asyncio.create_task(session.run(serve, on_down=on_down))
        try:
            await until(lambda: len(served) == 1, "first connection")
            mosquitto.kill()
            await until(lambda: len(downs) >= 3, "several failed attempts while it is down")
            mosquitto.start()
            await until(lambda: len(served) == 2, "reconnected")
        finally:
            await _stop(task)
    assert downs[0] and not any(downs[1:])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["mqtt_disconnected"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["mqtt_connected"] * 2


def _retries(logs: Sequence[MutableMapping[str, Any]]) -> list[tuple[bool, float]]:
    return [(e["path_down"], e["retry_in_s"]) for e in logs if e["event"] == "mqtt_connect_failed"]


@contextlib.asynccontextmanager
async def on_a_cut_link(mosquitto: Mosquitto, **session_kw: Any) -> AsyncIterator[
        tuple[LinkProxy, list[MutableMapping[str, Any]], asyncio.Event]]:
    """A session running through a proxy whose link is cut (drop): the proxy, the session's
    logs, and an event set when it serves."""
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    proxy.set_mode("drop")
    served = asyncio.Event()

    async def serve(client: aiomqtt.Client) -> None:
        served.set()
        await until_disconnected(client)

    try:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(_session(proxy.port, **session_kw).run(serve))
            try:
                yield proxy, logs, served
            finally:
                await _stop(task)
    finally:
        proxy.stop()


async def test_a_cut_link_is_retried_within_the_link_cap_and_noticed_when_it_returns(
        mosquitto: Mosquitto) -> None:
    """Connections the link closes before CONNACK are failures of the path: retried within
    `link_retry_max_s` however long the back-off has grown, and the session connects once
    the link passes again."""
    async with on_a_cut_link(mosquitto, backoff=Backoff(0.1, 30.0, healthy_after_s=0),
                             link_retry_max_s=0.2) as (proxy, logs, served):
        await until(lambda: len(_retries(logs)) >= 4, "attempts on the cut link", timeout=20)
        proxy.set_mode("pass")
        async with asyncio.timeout(10):
            await served.wait()
    retries = _retries(logs)
    assert all(path_down and retry <= 0.2 for path_down, retry in retries), retries


async def test_a_slow_path_is_waited_for_after_one_cut_attempt(mosquitto: Mosquitto) -> None:
    """While the path is down an attempt waits for CONNACK only briefly (a connection the link
    closed looks the same as a slow one); an attempt that connects after that wait makes the
    next wait long enough, so a slow link is not cut short for ever."""
    async with on_a_cut_link(mosquitto, connect_timeout_s=3.0,
                             link_retry_max_s=0.1) as (proxy, logs, served):
        await until(lambda: _retries(logs), "the path found down", timeout=20)
        proxy.set_mode("slow", delay_s=0.4)  # CONNACK after ~0.8 s: past 0.5 s
        async with asyncio.timeout(15):
            await served.wait()
    assert any("no CONNACK within 0.5 s" in e.get("error", "") for e in logs)


async def test_a_broker_that_refuses_gets_the_full_back_off(tmp_path: Path) -> None:
    """A CONNACK refusal is the broker's answer, not the path's: the back-off doubles past
    the link cap up to its own maximum."""
    broker = Mosquitto(tmp_path / "broker", extra="allow_anonymous false\n")
    broker.start()
    try:
        with structlog.testing.capture_logs() as logs:
            session = _session(broker.port, backoff=Backoff(0.05, 0.4, healthy_after_s=0,
                                                            jitter=0),
                               link_retry_max_s=0.05)
            task = asyncio.create_task(session.run(until_disconnected))
            try:
                await until(lambda: len(_retries(logs)) >= 4, "refused attempts", timeout=20)
            finally:
                await _stop(task)
    finally:
        broker.stop()
    assert _retries(logs)[:4] == [(False, 0.1), (False, 0.2), (False, 0.4), (False, 0.4)]
    first = next(e for e in logs if e["event"] == "mqtt_disconnected")
    assert (first["log_level"], first["retry_in_s"]) == ("warning", 0.05)


@contextlib.contextmanager
def cancel_when_puback_confirmed(target: asyncio.Task[Any]) -> Iterator[list[bool]]:
    """Fault injection: cancel `target` in the very loop turn in which the broker's PUBACK
    completes the publish that is waiting for it — the race Python 3.11's `asyncio.wait_for`
    loses (it returns the result and drops the cancel). aiomqtt waits for a PUBACK on an
    `asyncio.Event` wrapped in a task by `wait_for`; a task factory puts the cancel right
    behind `wait_for`'s own wake-up on that task. Yields a flag list: hooked, fired."""
    loop = asyncio.get_running_loop()
    seen: list[bool] = []

    def fire(_: asyncio.Task[Any]) -> None:
        seen.append(True)
        target.cancel()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        if not seen and getattr(coro, "__qualname__", "") == "Event.wait":
            seen.append(True)
            task.add_done_callback(fire)
        return task

    loop.set_task_factory(factory)
    try:
        yield seen
    finally:
        loop.set_task_factory(None)


async def test_a_cancel_that_lands_with_the_puback_is_raised_by_publish(
        mosquitto: Mosquitto) -> None:
    """The cancel comes in the loop turn of the PUBACK: `Client.publish` raises it instead of
    returning (a caller that went on to wait for messages would never stop)."""
    returned = []

    async def publish_and_wait(client: Client) -> None:
        await client.publish(f"t/{uuid.uuid4().hex}", b"x", qos=1)
        returned.append(True)
        await asyncio.sleep(60)

    async with Client(mosquitto.host, mosquitto.port, identifier=f"c-{uuid.uuid4().hex[:8]}",
                      protocol=aiomqtt.ProtocolVersion.V311) as client:
        task = asyncio.create_task(publish_and_wait(client))
        with cancel_when_puback_confirmed(task) as fired:
            done, _ = await asyncio.wait((task,), timeout=10)
    assert fired == [True, True], "the fault was not injected: aiomqtt's publish changed?"
    assert task in done and task.cancelled()
    assert not returned


async def test_a_stop_that_lands_with_a_puback_stops_the_session(mosquitto: Mosquitto) -> None:
    """The session's task is cancelled in the loop turn in which `serve`'s publish completes:
    the session stops (before, serve went on to wait for messages and the stop hung)."""
    session = _session(mosquitto.port)

    async def serve(client: aiomqtt.Client) -> None:
        await client.publish(f"t/{uuid.uuid4().hex}", b"x", qos=1)
        await until_disconnected(client)

    task = asyncio.create_task(session.run(serve))
    with cancel_when_puback_confirmed(task) as fired:
        done, _ = await asyncio.wait((task,), timeout=10)
    assert fired == [True, True]
    assert task in done and task.cancelled()


async def test_a_serve_whose_task_group_fails_leaves_the_session_cancel_count_alone(
        mosquitto: Mosquitto) -> None:
    """Python 3.11's TaskGroup leaves its parent's cancel count raised when a child fails
    while the parent waits in `__aexit__` (as the uplink's and the commands' serve do when the
    link drops). That count must not be the session's: where `asyncio.timeout` compares it
    with zero (Debian's 3.11.2, which the packages run on) the next CONNACK timeout would
    stop the session for good, and a stop check on it would stop it at the first outage."""
    served: list[bool] = []

    async def serve(client: aiomqtt.Client) -> None:
        served.append(True)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(until_disconnected(client))

    session = _session(mosquitto.port, backoff=Backoff(0.1, 0.3, healthy_after_s=0))
    task = asyncio.create_task(session.run(serve))
    try:
        await until(lambda: served, "connected")
        mosquitto.kill()
        mosquitto.start()
        await until(lambda: len(served) == 2, "reconnected")
        assert task.cancelling() == 0
    finally:
        await _stop(task)


async def test_a_reset_link_is_no_library_warning_or_error(
        mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    """A connection reset (RST) makes paho log "failed to receive on socket" at ERROR through
    aiomqtt's logger; the session's client logs it at DEBUG: the outage is the session's one
    WARNING."""
    caplog.set_level(logging.DEBUG)
    proxy = LinkProxy(mosquitto.host, mosquitto.port)
    proxy.start()
    served: list[bool] = []

    async def serve(client: aiomqtt.Client) -> None:
        served.append(True)
        await until_disconnected(client)

    try:
        session = _session(proxy.port, backoff=Backoff(0.1, 0.3, healthy_after_s=0))
        task = asyncio.create_task(session.run(serve))
        try:
            await until(lambda: served, "connected")
            proxy.reset()
            await until(lambda: len(served) == 2, "reconnected after the reset")
        finally:
            await _stop(task)
    finally:
        proxy.stop()
    assert any(r.getMessage().startswith("failed to receive on socket") for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_socket_registration_that_lost_the_race_is_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """asyncio's report of aiomqtt's socket callback run on a socket the link had closed (its
    message names the callback; the error is EBADF or an invalid descriptor) is DEBUG; any
    other callback's failure stays an ERROR."""
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    raced = ("Exception in callback BaseSelectorEventLoop.add_writer(9, <function "
             "Client._on_socket_register_write.<locals>.callback at 0x7f0>)")
    loop.call_exception_handler({"message": raced, "exception": OSError(9, "Bad file descriptor")})
    loop.call_exception_handler({"message": "Exception in callback other()",
                                 "exception": OSError(9, "Bad file descriptor")})
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "Exception in callback other()"]
