"""Check model/delivery.pml exhaustively with SPIN; one JSON line per (bound, property).

    .venv/bin/python bench/model_check.py                 # the larger bounds (also with power
                                                          # cuts), every property
    .venv/bin/python bench/model_check.py --bound small   # what tests/test_model.py checks
    .venv/bin/python bench/model_check.py --variants      # the mutants: each must fail

Each line: `{bound, property, expect, states, transitions, depth, memory_mb, seconds, errors,
ok}`; `ok` is whether the result is the expected one (0 errors for a property of the model,
at least one counterexample for a mutant). Needs `spin` and a C compiler (Debian: `spin`,
`gcc`). The verifier is exhaustive: no bitstate hashing; `-DCOLLAPSE` (a lossless state
compression) only where `Bound.collapse` says so. model/README.md explains the model.

This module is also the library tests/test_model.py uses to run SPIN.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "model" / "delivery.pml"

SAFETY = ("no_early_mark", "exactly_once", "drop_reported", "alarm_seq_order", "seq_unique")
LIVENESS = ("all_committed", "outbox_drains", "drops_known", "alarm_final")
# The main model's properties (seq_unique can fail only with -DPOWERCUT).
PROPERTIES = ("no_early_mark", "exactly_once", "drop_reported", "alarm_seq_order") + LIVENESS
# With a power cut (-DPOWERCUT): the records are one alarm raise and telemetry, so the alarm
# ordering properties say nothing; seq_unique is the one the power cut threatens.
POWER_CUT_PROPERTIES = ("no_early_mark", "exactly_once", "seq_unique", "drop_reported",
                        "all_committed", "outbox_drains", "drops_known")


class ModelCheckError(Exception):
    """SPIN or the C compiler failed, or pan's output was not understood."""


@dataclass(frozen=True, slots=True)
class Bound:
    """The model's bounds (its -D constants) and how to compile the verifier."""

    name: str
    nrec: int = 3  # records appended: alarm raise, telemetry, alarm clear, telemetry, ...
    crashes: int = 2  # edge agent crashes, central crashes, broker restarts
    faults: int = 1  # message loss, duplicate, link drop, early ack timeout, radio loss
    drops: int = 0  # budget evictions (each appends a report record)
    qn: int = 2  # messages the broker holds per direction
    collapse: bool = False  # lossless state compression (more time, less memory)
    memlim_mb: int = 2048
    properties: tuple[str, ...] = PROPERTIES  # the ones this bound exercises
    variants: bool = True  # run the mutants on this bound
    extra: tuple[str, ...] = ()  # more #defines, e.g. -DPOWERCUT

    def defines(self) -> tuple[str, ...]:
        return (f"-DNREC={self.nrec}", f"-DCRASHES={self.crashes}", f"-DFAULTS={self.faults}",
                f"-DDROPS={self.drops}", f"-DQN={self.qn}", *self.extra)


# The small bounds tests/test_model.py checks: alarms (three records, an alarm raised and
# cleared) and the budget (an eviction and its report), each with 2 crashes and 1 fault.
# (Without an eviction the drop properties hold trivially, and with one alarm so do the
# ordering ones: each small bound checks the properties it exercises.)
SMALL = (Bound("small-alarms", nrec=3, crashes=2, faults=1, drops=0,
               properties=("no_early_mark", "exactly_once", "alarm_seq_order", "all_committed",
                           "outbox_drains", "alarm_final")),
         Bound("small-budget", nrec=2, crashes=2, faults=1, drops=1, variants=False,
               properties=("no_early_mark", "exactly_once", "drop_reported", "all_committed",
                           "outbox_drains", "drops_known")),
         # The outbox with its seq reservation across a power cut (alarm, reading, reading;
         # one crash of any kind, the power cut among them, and one fault).
         Bound("small-power-cut", nrec=3, crashes=1, faults=1, drops=0, variants=False,
               extra=("-DPOWERCUT",), properties=POWER_CUT_PROPERTIES))
# The larger bound of this benchmark: alarms and the budget at once (about 10 million states,
# 1.2 GB). The mutants run at the small bound (--bound small --variants).
LARGE = (Bound("large", nrec=3, crashes=2, faults=1, drops=1, memlim_mb=4096,
               variants=False),
         # Two power cuts (or one and another crash), no message fault; and a power cut with
         # the budget evicting a reading (its report is synced, the reservation follows).
         Bound("large-power-cut", nrec=3, crashes=2, faults=0, drops=0, variants=False,
               extra=("-DPOWERCUT",), properties=POWER_CUT_PROPERTIES),
         Bound("large-power-cut-budget", nrec=2, crashes=2, faults=1, drops=1, memlim_mb=4096,
               variants=False, extra=("-DPOWERCUT",), properties=POWER_CUT_PROPERTIES))
BOUNDS = {"small": SMALL, "large": LARGE}


@dataclass(frozen=True, slots=True)
class Variant:
    """A change to the model (its #defines) and the property it must break."""

    name: str
    defines: tuple[str, ...]
    breaks: str
    what: str


VARIANTS = (
    Variant("no_inflight_check", ("-DNO_INFLIGHT_CHECK", "-DFORGE=2"), "no_early_mark",
            "without the in-flight rule, an ack naming a record never sent deletes it"),
    Variant("forged_ack_in_flight", ("-DFORGE=1",), "no_early_mark",
            "with the rule, a forged ack naming a record in flight still deletes it"),
    Variant("ack_before_commit", ("-DACK_BEFORE_COMMIT",), "no_early_mark",
            "central acks, then dies before its commit"),
    Variant("mark_on_puback", ("-DMARK_ON_PUBACK",), "no_early_mark",
            "the edge takes the broker's PUBACK for central's ack"),
    Variant("dedup_off", ("-DDEDUP_OFF",), "exactly_once",
            "central inserts a resent record again"),
    Variant("forget_no_resend", ("-DFORGET_NO_RESEND",), "all_committed",
            "in-flight state is forgotten but never sent again"),
    Variant("no_seq_order", ("-DNO_SEQ_ORDER",), "alarm_final",
            "central applies alarm transitions in arrival order"),
    Variant("arrival_order", ("-DARRIVAL",), "arrival_order",
            "transitions do not arrive in seq order: only central's seq ordering keeps them"),
    # The outbox before the seq reservation (model/README.md, finding 1, fixed).
    Variant("power_cut_seq_reuse", ("-DPOWERCUT", "-DSEQ_REUSE"), "seq_unique",
            "without the reservation, a power cut makes the outbox hand out a seq again"),
    Variant("power_cut_reuse_loses", ("-DPOWERCUT", "-DSEQ_REUSE"), "no_early_mark",
            "... and the old record's ack (or central's dedup) makes the edge delete the new"
            " record unsent"),
    Variant("power_cut_unreported", ("-DPOWERCUT", "-DSKIP_UNREPORTED"), "all_committed",
            "the outbox skips the reserved seqs after a power cut but does not report them"),
    Variant("power_cut_reserve_unsynced", ("-DPOWERCUT", "-DRESERVE_UNSYNCED"), "seq_unique",
            "the reservation is raised in a commit that is not synced: the cut takes it too"),
)
# Variants that must still verify: the rule stops a forged ack for a record not in flight.
HOLDING = (Variant("forged_ack_not_in_flight", ("-DFORGE=2",), "no_early_mark",
                   "the in-flight rule ignores an ack naming a record not in flight"),)


@dataclass(slots=True)
class Result:
    property: str
    errors: int
    states: int
    transitions: int
    depth: int
    memory_mb: float
    seconds: float
    complete: bool
    trail: str = ""
    output: str = field(default="", repr=False)


def available() -> str | None:
    """None when SPIN and a C compiler are installed, else what is missing."""
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    return None if not missing else f"{' and '.join(missing)} not installed (apt-get install -y spin gcc)"


class Verifier:
    """One compiled `pan` for a bound and a set of #defines, in its own directory."""

    def __init__(self, bound: Bound, defines: tuple[str, ...] = (), *,
                 workdir: Path | None = None, model: Path = MODEL) -> None:
        self.bound = bound
        self.defines = bound.defines() + tuple(defines)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="spin-")
        self.dir = workdir if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = self.dir / model.name
        shutil.copyfile(model, self.model)
        self._compile()

    def _run(self, *cmd: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def _compile(self) -> None:
        gen = self._run("spin", *self.defines, "-a", self.model.name)
        if gen.returncode != 0:
            raise ModelCheckError(f"spin -a failed: {gen.stdout}{gen.stderr}")
        flags = ["-O2", f"-DMEMLIM={self.bound.memlim_mb}", "-DVECTORSZ=2048"]
        if self.bound.collapse:
            flags.append("-DCOLLAPSE")
        cc = self._run("gcc", *flags, "-w", "-o", "pan", "pan.c")
        if cc.returncode != 0:
            raise ModelCheckError(f"gcc pan.c failed: {cc.stderr[-2000:]}")

    def check(self, prop: str, *, timeout: float | None = None) -> Result:
        """Search every state for a violation of `prop`; for a liveness property also every
        cycle (`-a`: an acceptance cycle is a run that never gets there)."""
        trail = self.dir / f"{self.model.name}.trail"
        trail.unlink(missing_ok=True)
        started = time.monotonic()
        cycles = ("-a",) if prop in LIVENESS else ()
        run = self._run("./pan", *cycles, "-m1000000", "-N", prop, timeout=timeout)
        seconds = time.monotonic() - started
        out = run.stdout + run.stderr
        res = _parse(prop, out, seconds)
        if res.errors and trail.exists():
            replay = self._run("spin", *self.defines, "-t", "-p", self.model.name)
            res.trail = compact_trail(replay.stdout)
        return res

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


_STEP = re.compile(r"^\s*(\d+):\s+proc\s+\d+ \((\w+):\d+\) \S+:(\d+) \(state \d+\)\s+\[(.*)\]$")
_NOISE = re.compile(r"\^|^\(\(\w+\[0\]<\w+\[1\]\)\)$|^\(1\)$|^else$|^goto |^(b|e|s|i|k|mk|mg|t|m|top) = 0$")


def compact_trail(replay: str) -> str:
    """`spin -t -p` output as one line per step: `step proc line: statement`, without the
    bag sorting and the resets of scratch variables."""
    lines = []
    for raw in replay.splitlines():
        m = _STEP.match(raw)
        if m is None:
            if "acceptance cycle" in raw or "CYCLE" in raw:
                lines.append(raw.strip())
            continue
        step, proc, line, stmt = m.groups()
        if proc == "init" or _NOISE.search(stmt):
            continue
        lines.append(f"{step:>4} {proc:<10} l.{line:<4} {stmt}")
    return "\n".join(lines)


def _num(pattern: str, text: str, cast: type = int) -> int | float:
    m = re.search(pattern, text)
    if m is None:
        raise ModelCheckError(f"pan output without {pattern!r}:\n{text[-3000:]}")
    return cast(float(m.group(1))) if cast is int else cast(m.group(1))


def _parse(prop: str, out: str, seconds: float) -> Result:
    if "error: max search depth too small" in out:
        raise ModelCheckError(f"{prop}: search depth exceeded, raise -m")
    if "pan: out of memory" in out:
        raise ModelCheckError(f"{prop}: out of memory (raise memlim_mb or use collapse)")
    errors = int(_num(r"errors: (\d+)", out))
    return Result(
        property=prop,
        errors=errors,
        states=int(_num(r"([\d.e+]+) states, stored", out)),
        transitions=int(_num(r"([\d.e+]+) transitions \(", out)),
        depth=int(_num(r"depth reached (\d+)", out)),
        memory_mb=float(_num(r"([\d.]+)\s+total actual memory usage", out, float)),
        seconds=round(seconds, 2),
        complete=errors > 0 or "Search not completed" not in out,
        output=out,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bound", choices=sorted(BOUNDS), default="large")
    ap.add_argument("--variants", action="store_true", help="check the mutants instead")
    ap.add_argument("--trail", action="store_true",
                    help="print each counterexample's steps (stderr)")
    args = ap.parse_args()
    if (why := available()) is not None:
        print(why, file=sys.stderr)
        return 1
    ok_all = True
    for bound in BOUNDS[args.bound]:
        if args.variants and not bound.variants:
            continue
        jobs: list[tuple[tuple[str, ...], str, str]] = (
            [(v.defines, v.breaks, f"fails:{v.name}") for v in VARIANTS]
            + [(v.defines, v.breaks, f"holds:{v.name}") for v in HOLDING]
            if args.variants else [((), p, "holds") for p in bound.properties])
        compiled: dict[tuple[str, ...], Verifier] = {}
        try:
            for defines, prop, expect in jobs:
                ver = compiled.get(defines) or compiled.setdefault(defines, Verifier(bound, defines))
                res = ver.check(prop)
                ok = res.errors > 0 if expect.startswith("fails") else res.errors == 0
                ok_all &= ok
                emit(bound=bound.name, property=prop, expect=expect, states=res.states,
                     transitions=res.transitions, depth=res.depth, memory_mb=res.memory_mb,
                     seconds=res.seconds, errors=res.errors, ok=ok)
                if args.trail and res.trail:
                    print(f"--- {expect} {prop}\n{res.trail}", file=sys.stderr)
        finally:
            for ver in compiled.values():
                ver.close()
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
