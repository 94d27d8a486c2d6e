"""Fault injection on real processes (DESIGN.md §4, issue "Through 三断").

A private Mosquitto, central, a Modbus simulator with counter points and an edge agent whose
uplink runs through a `LinkProxy`; faults come at moments drawn from a seeded RNG:
broker SIGKILL, central SIGKILL, agent SIGKILL (often in the middle of an outbox write, since
it commits four times a second), the link dropped, black-holed, slowed or reset, the devices
going silent, and a gas alarm raised while the link is down. Afterwards the devices are
stopped, the backlog drains, and central's tables are compared with every record the agent
ever committed (the agent keeps delivered records for this).

Used by `tests/test_chaos.py` (a short run) and `bench/chaos.py` (long runs).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.outbox.store import read_status
from tests.derived import derived_problems
from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, wait_for
from tests.netproxy import LinkProxy

GW = "gw-chaos-01"
DEVICES = (DeviceDef("gas-1", "gas-detector-v1", 1), DeviceDef("tank-1", "storage-tank-v1", 2),
           DeviceDef("gas-2", "gas-detector-v1", 3))
ALARM_KIND = 1  # RecordKind.ALARM


@dataclass
class ChaosReport:
    faults: int
    seed: int
    by_kind: dict[str, int]
    records: int
    lost: int
    duplicated: int
    mismatched: int
    thinned_reported: int
    alarms_raised: int
    alarms_at_central: int
    alarm_max_delay_s: float
    seconds: float
    duplicates_seen: float = 0.0  # central's duplicate counter over the run: dedup exercised
    derived_problems: list[str] = field(default_factory=list)  # tests/derived.py
    missing_sample: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "missing_sample"}


class ChaosRun:
    """One system under faults; `run()` returns what central holds compared with the edge."""

    def __init__(self, workdir: Path, *, faults: int, seed: int,
                 gap_s: tuple[float, float] = (0.5, 1.5), budget: bool = False,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.workdir, self.faults, self.seed, self.gap_s, self.log = workdir, faults, seed, gap_s, log
        self.rng = random.Random(seed)
        # With a budget, four fast devices (~1,000 records/s) fill a 1 MiB outbox during a
        # long outage, so that thinning and dropping happen and must be reported.
        self.budget = budget
        self.devices = DEVICES + (tuple(DeviceDef(f"burst-{k}", "al-casting-cooling-v1", 4 + k, 0.05)
                                        for k in range(4)) if budget else ())
        self.faults_weights = dict(self.FAULTS, **({"budget": 3} if budget else {}))
        (workdir / "broker").mkdir(exist_ok=True)
        self.broker = Mosquitto(workdir / "broker")
        self.sim = Simulator(workdir, [d.profile for d in self.devices], control=True)
        self.central = Central(workdir, self.broker.port)
        self.proxy = LinkProxy("127.0.0.1", self.broker.port)
        self.agent: Agent | None = None
        self.done: Counter[str] = Counter()

    # --- faults -------------------------------------------------------------------------------

    def _pause(self, lo: float = 0.5, hi: float = 2.0) -> None:
        time.sleep(self.rng.uniform(lo, hi))

    def _bounce(self, kill: Callable[[], None], start: Callable[[], None]) -> None:
        kill()
        self._pause()
        start()

    def fault_broker(self) -> None:
        self._bounce(self.broker.kill, self.broker.start)

    def fault_central(self) -> None:
        self._bounce(self.central.kill, self.central.start)

    def fault_agent(self) -> None:
        assert self.agent is not None
        self._bounce(self.agent.kill, self.agent.start)

    def fault_link(self) -> None:
        mode = self.rng.choice(["drop", "blackhole", "slow"])
        self.proxy.set_mode(mode, delay_s=self.rng.uniform(0.05, 0.5))
        self._pause(1.0, 4.0)
        self.proxy.set_mode("pass")

    def fault_reset(self) -> None:
        self.proxy.reset()

    def fault_devices_silent(self) -> None:
        self._bounce(self.sim.stop, self.sim.start)

    def fault_alarm_in_outage(self) -> None:
        """The link goes down, gas rises past level 2 and falls back, the link returns."""
        self.proxy.set_mode("drop")
        unit = self.rng.choice([1, 3])
        self.sim.control({"set": {"device_id": unit, "point": "gas_lel", "value": 60.0}})
        self._pause(1.5, 3.0)
        self.sim.control({"clear": {"device_id": unit, "point": "gas_lel"}})
        self._pause(1.0, 2.0)
        self.proxy.set_mode("pass")

    def fault_budget(self) -> None:
        """A long outage while the fast devices fill the outbox past its budget."""
        self.proxy.set_mode("drop")
        self._pause(15.0, 25.0)
        self.proxy.set_mode("pass")

    FAULTS: dict[str, int] = {"broker": 3, "central": 3, "agent": 3, "link": 4, "reset": 2,
                              "devices_silent": 1, "alarm_in_outage": 2}

    # --- the run ------------------------------------------------------------------------------

    def start(self) -> None:
        self.broker.start()
        self.proxy.start()
        self.sim.start()
        self.central.start()
        outbox = "\n[outbox]\nkeep_delivered_s = 864000\n"
        if self.budget:
            outbox += "max_bytes = 1048576\nlive_window_s = 5\n"
        self.agent = Agent(
            self.workdir, GW, self.proxy.port, self.sim.port, self.devices, ack_timeout_s=2.0,
            mqtt_extra="keepalive_s = 5",
            # device_offline alarms would keep coming after the devices stop; they are tested
            # on their own in test_rules.py
            device_extra="[devices.alarms]\noffline = false\n", extra=outbox)
        self.agent.start()

    def stop(self) -> None:
        for child in (self.agent, self.central, self.sim):
            if child is not None:
                child.stop()
        self.proxy.stop()
        self.broker.stop()

    def run(self) -> ChaosReport:
        t0 = time.monotonic()
        self.start()
        try:
            assert self.agent is not None
            wait_for(lambda: self.central.db_path.exists() and sqlite_rows(
                self.central.db_path, "SELECT count(*) FROM readings")[0][0] > 0,
                timeout=60, what="first readings at central")
            kinds, weights = zip(*self.faults_weights.items(), strict=True)
            for i in range(self.faults):
                # every tenth fault carries an alarm through an outage, whatever the seed
                kind = "alarm_in_outage" if i % 10 == 5 else self.rng.choices(kinds, weights)[0]
                self.log(f"fault {i + 1}/{self.faults}: {kind}")
                getattr(self, f"fault_{kind}")()
                self.done[kind] += 1
                self._pause(*self.gap_s)
            self.proxy.set_mode("pass")
            self.sim.stop()  # no new readings: what the agent holds must now drain
            wait_for(lambda: read_status(self.agent.outbox).backlog == 0, timeout=180, interval=0.2,
                     what="the agent's backlog to drain")
            return self._compare(time.monotonic() - t0)
        finally:
            self.stop()

    def _compare(self, seconds: float) -> ChaosReport:
        assert self.agent is not None
        stream = read_status(self.agent.outbox).stream
        edge = {r[0]: r[1:] for r in sqlite_rows(
            self.agent.outbox, "SELECT seq, kind, point, ts_ms, value FROM records")}
        held_rows = sqlite_rows(
            self.central.db_path,
            "SELECT r.seq, 0, p.device || '/' || p.point, r.ts_ms, r.value, r.received_ms "
            "FROM readings r LEFT JOIN points p ON p.id = r.point_id WHERE r.gw = ? AND r.stream = ? "
            "UNION ALL SELECT e.seq, e.kind, p.device || '/' || p.point, e.ts_ms, e.value, e.received_ms "
            "FROM events e LEFT JOIN points p ON p.id = e.point_id WHERE e.gw = ? AND e.stream = ?",
            (GW, stream, GW, stream))
        seq_count = Counter(r[0] for r in held_rows)
        held = {r[0]: r[1:5] for r in held_rows}
        received = {r[0]: r[5] for r in held_rows}
        last_seq = read_status(self.agent.outbox).last_seq
        # Thinning and eviction under the budget report the seq ranges they removed from;
        # a seq missing at central inside such a reported range was reported, not lost.
        reported: list[tuple[int, int]] = []
        for (attrs,) in sqlite_rows(self.central.db_path,
                                    "SELECT attrs FROM events WHERE gw = ? AND stream = ? AND kind = 2",
                                    (GW, stream)):
            a = json.loads(attrs or "{}")
            if a.get("event") in ("outbox_thinned", "outbox_dropped"):
                reported.append((int(a["first_seq"]), int(a["last_seq"])))

        def was_reported(seq: int) -> bool:
            return any(lo <= seq <= hi for lo, hi in reported)

        absent = [s for s in range(1, last_seq + 1) if s not in held]
        thinned = [s for s in absent if was_reported(s)]
        missing = [s for s in absent if not was_reported(s)]
        mismatched = sum(1 for s, row in edge.items() if s in held and not _same(row, held[s]))
        alarms = [s for s, row in edge.items() if row[0] == ALARM_KIND]
        delays = [(received[s] - edge[s][2]) / 1000 for s in alarms if s in received]
        return ChaosReport(
            faults=sum(self.done.values()), seed=self.seed, by_kind=dict(self.done),
            records=last_seq, lost=len(missing), duplicated=sum(n - 1 for n in seq_count.values()),
            mismatched=mismatched, thinned_reported=len(thinned), alarms_raised=len(alarms),
            alarms_at_central=sum(1 for s in alarms if s in held),
            alarm_max_delay_s=round(max(delays, default=0.0), 2), seconds=round(seconds, 1),
            duplicates_seen=self.central.duplicates_seen(),
            derived_problems=derived_problems(
                lambda sql, args: sqlite_rows(self.central.db_path, sql, args), GW, stream),
            missing_sample=missing[:20])


def _same(edge_row: tuple, held_row: tuple) -> bool:
    kind, point, ts, value = edge_row
    return (kind, point, ts, value) == tuple(held_row[:4])
