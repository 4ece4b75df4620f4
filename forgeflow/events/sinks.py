"""Where realtime messages go from a flow run.

``emit`` never blocks on I/O, so a hook holds its stage back by microseconds, not by a network
round trip. :class:`HttpSink` delivers batches to the API service from a background thread, in
order; while the service is unreachable it spools them to ``FORGEFLOW_HOME/spool`` and keeps
retrying, and what is still undelivered when the process ends stays in the spool, which the next
sink (or the API at start-up) delivers. Events carry an ``event_id``, so a batch delivered twice
is stored once. :class:`MemorySink` keeps events in the process (the CLI) and numbers them.

While a job of its process runs, :class:`HttpSink` also says so every ``heartbeat_s`` (an ingest
batch naming it under ``alive``): a host that dies takes its jobs' heartbeats with it, and the API
ends those jobs ``crashed`` instead of waiting for a flow run nobody will finish.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from forgeflow.canonical import JsonObject
from forgeflow.events import spool
from forgeflow.events.models import Event, is_terminal_event
from forgeflow.tls import tls_context

if TYPE_CHECKING:
    from forgeflow.settings import Settings

log = logging.getLogger(__name__)

INGEST_PATH = "/internal/v1/events"
#: Marks a queued event that goes out at once (see ``HttpSink._linger``); never sent.
_SEND_NOW = "__send_now__"


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything emitted is delivered (or spooled); True when delivered."""
        ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps events in memory, numbering them per job; optional listeners see each one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._seq: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        with self._lock:
            self._seq[event.job_id] += 1
            event = event.model_copy(update={"seq": self._seq[event.job_id]})
            self.events.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break the pipeline
                log.exception("event listener failed")

    def for_job(self, job_id: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.job_id == job_id]

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        pass


class FanoutSink:
    """Sends every event to several sinks (the CLI's progress display and the API, say)."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def flush(self, timeout: float = 10.0) -> bool:
        return all(sink.flush(timeout) for sink in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class HttpSink:
    """Delivers events to the API's ingest endpoint from a background thread, spooling on failure."""

    def __init__(
        self,
        api_url: str,
        token: str | None,
        spool_dir: Path,
        *,
        batch_size: int = 200,
        max_backoff_s: float = 5.0,
        request_timeout_s: float = 5.0,
        heartbeat_s: float = 5.0,
        linger_s: float = 0.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.url = self.api_url + INGEST_PATH
        self.spool_dir = Path(spool_dir)
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self.linger_s = linger_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(headers=headers, timeout=request_timeout_s, verify=tls_context())
        self._queue: queue.Queue[JsonObject] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._spool_lock = threading.Lock()
        self._spool_path = spool.new_spool_path(self.spool_dir)
        self.heartbeat_s = heartbeat_s
        self._open_jobs: set[str] = set()  # jobs that emitted something and have not ended
        self._next_heartbeat = 0.0
        self._thread = threading.Thread(target=self._run, name="forgeflow-event-sink", daemon=True)
        self._thread.start()

    # --- producer side ----------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        terminal = is_terminal_event(event)
        with self._pending_lock:
            self._pending += 1
            self._idle.clear()
            if terminal:
                self._open_jobs.discard(event.job_id)
            else:
                self._open_jobs.add(event.job_id)
        item = event.model_dump(mode="json")
        if terminal:
            item[_SEND_NOW] = True  # a job's last message is not held back (its job waits to end)
        self._queue.put(item)

    def track(self, job_id: str) -> None:
        """Say that ``job_id`` runs from now on, before it has emitted anything (a job that waits in
        this host's queue is alive too)."""
        with self._pending_lock:
            self._open_jobs.add(job_id)

    def forget(self, job_id: str) -> None:
        """Stop saying that ``job_id`` runs (it was stopped without a terminal message of its own)."""
        with self._pending_lock:
            self._open_jobs.discard(job_id)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait for delivery; what is not delivered by then is safe in the spool file."""
        if self._idle.wait(timeout):
            return True
        self._spool_queued()
        return False

    def close(self) -> None:
        if self._stop.is_set():
            return
        self.flush(timeout=10.0)
        self._stop.set()
        self._thread.join(timeout=self._client.timeout.read or 5.0)
        self._spool_queued()
        self._client.close()

    # --- delivery thread --------------------------------------------------------------------
    def _run(self) -> None:
        self._deliver_old_spools()
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._heartbeat()
                continue
            batch = self._linger([first, *self._take(self.batch_size - 1)])
            if self._post(batch):
                self._delivered(len(batch))
            else:
                self._outage(batch)

    def _heartbeat(self) -> None:
        """Say which jobs of this process still run, every ``heartbeat_s`` while some do (a batch
        of events says it too: each one's job is alive)."""
        now = time.monotonic()
        with self._pending_lock:
            alive = sorted(self._open_jobs)
        if not alive or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.heartbeat_s
        self._post([], alive=alive)

    def _linger(self, batch: list[JsonObject]) -> list[JsonObject]:
        """Wait up to ``linger_s`` for more events before a batch goes out, unless it is full or ends
        a job: a stage's end, the job's progress and the next stage's start come within milliseconds,
        and one request for them costs the API a third of three."""
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_size and not any(_SEND_NOW in item for item in batch):
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
            batch.extend(self._take(self.batch_size - len(batch)))
        for item in batch:
            item.pop(_SEND_NOW, None)
        return batch

    def _take(self, limit: int) -> list[JsonObject]:
        items: list[JsonObject] = []
        while len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _outage(self, batch: list[JsonObject]) -> None:
        """The service is unreachable: keep everything on disk, in order, and retry until it answers."""
        self._append_spool(batch)
        backoff = 0.2
        while not self._stop.wait(backoff):
            self._spool_queued()
            with self._spool_lock:
                events = spool.read_events(self._spool_path)
                if not events:
                    return
                if all(self._post(events[i : i + self.batch_size]) for i in range(0, len(events), self.batch_size)):
                    self._spool_path.unlink(missing_ok=True)
                    self._delivered(len(events))
                    return
            backoff = min(backoff * 2, self.max_backoff_s)

    def _spool_queued(self) -> None:
        items = self._take(1_000_000)
        for item in items:
            item.pop(_SEND_NOW, None)
        if items:
            self._append_spool(items)

    def _append_spool(self, batch: list[JsonObject]) -> None:
        with self._spool_lock:
            spool.append_events(self._spool_path, batch)

    def _delivered(self, count: int) -> None:
        with self._pending_lock:
            self._pending = max(0, self._pending - count)
            if self._pending == 0:
                self._idle.set()

    def _post(self, batch: list[JsonObject], alive: list[str] | None = None) -> bool:
        body: dict[str, list[JsonObject] | list[str]] = {"events": batch}
        if alive:
            body["alive"] = alive
        try:
            response = self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            log.debug("event delivery failed: %s", exc)
            return False
        if response.status_code >= 500 or response.status_code in (401, 403, 408, 429):
            log.warning("event delivery refused: %s %s", response.status_code, response.text[:200])
            return False
        if response.status_code >= 400:
            # A batch the service will never accept: keep it for a person, do not block the rest.
            log.error("event batch rejected: %s %s", response.status_code, response.text[:500])
            rejected = self.spool_dir / f"rejected-{uuid.uuid4().hex[:8]}.jsonl.bad"
            rejected.parent.mkdir(parents=True, exist_ok=True)
            rejected.write_text("".join(json.dumps(e) + "\n" for e in batch), encoding="utf-8")
        return True

    def _deliver_old_spools(self) -> None:
        """Deliver spool files left by processes that are gone, oldest first."""
        for file in spool.spool_files(self.spool_dir):
            if file.path == self._spool_path:
                continue
            claimed = spool.claim(file)
            if claimed is None:
                continue
            events = spool.read_events(claimed)
            if all(self._post(events[i : i + self.batch_size]) for i in range(0, len(events), self.batch_size)):
                claimed.unlink(missing_ok=True)
            else:
                spool.release(claimed)
                return


def sink_from_settings(settings: Settings) -> EventSink:
    """HttpSink to ``settings.api_url`` when set, else an in-memory sink."""
    if settings.api_url:
        token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
        if token is None and settings.api_token is not None:
            token = settings.api_token.get_secret_value()
        return HttpSink(
            settings.api_url,
            token,
            settings.spool_dir,
            heartbeat_s=settings.heartbeat_interval_s,
            linger_s=settings.event_linger_ms / 1000,
        )
    return MemorySink()
