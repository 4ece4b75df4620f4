"""Group commit: writes that arrive together share one transaction.

Every write of the store holds its one write lock for the whole transaction (so events are published
in commit order). A submission's transaction is a few round trips to the database, and on PostgreSQL
each is a wake-up of another process: under a burst the lock, not the CPU, set the pace (py-spy of
the API: half the time no thread held the GIL, sixteen submissions waited on the lock).

:class:`GroupCommit` lets whoever takes the lock write everything that queued while it waited, in one
transaction, and hand each waiter its own outcome (leader and followers, no extra thread). A writer
that arrives alone writes alone, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Slot(Generic[Item, Result]):
    __slots__ = ("item", "outcome")

    def __init__(self, item: Item) -> None:
        self.item = item
        #: Empty until a group holding this item is written; then its one outcome.
        self.outcome: list[Result | BaseException] = []


class GroupCommit(Generic[Item, Result]):
    """Writes items in groups under ``lock``: ``write_group`` gets every item that queued while the
    lock was taken, in arrival order, and returns one outcome per item (it runs with the lock held).

    An exception that escapes ``write_group`` becomes every item's outcome.
    """

    def __init__(
        self, lock: threading.RLock, write_group: Callable[[list[Item]], list[Result | BaseException]]
    ) -> None:
        self._lock = lock
        self._write_group = write_group
        self._queue_lock = threading.Lock()
        self._queue: list[_Slot[Item, Result]] = []

    def submit(self, item: Item) -> Result:
        """Write ``item`` (with whatever else is queued, if this thread takes the lock first) and
        return its result, or raise its exception."""
        slot: _Slot[Item, Result] = _Slot(item)
        with self._queue_lock:
            self._queue.append(slot)
        with self._lock:
            # Set under the lock by whichever holder wrote this slot's group: read under it too.
            if not slot.outcome:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                try:
                    outcomes = self._write_group([s.item for s in group])
                    if len(outcomes) != len(group):
                        raise RuntimeError(f"a group of {len(group)} writes got {len(outcomes)} outcomes")
                except Exception as exc:  # every waiter gets it, as its own write would have
                    outcomes = [exc] * len(group)
                for queued, outcome in zip(group, outcomes, strict=True):
                    queued.outcome.append(outcome)
        outcome = slot.outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
