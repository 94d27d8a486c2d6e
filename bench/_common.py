"""Shared pieces of the benchmarks: JSON-line output and child-process CPU time."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(**fields: object) -> None:
    """Print one JSON line (the benchmarks' only output on stdout)."""
    print(json.dumps(fields, ensure_ascii=False, sort_keys=False), flush=True)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
