"""Nothing lost, nothing doubled, under N random faults on real processes.

Runs `tests.chaos.ChaosRun`: a private Mosquitto, central, a Modbus simulator and an edge agent
behind a controllable link proxy, with faults at moments drawn from a seeded RNG (broker,
central and agent SIGKILL; link drop, black hole, slow, reset; devices silent; a gas alarm
raised while the link is down). Then compares central's tables with every record the agent
committed.

    python bench/chaos.py --faults 200 --seed 1
    python bench/chaos.py --faults 20 --seed 2 --budget

Prints one JSON line: faults, lost, duplicated, thinned_reported, alarm_max_delay_s, ...
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit

from tests.chaos import ChaosRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget", action="store_true",
                    help="a 1 MiB outbox budget, four fast devices and long outages: thinning must be reported")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run's files in this folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fieldlink-chaos-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = ChaosRun(work, faults=args.faults, seed=args.seed, budget=args.budget,
                          log=lambda m: print(m, file=sys.stderr, flush=True)).run()
    emit(bench="chaos", **report.as_dict())


if __name__ == "__main__":
    main()
