"""A job's first stage call, started as the engine takes the job, adopted by the stage's Prefect task.

Before a job's first stage can run as a Prefect task, the engine waits for its flow run: created,
set Running, its task run begun (~80 ms of Prefect requests on a warm host), and on a new user's
first ``forgeflow run`` the engine's Prefect server's whole start (~6 s on a 2-core machine). The
first stage's call needs none of it: its inputs are the job's input, known when the job arrives.
So the engine starts that call at once, through the same runner, and the stage's task takes it
over (:meth:`HeadStart.adopt`) instead of calling again: the job is still one flow run with one task
run per stage, and each task's result is its call's. The task run shows when it was adopted; the
stage's report and ``pipeline_stage_end`` carry the call's own duration.

What the call says before its task runs (progress) is held and replayed once the task has sent
``pipeline_stage_start``, so a job's messages keep their order. A head start is made only where
nothing could differ from the task's own call: a new job (not resumed, not a handed-over flow run)
whose pipeline validates; its task adopts it only when the call it would make is the same
(:class:`~forgeflow.engine.runners.base.ToolCall` equality). A cancel stops it like any call of the
job; a job that ends without adopting it (Prefect never answered, say) stops it
(:meth:`HeadStart.settle`). The engine makes one with
:func:`forgeflow.jobs.job_run.start_first_stage`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from forgeflow.engine.runners.base import CallResult, Progress, ProgressCallback, ToolCall
from forgeflow.pipeline.validation import ResolvedStage

__all__ = ["HeadStart"]

log = logging.getLogger("forgeflow.jobs")

#: Progress updates held until the stage's task adopts the call (the latest are kept).
HELD_PROGRESS = 256
#: How long a job that ended without adopting its head start waits for the stopped call to return.
SETTLE_WAIT_S = 30.0


class HeadStart:
    """One tool call running ahead of its stage's Prefect task (see the module's docstring)."""

    def __init__(self, call: ToolCall, stage: ResolvedStage, run: Callable[[ToolCall, ProgressCallback], CallResult]):
        self.call = call
        self.stage = stage
        #: When the call started (monotonic): its progress' rate counts from here.
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._held: collections.deque[Progress] = collections.deque(maxlen=HELD_PROGRESS)
        self._listener: ProgressCallback | None = None
        self._adopted = False
        self._done = threading.Event()
        self._result: CallResult | None = None
        self._error: BaseException | None = None
        name = f"head-start-{call.job_id}"[:60]
        threading.Thread(target=self._run, args=(run,), name=name, daemon=True).start()

    def _run(self, run: Callable[[ToolCall, ProgressCallback], CallResult]) -> None:
        try:
            self._result = run(self.call, self._progress)
        except BaseException as exc:  # handed to the task that adopts the call, as its own call would raise
            self._error = exc
        finally:
            self._done.set()

    def _progress(self, update: Progress) -> None:
        with self._lock:  # delivered in order: held ones are replayed under the same lock
            if self._listener is None:
                self._held.append(update)
            else:
                self._listener(update)

    def adopt(self, call: ToolCall) -> bool:
        """Whether ``call`` (what the stage's task would run) is this one, now taken over; only once."""
        with self._lock:
            if self._adopted or call != self.call:
                return False
            self._adopted = True
            return True

    def result(self, on_progress: ProgressCallback) -> CallResult:
        """The adopted call's result; its held progress goes to ``on_progress`` first, then the rest."""
        with self._lock:
            while self._held:
                on_progress(self._held.popleft())
            self._listener = on_progress
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def settle(self, cancel_job: Callable[[str], object] | None) -> None:
        """The job ended: a call its task never adopted is stopped (``cancel_job`` of the job's pool)
        and waited for, so that nothing of the job outlives it."""
        with self._lock:
            adopted = self._adopted
        if adopted or self._done.is_set():
            return
        if cancel_job is not None and self.call.job_id:
            cancel_job(self.call.job_id)
        if not self._done.wait(SETTLE_WAIT_S):
            log.warning("job %s: its first stage's call did not stop within %.0f s", self.call.job_id, SETTLE_WAIT_S)
