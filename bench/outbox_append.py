"""The edge outbox's append rate on a real file: single-reading appends (one transaction
each, as a slow poll loop makes them) and batches (as a busy poller makes them).

    python bench/outbox_append.py [--records 20000] [--batch 100] [--repeat 3]

Prints one JSON line per shape: records_per_s (best of `--repeat` runs, each on a new file).
Telemetry commits with synchronous=NORMAL; the seq reservation (`edge_agent/outbox/seqs.py`)
adds one synced commit per reservation block.
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
from edge_agent.outbox.store import NewRecord, Outbox  # noqa: E402
from protocols.envelope import RecordKind  # noqa: E402


async def run(records: int, batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="append-") as tmp:
        async with Outbox.open(Path(tmp) / "o.db", prune_interval_s=3600) as ob:
            started = time.perf_counter()
            for i in range(0, records, batch):
                await ob.append([NewRecord(RecordKind.TELEMETRY, 1_700_000_000_000 + i + j,
                                           f"d{j % 50}/gas", float(j)) for j in range(batch)])
            return records / (time.perf_counter() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for batch in (1, args.batch):
        n = args.records if batch > 1 else args.records // 4
        best = max(asyncio.run(run(n, batch)) for _ in range(args.repeat))
        emit(shape=f"batch_{batch}", records=n, records_per_s=round(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
