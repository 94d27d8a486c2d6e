"""The edge outbox's append rate on a real file: single-reading appends (one transaction
each, as a slow poll loop makes them) and batches (as a busy poller makes them); and its
drain rate: the edge's share of `bench/drain.py` without the network or central.

    python bench/outbox_append.py [--records 20000] [--batch 100] [--repeat 3]
                                  [--drain-records 200000] [--drain-batch 5000]

Prints one JSON line per shape: records_per_s (best of `--repeat` runs, each on a new file).
Telemetry commits with synchronous=NORMAL; the seq reservation (`edge_agent/outbox/seqs.py`)
adds one synced commit per reservation block. The `drain` shape reads the backlog in batches
as the uplink does (`Outbox.next_backlog`), encodes each as envelope v2 and marks it delivered
as an ack would; it also prints the process's CPU per record for each step (`read_us`,
`encode_us`, `mark_us`), which a busy box disturbs less than the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402
from bench.drain import prefill  # noqa: E402
from edge_agent.outbox.store import NewRecord, Outbox  # noqa: E402
from protocols.envelope import RecordKind, encode_columns, ranges_from_seqs  # noqa: E402


async def run(records: int, batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="append-") as tmp:
        async with Outbox.open(Path(tmp) / "o.db", prune_interval_s=3600) as ob:
            started = time.perf_counter()
            for i in range(0, records, batch):
                await ob.append([NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i + j,
                                           f"d{j % 50}/gas", float(j)) for j in range(batch)])
            return records / (time.perf_counter() - started)


async def drain(records: int, batch: int) -> dict[str, float]:
    """One drain of a prefilled backlog: records per second and CPU µs per record per step."""
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp:
        path = Path(tmp) / "o.db"
        await prefill(path, records)
        async with Outbox.open(path, prune_interval_s=3600) as ob:
            cpu = {"read_us": 0.0, "encode_us": 0.0, "mark_us": 0.0}
            done = 0
            started = time.perf_counter()
            while True:
                t0 = time.process_time()
                cols = await ob.next_backlog(batch)
                t1 = time.process_time()
                if not len(cols):
                    break
                encode_columns("gw", ob.stream, 0, cols)
                ranges = ranges_from_seqs(cols.seqs)
                t2 = time.process_time()
                await ob.mark_delivered(ranges)
                cpu["read_us"] += t1 - t0
                cpu["encode_us"] += t2 - t1
                cpu["mark_us"] += time.process_time() - t2
                done += len(cols)
            rate = done / (time.perf_counter() - started)
    return {"records_per_s": rate} | {k: v * 1e6 / done for k, v in cpu.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drain-records", type=int, default=200_000)
    ap.add_argument("--drain-batch", type=int, default=5000)
    args = ap.parse_args()
    for batch in (1, args.batch):
        n = args.records if batch > 1 else args.records // 4
        best = max(asyncio.run(run(n, batch)) for _ in range(args.repeat))
        emit(shape=f"batch_{batch}", records=n, records_per_s=round(best))
    runs = [asyncio.run(drain(args.drain_records, args.drain_batch)) for _ in range(args.repeat)]
    best_run = max(runs, key=lambda r: r["records_per_s"])
    emit(shape=f"drain_{args.drain_batch}", records=args.drain_records,
         **{k: round(v) if k == "records_per_s" else round(v, 2) for k, v in best_run.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
