"""Central's ingest rate: MQTT batches of 500 points into storage, against the raw limit.

Starts a private Mosquitto and `central serve` (a real process), plays several gateways that
publish `up/data` batches and wait for central's `down/ack` (a window of batches in flight per
gateway, as the edge does), and times from the first publish to the last ack: the points are
then committed at central. The raw limit is plain batched inserts of the same rows into the
same kind of table on the same machine in the same run, with the same durability setting.

With `--backend postgres` central writes to a fresh schema on `--pg-url` (dropped after), and
the raw limit is a plain `COPY` of each batch, one transaction per batch, into a table shaped
like central's `readings` in another fresh schema (`synchronous_commit = on`, as central).

    python bench/ingest.py [--points 200000] [--gateways 8] [--batch 500]
    python bench/ingest.py --backend postgres [--pg-url postgresql://postgres@127.0.0.1/test]

Prints one JSON line: points_per_s, raw_points_per_s, ratio.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import paho.mqtt.client as mqtt
import psycopg
from _common import emit

from protocols import envelope as env
from protocols import topics
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.pg import url_with_schema

POINTS_PER_DEVICE = 50


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
        self.done = threading.Event()
        self.sem = threading.Semaphore(window)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{gw}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.down(gw, "ack"), qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        env.decode(msg.payload)
        self.acked += 1
        self.sem.release()
        if self.acked == len(self.batches):
            self.done.set()

    def publish_all(self) -> None:
        for payload in self.batches:
            self.sem.acquire()
            self.client.publish(topics.up(self.gw, "data"), payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def raw_insert_rate(path: Path, batches: list[env.DataBatch], synchronous: str) -> float:
    """Plain batched inserts of the same rows: one transaction per batch, like central."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE readings (gw TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, "
                "point_id INTEGER NOT NULL, ts_ms INTEGER NOT NULL, value REAL, text TEXT, "
                "flags INTEGER NOT NULL, received_ms INTEGER NOT NULL, PRIMARY KEY (gw, stream, seq))")
    rows_per_batch = []
    for b in batches:
        rows_per_batch.append([(b.gw, b.stream, r.seq, hash(r.point) & 0xFFFF, r.ts_ms, r.value, None,
                                int(r.flags), 0) for r in b.records])
    total = sum(len(r) for r in rows_per_batch)
    t0 = time.perf_counter()
    for rows in rows_per_batch:
        con.execute("BEGIN")
        con.executemany("INSERT INTO readings VALUES (?,?,?,?,?,?,?,?,?) "
                        "ON CONFLICT (gw, stream, seq) DO NOTHING", rows)
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    con.close()
    return total / elapsed


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


def raw_copy_rate(url: str, batches: list[env.DataBatch]) -> float:
    """Plain COPY of the same rows into a readings-shaped table, one transaction per batch."""
    with pg_schema(url) as raw_url, psycopg.connect(raw_url, autocommit=True) as con:
        con.execute("SET synchronous_commit = on")
        con.execute("CREATE TABLE readings (gw TEXT COLLATE \"C\" NOT NULL,"
                    " stream TEXT COLLATE \"C\" NOT NULL, seq BIGINT NOT NULL, point_id BIGINT,"
                    " ts_ms BIGINT NOT NULL, value DOUBLE PRECISION, text TEXT,"
                    " flags INTEGER NOT NULL, received_ms BIGINT NOT NULL,"
                    " PRIMARY KEY (gw, stream, seq))")
        rows_per_batch = [[(b.gw, b.stream, r.seq, hash(r.point) & 0xFFFF, r.ts_ms, r.value, None,
                            int(r.flags), 0) for r in b.records] for b in batches]
        total = sum(len(r) for r in rows_per_batch)
        t0 = time.perf_counter()
        for rows in rows_per_batch:
            with con.transaction(), con.cursor() as cur, cur.copy(
                    "COPY readings FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "int8", "int8", "int8", "float8", "text", "int4",
                                "int8"])
                for row in rows:
                    copy.write_row(row)
        elapsed = time.perf_counter() - t0
    return total / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--gateways", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--window", type=int, default=8, help="batches in flight per gateway")
    ap.add_argument("--synchronous", default="FULL", help="raw run's PRAGMA synchronous (central's setting)")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("FIELDLINK_BENCH_PG_URL",
                                                       "postgresql://postgres@127.0.0.1:5432/test"),
                    help="PostgreSQL for --backend postgres (fresh schemas, dropped after)")
    args = ap.parse_args()

    per_gw = max(1, args.points // args.gateways // args.batch)
    t0_ms = int(time.time() * 1000)
    plans = {f"bench-gw-{i:03d}": [make_batch(f"bench-gw-{i:03d}", f"stream{i}", 1 + k * args.batch,
                                             args.batch, t0_ms) for k in range(per_gw)]
             for i in range(args.gateways)}
    total = sum(len(b.records) for bs in plans.values() for b in bs)

    postgres = args.backend == "postgres"
    with tempfile.TemporaryDirectory(prefix="fieldlink-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        db_url = stack.enter_context(pg_schema(args.pg_url)) if postgres else None
        broker = Mosquitto(work)
        broker.start()
        central = Central(work, broker.port, db_url=db_url)
        central.start()
        try:
            gws = [Gateway(gw, broker.port, [env.encode(b) for b in bs], args.window)
                   for gw, bs in plans.items()]
            wait_for(lambda: all(g.client.is_connected() for g in gws), timeout=10, what="gateways")
            time.sleep(1.0)  # let central subscribe
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
        finally:
            central.stop()
            broker.stop()
        every = [b for bs in plans.values() for b in bs]
        raw = (raw_copy_rate(args.pg_url, every) if postgres
               else raw_insert_rate(work / "raw.db", every, args.synchronous))

    rate = total / elapsed
    emit(bench="ingest", backend=args.backend, points=total, batch=args.batch,
         gateways=args.gateways, points_per_s=round(rate), raw_points_per_s=round(raw),
         ratio=round(rate / raw, 3),
         raw_synchronous="synchronous_commit=on" if postgres else args.synchronous)


if __name__ == "__main__":
    main()
