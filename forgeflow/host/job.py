"""One job of the host daemon (:class:`EngineJob`) and where its events go while it runs."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forgeflow.engine.control import JobState, JobView
from forgeflow.events.models import Event, is_terminal_event
from forgeflow.events.sinks import EventSink

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from pydantic import JsonValue

    from forgeflow.canonical import JsonObject


class NotAPipelineRun(Exception):
    """A handed-over flow run is not a run of the pipeline flow: the engine runs only those."""


class TerminalWatch:
    """Passes events on and remembers whether the job's terminal status went out; once ``muted``
    (the job was lost to its caller), passes nothing on."""

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.terminal_sent = False
        self.muted = False
        self.emitted = 0

    def emit(self, event: Event) -> None:
        if self.muted:
            return
        self.emitted += 1
        if is_terminal_event(event):
            self.terminal_sent = True
        self.inner.emit(event)

    def flush(self, timeout: float = 10.0) -> bool:
        return self.inner.flush(timeout)

    def close(self) -> None:  # the inner sink may serve other jobs: its owner closes it
        pass


class StreamSink:
    """Events of one job for a caller that streams them (``forgeflow run`` against the engine)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Event | None] = queue.Queue()

    def emit(self, event: Event) -> None:
        self.queue.put(event)

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        self.queue.put(None)


@dataclass(eq=False)  # a job is itself, not its field values
class EngineJob:
    job_id: str
    pipeline: JsonValue  # the pipeline as its JSON (the job's flow validates it)
    input: JsonObject
    sink: EventSink
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    status: JobState = "queued"  # queued: waiting for a job slot
    envelope: JsonObject | None = None
    waiting_for: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: A deployment's flow run that a Prefect worker handed over (run as it is, not created anew).
    flow_run: FlowRun | None = None
    #: Why the job was stopped without a word of its own (the process that handed it over died).
    lost: str | None = None
    watch: TerminalWatch | None = None

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id,
            status=self.status,
            submitted_at=self.submitted_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            waiting_for=self.waiting_for,
        )
