"""Real processes for end-to-end tests: simulators, edge agents and central, each its own
process so that a test can SIGKILL any of them."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import free_port, port_open, python_env, wait_for


class Child:
    """One child process with its log file; start, SIGKILL, SIGTERM."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.workdir = workdir
        self.env = dict(env or {})
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, env=python_env() | self.env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def freeze(self, seconds: float) -> None:
        """SIGSTOP for `seconds`, then SIGCONT: alive and connected, answering nothing."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Simulator(Child):
    """`firmware_stubs.modbus_sim` serving profiles on consecutive device ids on one port."""

    def __init__(self, workdir: Path, profiles: Sequence[str], name: str = "sim",
                 control: bool = False) -> None:
        self.ready = workdir / f"{name}.port"
        args = [sys.executable, "-m", "firmware_stubs.modbus_sim", "--port", "0",
                "--ready-file", str(self.ready)]
        for p in profiles:
            args += ["--profile", p]
        self.control_port = free_port() if control else None
        if self.control_port:
            args += ["--control-port", str(self.control_port)]
        super().__init__(name, args, workdir)
        self.port = 0

    def control(self, request: dict[str, object]) -> dict[str, object]:
        """One JSON-lines request on the simulator's control port (to script a value)."""
        assert self.control_port, "started without control=True"
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as conn:
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply: dict[str, object] = json.loads(conn.makefile().readline())
        return reply

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        super().start()
        text = wait_for(lambda: self.ready.exists() and self.ready.read_text().strip(), timeout=20,
                        what=f"{self.name} ready file")
        self.port = int(str(text).split("=")[-1])
        # after the first start, keep the same port across restarts
        self.args = [a if a != "0" else str(self.port) for a in self.args]


@dataclass
class DeviceDef:
    id: str
    profile: str
    unit: int
    poll_interval_s: float | None = None  # None: the agent's default for the test


class Agent(Child):
    """An edge agent process with its own config and data dir."""

    def __init__(self, workdir: Path, gw: str, broker_port: int, sim_port: int,
                 devices: Sequence[DeviceDef], poll_interval_s: float = 0.25,
                 ack_timeout_s: float = 3.0, extra: str = "", device_extra: str = "",
                 mqtt_extra: str = "") -> None:
        self.gw = gw
        self.data_dir = workdir / gw
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.data_dir / "site.toml"
        lines = ["[gateway]", f'id = "{gw}"', f'data_dir = "{self.data_dir}"', "",
                 "[mqtt]", 'host = "127.0.0.1"', f"port = {broker_port}",
                 f"ack_timeout_s = {ack_timeout_s}", mqtt_extra, ""]
        for d in devices:
            lines += ["[[devices]]", f'id = "{d.id}"', f'profile = "{d.profile}"',
                      f'transport = {{ kind = "tcp", host = "127.0.0.1", port = {sim_port} }}',
                      f"device_id = {d.unit}", f"poll_interval_s = {d.poll_interval_s or poll_interval_s}", "",
                      device_extra]
        self.config.write_text("\n".join(lines) + extra)
        super().__init__(f"agent-{gw}", [sys.executable, "-m", "edge_agent", "run", "--config",
                                         str(self.config)], workdir)

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox.db"


# The fake gateways' records are dated 2023 (tests/fakegw.py): central's default retention (raw
# 30 days, 1-minute buckets 400) would purge them at its first pass, a minute after start, and
# keep their 1-hour buckets, so a longer run lost records and its aggregates counted more samples
# than readings (tests/derived.py). The harness's central keeps every record.
KEEP_RECORDS = {"FIELDLINK_CENTRAL_RETENTION_RAW_DAYS": "0",
                "FIELDLINK_CENTRAL_RETENTION_1M_DAYS": "0"}


class Central(Child):
    """`central serve` on a SQLite file, talking to the given broker."""

    def __init__(self, workdir: Path, broker_port: int, db_url: str | None = None,
                 name: str = "central", extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.db_path = workdir / f"{name}.db"
        self.db_url = db_url or f"sqlite:///{self.db_path}"
        self.http_port = free_port()
        self._auth: dict[str, str] | None = None
        self._duplicates = 0.0
        # PostgreSQL: every worker uses one CA and one command key, at absolute paths (as
        # production must: central refuses to start without them).
        shared = {} if self.db_url.startswith("sqlite:") else {
            "FIELDLINK_CENTRAL_PKI_DIR": str(workdir.resolve() / "pki"),
            "FIELDLINK_CENTRAL_COMMAND_KEY_PATH": str(workdir.resolve() / "command-key.pem")}
        shared.update(env or {})
        super().__init__(name, [sys.executable, "-m", "central", "serve", "--db", self.db_url,
                                "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker_port),
                                "--http-port", str(self.http_port), *extra_args], workdir,
                         env=KEEP_RECORDS | shared)

    def start(self) -> None:
        super().start()
        wait_for(lambda: port_open("127.0.0.1", self.http_port), timeout=30,
                 what=f"{self.name} http port")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        self._keep_duplicates()
        super().kill()

    def stop(self, timeout: float = 10.0) -> int | None:
        self._keep_duplicates()
        return super().stop(timeout)

    def duplicates_seen(self) -> float:
        """Central's `records_duplicate_total` summed over every life of this process in the
        run (its counter restarts with it): did any record really arrive twice?"""
        return self._duplicates + (self._scrape_duplicates() or 0.0)

    def _keep_duplicates(self) -> None:
        if self.running:
            self._duplicates += self._scrape_duplicates() or 0.0

    def _scrape_duplicates(self) -> float | None:
        from tests.derived import scrape_duplicates

        return scrape_duplicates(self.base_url, self.auth_headers())

    def auth_headers(self) -> dict[str, str]:
        """An admin's bearer header for this central (made with `cli_user` the first
        time; every endpoint but /api/health needs a user, DESIGN.md §8)."""
        if self._auth is None:
            from tests.identity import bearer, cli_user

            cli_user(self.db_url)
            self._auth = bearer(self.base_url)
        return self._auth


@contextlib.contextmanager
def commanded_gateway(tmp_path: Path, broker_port: int, gw: str, commands_extra: str = ""
                      ) -> Iterator[tuple[Simulator, Central, Agent, httpx.Client]]:
    """A gas detector's simulator and central, started; an admin client of central's API; and
    gateway `gw`'s agent (not started) reading `gas-1` and pinning central's command key as
    enrolment does (`commands_extra`: more `[commands]` lines). Everything stops after."""
    with contextlib.ExitStack() as stack:
        sim = Simulator(tmp_path, ["gas-detector-v1"])
        stack.callback(sim.stop)
        sim.start()
        central = Central(tmp_path, broker_port)
        stack.callback(central.stop)
        central.start()
        http = stack.enter_context(httpx.Client(base_url=central.base_url, timeout=10,
                                                headers=central.auth_headers()))
        key = http.get("/api/keys/commands").json()["public_key"]
        agent = Agent(tmp_path, gw, broker_port, sim.port, [DeviceDef("gas-1", "gas-detector-v1", 1)],
                      extra=f'\n[commands]\ncentral_public_key = "{key}"\n{commands_extra}')
        stack.callback(agent.stop)
        yield sim, central, agent, http


def sqlite_rows(path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple]:
    """Read from a live WAL database without disturbing its writer."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()
