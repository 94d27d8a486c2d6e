"""A real power cut for an SQLite outbox: what the disk holds is what the last fsync wrote.

`fsync_recorder(dir)` builds a tiny LD_PRELOAD library (needs gcc) that wraps fsync(2) and
fdatasync(2): after each successful call it appends `path size` of the synced file to the
file named by `$FSYNC_LOG`. A child process appends to an outbox under it and is SIGKILLed
(`run_appender`); `cut_power` then cuts the WAL back to its size at its last fsync and drops
the `-shm` file, which is the state a power cut can leave (the worst case: every frame
written after the last sync lost; WAL frames carry checksums, so SQLite recovers up to the
last complete commit before the cut). No checkpoint may have run in the child: a checkpoint
syncs the main file, and `cut_power` refuses a log that shows one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import python_env

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static void note(int fd) {
    const char *log = getenv("FSYNC_LOG");
    char link[64], path[4096];
    struct stat st;
    ssize_t n;
    FILE *f;
    if (log == NULL) return;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0 || fstat(fd, &st) != 0) return;
    path[n] = 0;
    f = fopen(log, "a");
    if (f == NULL) return;
    fprintf(f, "%s %lld\n", path, (long long) st.st_size);
    fclose(f);
}

/* fsync(2) and fdatasync(2): the libc call, then note() what it made durable */
#define NOTING(name)                                                            \
int name(int fd) {                                                              \
    static int (*real)(int) = NULL;                                             \
    int rc;                                                                     \
    if (real == NULL) real = (int (*)(int)) dlsym(RTLD_NEXT, #name);            \
    rc = real(fd);                                                              \
    if (rc == 0) note(fd);                                                      \
    return rc;                                                                  \
}

NOTING(fsync)
NOTING(fdatasync)
"""

# The child: open the outbox as boot `boot`, append an alarm raise (synchronous=FULL), then
# `readings` readings, `batch` per call (NORMAL, unless a call crosses the reservation), print the seqs and the fsyncs seen after each
# step as one JSON line, and die by SIGKILL: no clean stop, nothing flushed by the agent.
_APPENDER = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
from edge_agent.health.clock import ClockGuard
from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import RecordKind

db, boot, readings, batch, log = (Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                  int(sys.argv[4]), Path(sys.argv[5]))

def syncs():
    return len(log.read_text().splitlines()) if log.exists() else 0

async def main():
    async with Outbox.open(db, clock=ClockGuard(boot_id=boot), prune_interval_s=3600) as ob:
        seqs = await ob.append([NewRecord(RecordKind.ALARM, 1_700_000_000_000, "d1/gas",
                                          "raised", attrs={"rule": "gas_high"})])
        after_alarm = syncs()
        for at in range(0, readings, batch):
            seqs += await ob.append([NewRecord(RecordKind.TELEMETRY, 1_700_000_001_000 + i,
                                               "d1/gas", float(i))
                                     for i in range(at, min(readings, at + batch))])
        print(json.dumps({"seqs": seqs, "syncs_after_alarm": after_alarm,
                          "syncs_after_readings": syncs()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@dataclass(frozen=True, slots=True)
class Appended:
    seqs: list[int]  # every seq the killed child was handed, in order
    syncs_after_alarm: int  # fsyncs logged when the alarm's append had returned
    syncs_after_readings: int  # ... and when the readings' appends had returned


def fsync_recorder(workdir: Path) -> Path:
    """Build the fsync-recording LD_PRELOAD library in `workdir`; returns its path."""
    src, lib = workdir / "fsync_log.c", workdir / "fsync_log.so"
    src.write_text(_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                   check=True, capture_output=True, timeout=60)
    return lib


def run_appender(db: Path, *, boot: str, readings: int, shim: Path, log: Path,
                 batch: int = 1) -> Appended:
    """Run the appending child under the recorder until it SIGKILLs itself."""
    env = {**python_env(), "LD_PRELOAD": str(shim), "FSYNC_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-c", _APPENDER, str(db), boot, str(readings),
                           str(batch), str(log)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == -9, f"child did not die by SIGKILL: {proc.returncode}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Appended(out["seqs"], out["syncs_after_alarm"], out["syncs_after_readings"])


def synced_sizes(log: Path, file: Path) -> list[int]:
    """The sizes `file` had at each of its logged fsyncs, in order."""
    target = str(file.resolve())
    sizes = []
    for line in log.read_text().splitlines() if log.exists() else ():
        path, _, size = line.rpartition(" ")
        if path == target:
            sizes.append(int(size))
    return sizes


def cut_power(db: Path, log: Path) -> int:
    """Leave `db` as the disk held it at its WAL's last fsync; returns the bytes cut off."""
    if synced_sizes(log, db):
        raise AssertionError("the main file was synced (a checkpoint ran): cannot cut the WAL")
    wal = Path(f"{db}-wal")
    synced = synced_sizes(log, wal)
    if not synced:
        raise AssertionError("the WAL was never synced")
    size = wal.stat().st_size
    os.truncate(wal, synced[-1])
    Path(f"{db}-shm").unlink(missing_ok=True)
    return size - synced[-1]
