"""One live worker process of one plugin: its pipes, how it is stopped, and its resident memory.

A worker runs ``python -m forgeflow.engine.runners.worker`` in a session (process group) of its own,
so killing it kills whatever it started too. The runner's pool (:mod:`.process`) owns workers; one
call's exchange with a worker is :mod:`.call_exchange`'s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from forgeflow.engine.runners.protocol import MessageReader, PeerClosed, write_message

if TYPE_CHECKING:
    from collections.abc import Mapping

    import psutil
    from pydantic import JsonValue

    from forgeflow.engine.runners.worker_fork import ForkedProcess

__all__ = ["CHILDREN_REFRESH_S", "Worker", "describe_exit"]

#: How often the watchdog refreshes the list of the worker's child processes.
CHILDREN_REFRESH_S = 1.0


def describe_exit(returncode: int | None) -> str:
    """``died with SIGSEGV (signal 11)`` / ``exited with code 3``."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
            return f"died with {name}"
        extra = " (killed from outside; the kernel's OOM killer?)" if -returncode == signal.SIGKILL else ""
        return f"died with {name} (signal {-returncode}){extra}"
    return f"exited with code {returncode}"


class Worker:
    """One live worker process of one plugin (used by one call at a time).

    What another kind of worker (the docker runner's containers) overrides: ``noun`` and
    ``killed_what`` (how messages name it), ``watch_memory`` (whether the runner's resident-memory
    watchdog applies), :meth:`kill`, :meth:`exit_description` and :meth:`out_of_memory`.
    """

    noun = "plugin process"
    killed_what = "its process group was killed"
    #: The parent's resident-memory watchdog enforces the call's limit on this worker.
    watch_memory = True
    #: How long a worker whose pipe closed gets to report how it ended.
    exit_wait_s = 1.0

    def __init__(
        self, plugin: str, proc: subprocess.Popen[bytes] | ForkedProcess, log_path: Path, key: object = None
    ) -> None:
        self.plugin = plugin
        self.key = key  # what calls it may serve besides its plugin (None: any call of the plugin)
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session=True: the worker leads its own group
        self.log_path = log_path
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin: IO[bytes] = proc.stdin
        # A cancel kills the worker (and closes its pipes) from another thread, possibly just as a
        # call is being sent: the lock keeps a send off a descriptor closed, or reused, under it.
        self._pipes_lock = threading.Lock()
        self.reader = MessageReader(proc.stdout.fileno())
        self.version: str | None = None
        self.calls = 0
        self.loads = 0  # resource() loads the worker has done (models): stays put while it is warm
        self.job_id: str | None = None  # the job whose call it is serving, None when idle
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self._ps: psutil.Process | None = None
        self._children: list[psutil.Process] = []
        self._children_at = 0.0

    # -- life ---------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: Mapping[str, JsonValue]) -> None:
        """Write one message to the worker; :class:`PeerClosed` when it was killed already."""
        with self._pipes_lock:
            if self._stdin.closed:
                raise PeerClosed("the worker's protocol stream was closed")
            write_message(self._stdin.fileno(), message)

    def kill(self) -> int | None:
        """SIGKILL the whole process group and reap the worker; its return code."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            rc = None
        self._close_pipes()
        return rc

    def stop(self, grace_s: float = 2.0) -> None:
        """Ask the worker to leave (close its stdin), then kill what is left of its group."""
        try:
            with self._pipes_lock:
                self._stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def exit_description(self, returncode: int | None) -> str:
        """How the worker ended (after :meth:`kill`): ``died with SIGSEGV (signal 11)`` ..."""
        return describe_exit(returncode)

    def out_of_memory(self) -> bool:
        """Whether the worker was killed for memory from outside (after :meth:`kill`)."""
        return False

    def _close_pipes(self) -> None:
        self.reader.close()
        with self._pipes_lock:  # after the kill: a send blocked on a full pipe has failed by now
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass

    # -- memory -------------------------------------------------------------------------------

    def group_rss(self) -> int:
        """Resident bytes of the worker and its (recursive) children."""
        import psutil

        now = time.monotonic()
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            if now - self._children_at > CHILDREN_REFRESH_S:
                self._children = self._ps.children(recursive=True)
                self._children_at = now
            total = int(self._ps.memory_info().rss)
        except psutil.Error:
            return 0
        for child in self._children:
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
