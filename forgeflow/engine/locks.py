"""The file locks that keep one engine per ``FORGEFLOW_HOME``.

* ``engine-start.lock`` — held by whoever starts the engine (``forgeflow run`` with no engine
  running, ``forgeflow engine start``, the API) from "is one running?" until the new one answers:
  two first runs at once start one engine, and the second uses it.
* ``engine.lock`` — held by the engine process for its whole life (the kernel drops it when the
  process ends, however it ends): a second engine of the same home, started by hand, leaves at once
  instead of starting a second Prefect server and pools.

Both are ``flock`` locks on files that stay (a lock file holds no pid and needs no clean-up).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

START_LOCK = "engine-start.lock"
LIFETIME_LOCK = "engine.lock"


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)


@contextlib.contextmanager
def start_lock(home: Path, timeout: float) -> Iterator[None]:
    """Hold ``home``'s start lock, waiting up to ``timeout`` s for another starter to finish."""
    fd = _open(Path(home) / START_LOCK)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"another process was starting the engine of {home} for over {timeout:g} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def hold_lifetime_lock(home: Path) -> int | None:
    """Take ``home``'s engine lock for the rest of this process's life: its descriptor, or None when
    another engine of ``home`` holds it."""
    fd = _open(Path(home) / LIFETIME_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
