"""Process liveness, the one way ForgeFlow asks whether a recorded process still runs."""

from __future__ import annotations

import os
import signal

import psutil

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int, create_time: float | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not; with ``create_time``, a reused pid does not)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False  # the pid was reused
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def process_create_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), to tell it from a later process with its pid."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def die_with_parent(parent_pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux), so that no child
    outlives whoever started it, even a SIGKILLed one; exit now if the parent is already gone."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except Exception:  # pragma: no cover - non-Linux
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(70)
