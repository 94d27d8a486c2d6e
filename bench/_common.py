"""Shared pieces of the benchmarks: JSON-line output, child-process CPU time and central's
counters."""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(**fields: object) -> None:
    """Print one JSON line (the benchmarks' only output on stdout)."""
    print(json.dumps(fields, ensure_ascii=False, sort_keys=False), flush=True)


class CentralProcess(Protocol):
    @property
    def base_url(self) -> str: ...

    def auth_headers(self) -> dict[str, str]: ...


def central_counters(central: CentralProcess, names: tuple[str, ...],
                     timeout: float = 10) -> dict[str, float]:
    """`fieldlink_central_{name}` for each of `names` that central's /metrics (which needs a
    user) serves, from one scrape; raises OSError if the scrape fails."""
    req = urllib.request.Request(f"{central.base_url}/metrics", headers=central.auth_headers())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return {name: float(m.group(1)) for name in names
            if (m := re.search(rf"^fieldlink_central_{name} (\S+)$", text, re.M))}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
