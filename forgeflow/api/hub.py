"""The realtime event hub: fan-out of stored events to WebSocket subscribers.

``publish`` never blocks and never waits for a client: each subscriber has a bounded queue
(``ws_queue_size``); a subscriber whose queue is full is marked overflowed and dropped from the
hub (its connection is then closed with a reason and the client resumes by ``seq``/``cursor``).
Events reach the hub only after they are committed to the store, in commit order.

Thread-safety: ``publish_threadsafe`` may be called from any thread (the store calls it from the
thread that committed); delivery always happens on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from forgeflow.api.store import StoredEvent


@dataclass(frozen=True)
class Notice:
    """A message of the all-jobs stream that is no job's event (``batch_progress``): sent live to the
    streams open at the time, not stored, without a cursor (a client that missed one reads the state
    it reports from the API)."""

    text: str


@dataclass(eq=False)
class Subscription:
    job_id: str | None  # None: every job
    queue: asyncio.Queue[StoredEvent | Notice]
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    active: bool = True


class EventHub:
    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self._by_job: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.published = 0
        self.overflows = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + sum(len(s) for s in self._by_job.values())

    def subscribe(self, job_id: str | None) -> Subscription:
        sub = Subscription(job_id, asyncio.Queue(maxsize=self.queue_size))
        if job_id is None:
            self._all.add(sub)
        else:
            self._by_job.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.active = False
        if sub.job_id is None:
            self._all.discard(sub)
        else:
            subs = self._by_job.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    self._by_job.pop(sub.job_id, None)

    def publish(self, stored: Sequence[StoredEvent]) -> None:
        """Deliver events to matching subscribers (on the loop thread); overflowing ones are dropped."""
        for event in stored:
            self.published += 1
            targets = list(self._all)
            job_subs = self._by_job.get(event.job_id)
            if job_subs:
                targets.extend(job_subs)
            for sub in targets:
                if not sub.active:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    self.overflows += 1
                    self.unsubscribe(sub)
                    sub.overflowed.set()

    def notify(self, notice: Notice) -> None:
        """Deliver a notice to every all-jobs subscriber (on the loop thread); overflowing ones are dropped."""
        for sub in list(self._all):
            if not sub.active:
                continue
            try:
                sub.queue.put_nowait(notice)
            except asyncio.QueueFull:
                self.overflows += 1
                self.unsubscribe(sub)
                sub.overflowed.set()

    def notify_threadsafe(self, notice: Notice) -> None:
        """Schedule :meth:`notify` on the hub's loop (after the events published before it)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.notify, notice)
        except RuntimeError:
            pass

    def publish_threadsafe(self, stored: Sequence[StoredEvent]) -> None:
        """Schedule :meth:`publish` on the hub's loop; FIFO, so commit order is kept."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.publish, list(stored))
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass
