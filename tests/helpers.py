"""Helpers for the tests: a private Mosquitto, free ports, waiting, a device client's inbox, and
the codec tests' inputs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import serial
from hypothesis import strategies as st

from protocols.stream import ByteStream, NeedData, decoded

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


_handed_out: set[int] = set()


class FakeClock:
    """A monotonic clock the test moves by hand (`now`), so service intervals need no
    sleeping: pass it where a simulator or a bearer takes `clock=`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A loopback port free now and never handed out before by this process: two children
    given ports before either binds must not get the same one (the kernel may offer a just
    closed port again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


async def until(check: Callable[[], Any], what: str = "condition", *, timeout: float = 10.0,
                interval: float = 0.05) -> Any:
    """`wait_for` on the event loop: await `check()` (a plain or a coroutine function) until it
    gives something truthy, and return that; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, Any], name: str) -> AsyncIterator[asyncio.Task[Any]]:
    """`coro` running in a task named `name` for the block; cancelled and awaited after."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Inbox(Generic[T]):
    """A test's client of a simulated device: what it decoded (`seen`, all of it in order) and
    has not yet taken (`inbox`). `_take` takes the first item that matches, calling the
    client's `_pump()` (read once, hand each decoded item to `_received`) until `timeout`."""

    def __init__(self) -> None:
        self.inbox: list[T] = []
        self.seen: list[T] = []

    def _received(self, item: T) -> None:
        self.inbox.append(item)
        self.seen.append(item)

    async def _pump(self) -> None:
        raise NotImplementedError

    async def _take(self, match: Callable[[T], bool], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            for item in self.inbox:
                if match(item):
                    self.inbox.remove(item)
                    return item
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing matching; received {self.seen}")
            await self._pump()


def garbage_between(frames: Sequence[bytes], garbage: Sequence[bytes]) -> tuple[bytes, int]:
    """A line carrying `frames` with garbage before and between them (six garbage pieces, used
    in turn), and how many garbage bytes it holds: the input of the stream-decoder tests."""
    between = [garbage[0]] + [garbage[i % 5 + 1] for i in range(len(frames))]
    stream = between[0] + b"".join(f + g for f, g in zip(frames, between[1:], strict=True))
    return stream, sum(map(len, between))


def frames_and_errors(next_item: Callable[[], T | NeedData],
                      error: type[E]) -> tuple[list[T], list[E]]:
    """Every frame and every error a stream decoder has in it now, apart: what a codec test
    compares after feeding (`next_item` is the decoder's `next_frame`, `next_sentence`…)."""
    frames: list[T] = []
    errors: list[E] = []
    for item in decoded(next_item, error):
        if isinstance(item, error):
            errors.append(item)
        else:
            frames.append(cast(T, item))
    return frames, errors


def mutate(wire: bytes, data: st.DataObject) -> bytes:
    """`wire` with one to three bytes changed, cut off behind or added, as `data` draws them:
    the input of a codec's "bad bytes raise only its own error" property."""
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        match data.draw(st.sampled_from(["set", "cut", "add"])):
            case "set":
                mutated[index] = data.draw(st.integers(0, 255))
            case "cut":
                del mutated[max(index, 1):]
            case _:
                mutated.insert(index, data.draw(st.integers(0, 255)))
    return bytes(mutated)


def chunks(stream: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """`stream` cut into pieces of `sizes` (taken in turn, cycling), as reads off a line."""
    at, i = 0, 0
    while at < len(stream):
        size = sizes[i % len(sizes)]
        yield stream[at : at + size]
        at, i = at + size, i + 1


def frames_from_chunks(decoder: ByteStream, next_item: Callable[[], T | NeedData],
                       error: type[Exception], stream: bytes, sizes: Sequence[int]) -> list[T]:
    """The frames `decoder` gives when `stream` comes in pieces of `sizes` and is asked after
    each piece (`next_item` is its `next_frame`…); errors are left out."""
    frames: list[T] = []
    for piece in chunks(stream, sizes):
        decoder.feed(piece)
        frames += frames_and_errors(next_item, error)[0]
    return frames


@contextlib.asynccontextmanager
async def serial_port(path: str, *, timeout: float = 0.1) -> AsyncIterator[serial.Serial]:
    """`path` (a simulator's pty) opened with pyserial at 115200 baud as the agent opens a
    device, for the block; opened and closed in a thread, off the event loop."""
    port = await asyncio.to_thread(serial.Serial, path, 115200, timeout=timeout)
    try:
        yield port
    finally:
        await asyncio.to_thread(port.close)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """A private Mosquitto on a free loopback port that a test can SIGKILL and restart.

    Example::

        broker = Mosquitto(tmp_path / "mq", extra="allow_anonymous false\n")
        broker.start()
    """

    def __init__(self, workdir: Path, port: int | None = None, *, conf: Path | None = None,
                 extra: str = "") -> None:
        """The test config is written in `workdir` (created if need be), with `extra` lines
        at its end: Mosquitto takes the last value of a setting named twice, so they may
        override it (`allow_anonymous false`). `conf`: the caller's own config file instead
        (it must listen on `port`), as `central broker-config` writes one."""
        assert conf is None or not extra, "extra lines go into the test config, not `conf`"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if conf is not None:
            self.conf = conf
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\n"
            + extra
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.host, self.port), timeout=10, what="mosquitto to listen")

    def kill(self) -> None:
        """SIGKILL: the broker loses every queued and in-flight message."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class AgentProcess:
    """`edge-agent run -c config` as a process of its own, which a test starts, SIGKILLs and
    starts again; on leaving the block one still running is killed.

    Example::

        with AgentProcess(site) as agent:
            agent.start()
            ...
            agent.kill()
            agent.start()
            assert agent.stop() == 0
    """

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "-c", str(self.config)],
            env=python_env(), cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL: no clean-up of the agent's runs (what it keeps is what it had kept)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def python_env() -> dict[str, str]:
    """Environment for child Python processes: the repo importable, unbuffered output."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env
