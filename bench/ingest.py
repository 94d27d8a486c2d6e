"""Central's ingest rate: MQTT batches of 500 points into storage, against the raw limit.

Starts a private Mosquitto and `central serve` (a real process), plays several gateways that
announce themselves with a birth (their 20 devices × 50 points), as an agent does on every
connect before it sends data, and then publish `up/data` batches (envelope version 2 by
default, as agents send to a central that announces it) and wait for central's `down/ack`,
with as many batches in flight per gateway as the agent allows itself (its `max_inflight`,
16; with 8 the gateways wait on the ack round trip and the bench measures that, not
central's rate), and times from the first publish to the last ack: the points are then
committed at central. Checked before anything is printed: every gateway's acks name exactly the
seqs it sent, and central's `readings` hold exactly the points sent.

The raw limit is the same rows written plainly into a table shaped like central's `readings`
(the same key, the same `(point_id, ts_ms)` index) on the same machine in the same run, with
the same durability and the same group commit: as many batches per transaction as central
committed on average in the round before it (its `batches_total / commits_total`). SQLite:
multi-row inserts, `ON CONFLICT DO NOTHING`; with `--backend postgres` central writes to a
fresh schema on `--pg-url` (dropped after), and the raw limit is a plain binary `COPY` per
group (`synchronous_commit = on`, as central; the gateways' batches interleaved as they
arrive).

Rounds against drift: the machine's rate moves by ±20 % from one minute to the next (another
tenant, the page cache, a checkpoint), and a central run and a raw run a minute apart then
compare two machines. So the bench alternates them, `--rounds` times: central, raw, central,
raw, ...; each central round starts afresh (its own broker, central process, database file or
schema), each raw round writes a fresh table in the grouping of the central round just before
it. Every round is printed (`central_runs_points_per_s`, `raw_runs_points_per_s` in run order,
`round_ratios`: each central round over the raw round after it), and
`ratio = median(central rounds) / median(raw rounds)`: `points_per_s` and `raw_points_per_s`
are those medians. Every central round checks its acks and row counts before anything prints.

    python bench/ingest.py [--points 200000] [--gateways 8] [--batch 500] [--rounds 5]
    python bench/ingest.py --backend postgres [--pg-url postgresql://postgres@127.0.0.1/test]
    python bench/ingest.py --no-births  # central meets each point first in a data batch

Prints one JSON line: points_per_s, raw_points_per_s, ratio, batches_per_commit, the rounds, ...
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import paho.mqtt.client as mqtt
import psycopg
from _common import central_counters, emit

from edge_agent.uplink.mqtt_config import MqttConfig
from protocols import envelope as env
from protocols import topics
from tests.fleet import Central, sqlite_rows
from tests.helpers import Mosquitto, wait_for
from tests.pg import url_with_schema

POINTS_PER_DEVICE = 50


def make_birth(gw: str, stream: str) -> env.Birth:
    """The gateway's inventory, the points `make_batch` names."""
    return env.Birth(gw=gw, stream=stream, boot_id="bench", version="bench", devices=tuple(
        env.DeviceInfo(id=f"dev-{d}", profile="bench", profile_hash="bench", points=tuple(
            env.PointInfo(ordinal=p, key=f"dev-{d}/p{p}", name_zh=f"测点{p}", unit="")
            for p in range(POINTS_PER_DEVICE)))
        for d in range(20)))


def make_batch(gw: str, stream: str, first_seq: int, size: int, t0_ms: int) -> env.DataBatch:
    recs = tuple(
        env.Record(seq=s, kind=env.RecordKind.TELEMETRY, ts_ms=t0_ms + s,
                   point=f"dev-{(s // POINTS_PER_DEVICE) % 20}/p{s % POINTS_PER_DEVICE}",
                   value=float(s % 1000) / 10)
        for s in range(first_seq, first_seq + size))
    return env.DataBatch(gw=gw, stream=stream, records=recs, sent_ms=t0_ms)


class Gateway:
    """One simulated gateway: publishes its batches with a window and waits for acks."""

    def __init__(self, gw: str, port: int, batches: list[bytes], window: int) -> None:
        self.gw, self.batches, self.window = gw, batches, window
        self.acked = 0
        self.ranges: list[tuple[int, int]] = []
        self.done = threading.Event()
        self.sem = threading.Semaphore(window)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{gw}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.down(gw, "ack"), qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        ack = env.decode(msg.payload)
        assert isinstance(ack, env.Ack)
        self.ranges.extend(ack.ranges)
        self.acked += 1
        self.sem.release()
        if self.acked == len(self.batches):
            self.done.set()

    def announce(self, birth: env.Birth) -> None:
        self.client.publish(topics.up(self.gw, "birth"), env.encode(birth), qos=1)

    def publish_all(self) -> None:
        for payload in self.batches:
            self.sem.acquire()
            self.client.publish(topics.up(self.gw, "data"), payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# The table central's SQLite ingest inserts into (central/storage/sqlite_schema.py, m007).
_RAW_DDL = ("CREATE TABLE reading_rows (sid INTEGER NOT NULL, seq INTEGER NOT NULL,"
            " point_id INTEGER, ts_ms INTEGER NOT NULL, value REAL, text TEXT,"
            " flags INTEGER NOT NULL, received_ms INTEGER NOT NULL,"
            " PRIMARY KEY (sid, seq)) WITHOUT ROWID")
_RAW_INDEX = "CREATE INDEX readings_point_ts ON reading_rows (point_id, ts_ms)"


def _sqlite_rows(batches: list[env.DataBatch]) -> list[list[tuple]]:
    """Each batch's rows as central's SQLite ingest inserts them: keyed by a stream id."""
    sids: dict[tuple[str, str], int] = {}
    return [[(sid, r.seq, hash(r.point) & 0xFFFF, r.ts_ms, r.value, None, int(r.flags), 0)
             for r in b.records]
            for b in batches for sid in [sids.setdefault((b.gw, b.stream), len(sids) + 1)]]


def _pg_rows(batches: list[env.DataBatch]) -> list[list[tuple]]:
    """Each batch's rows as PostgreSQL's `readings` holds them: keyed by (gw, stream, seq)."""
    return [[(b.gw, b.stream, r.seq, hash(r.point) & 0xFFFF, r.ts_ms, r.value, None,
              int(r.flags), 0) for r in b.records] for b in batches]


def _groups(rows: list[list[tuple]], per_commit: int) -> list[list[tuple]]:
    return [[r for part in rows[i:i + per_commit] for r in part]
            for i in range(0, len(rows), per_commit)]


def raw_insert_rate(path: Path, batches: list[env.DataBatch], synchronous: str,
                    per_commit: int) -> float:
    """Plain multi-row inserts of the same rows, `per_commit` batches per transaction."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute(_RAW_DDL)
    con.execute(_RAW_INDEX)
    groups = _groups(_sqlite_rows(batches), per_commit)
    total = sum(len(g) for g in groups)
    values = ", ".join(["(?,?,?,?,?,?,?,?)"] * 500)
    full = f"INSERT INTO reading_rows VALUES {values} ON CONFLICT (sid, seq) DO NOTHING"
    t0 = time.perf_counter()
    for rows in groups:
        con.execute("BEGIN")
        for i in range(0, len(rows), 500):
            part = rows[i:i + 500]
            sql = full if len(part) == 500 else (
                "INSERT INTO reading_rows VALUES " + ", ".join(["(?,?,?,?,?,?,?,?)"] * len(part))
                + " ON CONFLICT (sid, seq) DO NOTHING")
            con.execute(sql, [x for r in part for x in r])
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    con.close()
    return total / elapsed


_COUNTERS = ("batches_total", "commits_total", "births_total")


def stored_rows(central: Central, db_url: str | None) -> int:
    if db_url is None:
        return sqlite_rows(central.db_path, "SELECT count(*) FROM readings")[0][0]
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
        assert row is not None
        return int(row[0])


def check_acks(gws: list[Gateway], plans: dict[str, list[env.DataBatch]]) -> None:
    for g in gws:
        sent = env.ranges_from_seqs(r.seq for b in plans[g.gw] for r in b.records)
        got = env.merge_ranges(g.ranges)
        if got != sent:
            raise SystemExit(f"{g.gw}: acks name {got[:3]}..., sent {sent[:3]}...")


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A fresh schema on `url`, dropped afterwards; yields a URL whose search_path is it."""
    schema = f"fl_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield url_with_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def checkpoint(url: str) -> None:
    """Start a timed run from a fresh checkpoint, central's and each raw one alike: else a
    checkpoint the server starts by itself (every max_wal_size of WAL, as one run after
    another writes it) lands in whichever run is timed then, and the first change to each
    page after it writes the whole page to the WAL."""
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("CHECKPOINT")


def raw_copy_rate(url: str, batches: list[env.DataBatch], per_commit: int) -> float:
    """Plain binary COPY of the same rows into a fresh readings-shaped table (the same key and
    index), `per_commit` batches per transaction, the gateways' batches interleaved as central
    receives them."""
    arrival = sorted(batches, key=lambda b: b.records[0].seq)  # stable: round-robin by gateway
    return _raw_copy_run(url, _groups(_pg_rows(arrival), per_commit))


def _raw_copy_run(url: str, groups: list[list[tuple]]) -> float:
    with pg_schema(url) as raw_url, psycopg.connect(raw_url, autocommit=True) as con:
        con.execute("SET synchronous_commit = on")
        con.execute("CREATE TABLE readings (gw TEXT COLLATE \"C\" NOT NULL,"
                    " stream TEXT COLLATE \"C\" NOT NULL, seq BIGINT NOT NULL, point_id BIGINT,"
                    " ts_ms BIGINT NOT NULL, value DOUBLE PRECISION, text TEXT,"
                    " flags INTEGER NOT NULL, received_ms BIGINT NOT NULL,"
                    " PRIMARY KEY (gw, stream, seq))")
        con.execute("CREATE INDEX readings_point_ts ON readings (point_id, ts_ms)")
        checkpoint(url)
        total = sum(len(g) for g in groups)
        t0 = time.perf_counter()
        for rows in groups:
            with con.transaction(), con.cursor() as cur, cur.copy(
                    "COPY readings FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "int8", "int8", "int8", "float8", "text", "int4",
                                "int8"])
                for row in rows:
                    copy.write_row(row)
        elapsed = time.perf_counter() - t0
    return total / elapsed


@dataclass(frozen=True)
class CentralRound:
    rate: float  # points per second, first publish to last ack
    batches_per_commit: float
    stored: int


def central_round(args: argparse.Namespace, plans: dict[str, list[env.DataBatch]],
                  work: Path) -> CentralRound:
    """One timed run of a fresh central (its own broker, process and database file or
    schema) over every gateway's batches; checks the acks and the stored rows."""
    total = sum(len(b.records) for bs in plans.values() for b in bs)
    postgres = args.backend == "postgres"
    work.mkdir()
    with ExitStack() as stack:
        db_url = stack.enter_context(pg_schema(args.pg_url)) if postgres else None
        broker = Mosquitto(work)
        broker.start()
        stack.callback(broker.stop)
        central = Central(work, broker.port, db_url=db_url)
        central.start()
        stack.callback(central.stop)
        gws = [Gateway(gw, broker.port, [env.encode(b, version=args.envelope) for b in bs],
                       args.window)
               for gw, bs in plans.items()]
        wait_for(lambda: all(g.client.is_connected() for g in gws), timeout=10, what="gateways")
        time.sleep(1.0)  # let central subscribe
        if args.births:
            for g in gws:
                g.announce(make_birth(g.gw, plans[g.gw][0].stream))
            wait_for(lambda: central_counters(central, _COUNTERS).get("births_total", 0) >= len(gws),
                     timeout=30, what="births stored")
        if postgres:
            checkpoint(args.pg_url)
        start = time.perf_counter()
        threads = [threading.Thread(target=g.publish_all) for g in gws]
        for t in threads:
            t.start()
        for g in gws:
            if not g.done.wait(timeout=600):
                raise SystemExit(f"{g.gw}: only {g.acked}/{len(g.batches)} batches acked")
        elapsed = time.perf_counter() - start
        for g in gws:
            g.close()
        check_acks(gws, plans)
        stored = stored_rows(central, db_url)
        if stored != total:
            raise SystemExit(f"central holds {stored} readings, {total} were sent")
        counters = central_counters(central, _COUNTERS)
    return CentralRound(total / elapsed, counters["batches_total"] / counters["commits_total"],
                        stored)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--gateways", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--window", type=int, default=MqttConfig().max_inflight,
                    help="batches in flight per gateway (default: the agent's max_inflight)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="central rounds, each followed by a raw round (module doc)")
    ap.add_argument("--synchronous", default="FULL", help="raw run's PRAGMA synchronous (central's setting)")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--no-births", dest="births", action="store_false",
                    help="send no birth first: central creates the points from the data")
    ap.add_argument("--envelope", type=int, choices=env.VERSIONS, default=env.VERSIONS[-1],
                    help="the envelope version the gateways send")
    ap.add_argument("--pg-url", default=os.environ.get("FIELDLINK_BENCH_PG_URL",
                                                       "postgresql://postgres@127.0.0.1:5432/test"),
                    help="PostgreSQL for --backend postgres (fresh schemas, dropped after)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    per_gw = max(1, args.points // args.gateways // args.batch)
    t0_ms = int(time.time() * 1000)
    plans = {f"bench-gw-{i:03d}": [make_batch(f"bench-gw-{i:03d}", f"stream{i}", 1 + k * args.batch,
                                             args.batch, t0_ms) for k in range(per_gw)]
             for i in range(args.gateways)}
    total = sum(len(b.records) for bs in plans.values() for b in bs)
    every = [b for bs in plans.values() for b in bs]

    postgres = args.backend == "postgres"
    rounds: list[CentralRound] = []
    raws: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fieldlink-bench-") as tmp:
        work = Path(tmp)
        for n in range(args.rounds):
            rounds.append(central_round(args, plans, work / f"central{n}"))
            per_commit = max(1, round(rounds[-1].batches_per_commit))
            raws.append(raw_copy_rate(args.pg_url, every, per_commit) if postgres
                        else raw_insert_rate(work / f"raw{n}.db", every, args.synchronous,
                                             per_commit))

    rate = statistics.median(r.rate for r in rounds)
    raw = statistics.median(raws)
    emit(bench="ingest", backend=args.backend, points=total, batch=args.batch,
         gateways=args.gateways, births=args.births, points_per_s=round(rate), raw_points_per_s=round(raw),
         ratio=round(rate / raw, 3), envelope=args.envelope, stored=rounds[-1].stored, acks_checked=True,
         batches_per_commit=round(statistics.median(r.batches_per_commit for r in rounds), 1),
         raw_synchronous="synchronous_commit=on" if postgres else args.synchronous,
         rounds=args.rounds, order="central,raw alternating",
         central_runs_points_per_s=[round(r.rate) for r in rounds],
         raw_runs_points_per_s=[round(r) for r in raws],
         round_ratios=[round(r.rate / w, 3) for r, w in zip(rounds, raws, strict=True)],
         batches_per_commit_runs=[round(r.batches_per_commit, 1) for r in rounds])


if __name__ == "__main__":
    main()
