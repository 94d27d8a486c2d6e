"""`python -m central.demo.leash DEMO_PID MODULE [ARG...]`: `python -m MODULE ARG...` as a
child of the demo that does not outlive it.

The demo starts each child in a session of its own, so that a terminal's Ctrl-C reaches only
the demo, which then stops its children in order (`central.demo.children`). A child in its own
session gets none of the terminal's signals, so if the demo died without stopping it (SIGKILL,
a crash, the OOM killer) nothing else would. Linux's parent-death signal closes that gap: the
kernel sends SIGTERM to the child as soon as the demo's thread that started it ends, however it
ends, and the child stops as it does on any SIGTERM. It must be set in the child before the
module runs: here, and not in a `preexec_fn`, which runs between fork and exec and which Python
documents as unsafe in a process with threads (the demo has them). A demo that died before the
signal was set has left the child to another parent already: it exits at once.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: signal.Signals) -> None:
    """prctl(PR_SET_PDEATHSIG, sig) for this process (Linux only; OSError if refused)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def main(argv: list[str]) -> None:
    parent, module, *args = argv
    if sys.platform.startswith("linux"):
        set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(parent):
        sys.exit(f"leash: the demo (pid {parent}) is gone; not starting {module}")
    sys.argv = [module, *args]  # run_module puts the module's file in argv[0]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
