"""Processes that cfmae starts: they end when the process that started them ends, even when it is killed with
SIGKILL (which it cannot pass on), so that no worker is left holding memory or writing files for nobody."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to send this process SIGKILL when its parent ends (Linux ``prctl(PR_SET_PDEATHSIG)``).
    ``parent``: the PID the caller expects as its parent; when it is already gone (the parent died before this
    call), the process exits at once. Returns whether the request took effect (False on systems without
    ``prctl``, e.g. macOS, where workers can still outlive a killed parent)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # the parent died between fork and prctl
        os._exit(1)
    return True


def started_at(pid: int) -> float | None:
    """When the process ``pid`` started (seconds since the epoch, from ``/proc``), or None where that cannot be
    read (not Linux, a process that is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
