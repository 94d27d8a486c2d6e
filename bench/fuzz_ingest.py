"""Fuzz central's ingest path (issue 10): generated hostile envelopes through decode + validate
+ store on a real SQLite file, many more examples than the test suite runs.

Each example is one message of a gateway (mostly data batches mixing good telemetry with bad
records, bad point keys, CBOR shared references and spoiled batch fields; some hostile states
and births), fed to `Ingest.decode_group` / `store_group` as the MQTT loop would
(`tests/fuzz_harness.py`). Nothing is shrunk: a crash is counted, not raised.

    python bench/fuzz_ingest.py --examples 20000 [--seed 1]

Prints one JSON line: examples, rejected_by_reason, crashes, good_records_lost (and a few
more counts); exits 1 if anything crashed, a good record was lost, a reason is unknown or the
database itself had to refuse a record (`unstorable`: a rule missing from protocols.limits).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import structlog
from _common import emit
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz_harness import IngestFuzz

_CHUNK = 1_000


def _run_chunk(fuzz: IngestFuzz, examples: int, chunk_seed: int) -> None:
    @seed(chunk_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        fuzz.feed(*data.draw(st.composite(lambda draw: fuzz.message(draw))()))

    one()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000, help="messages to generate")
    ap.add_argument("--seed", type=int, default=1, help="hypothesis seed (repeatable runs)")
    args = ap.parse_args()
    # Refusals log once per gateway and reason per minute; storage's info lines are noise here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-ingest-") as tmp:
        fuzz = IngestFuzz(Path(tmp) / "central.db")
        try:
            # In chunks: one hypothesis engine run keeps every example's choices, which grows
            # without bound over tens of thousands of examples.
            done = 0
            while done < args.examples:
                chunk = min(_CHUNK, args.examples - done)
                _run_chunk(fuzz, chunk, args.seed * 1_000_003 + done)
                done += chunk
                print(f"fuzz_ingest: {fuzz.examples} examples", file=sys.stderr, flush=True)
            summary = fuzz.summary()
        finally:
            fuzz.close()
    unknown = sorted(fuzz.unknown_reasons())
    emit(**summary, unknown_reasons=unknown, elapsed_s=round(time.monotonic() - started, 1))
    for tb in fuzz.first_crashes:
        print(tb, file=sys.stderr)
    # `unstorable`: the database refused what the validation let through (a missing rule).
    failed = (summary["crashes"] or summary["good_records_lost"] or unknown
              or "unstorable" in summary["rejected_by_reason"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
