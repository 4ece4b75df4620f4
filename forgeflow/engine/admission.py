"""Admission: at most N stages run on one device at once; the rest wait, and say so.

A stage's device comes from its config (``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``, which
is ``cuda:0`` on a host with an NVIDIA GPU and ``cpu`` elsewhere); a tool without a ``device`` runs
on ``cpu``. Slots per device come from ``settings.device_slots`` (default: one per CPU core for
``cpu``, one per GPU). :class:`AdmittedRunner` wraps the pool runner: a call holds a slot of its
device for its whole run, waiting (first come, first served) while all are taken.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, NotRequired, TypedDict, TypeVar

from pydantic import JsonValue

from forgeflow.engine.runners.base import CallResult, ProgressCallback, Runner, ToolCall
from forgeflow.pipeline.outcome import EndReason

__all__ = ["AdmittedRunner", "DeviceSlots", "DeviceState", "Ticket", "device_of", "host_gpu_count"]

#: The runner an :class:`AdmittedRunner` wraps.
RunnerT = TypeVar("RunnerT", bound=Runner)


class Ticket(TypedDict):
    """Who holds, or waits for, a slot of a device: a stage of a job (or a batch of them)."""

    job_id: str | None
    stage_index: int | None
    plugin: str
    tool: str
    since: NotRequired[float]  # when it began to wait (time.time())


class DeviceState(TypedDict):
    """One device's slots as :meth:`DeviceSlots.status` shows them."""

    slots: int
    running: list[Ticket]
    waiting: list[Ticket]


def host_gpu_count() -> int:
    """NVIDIA GPUs this host exposes (device files only: the engine never imports torch)."""
    return len([p for p in glob.glob("/dev/nvidia[0-9]*") if os.path.basename(p)[6:].isdigit()])


def device_of(config: Mapping[str, JsonValue], gpus: int) -> str:
    """The device a stage with ``config`` runs on: ``cpu`` or ``cuda:N``."""
    device = str(config.get("device") or "cpu").strip().lower()
    if device == "auto":
        return "cuda:0" if gpus else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device if device.startswith("cuda:") else "cpu"


@dataclass
class _Device:
    slots: int
    running: list[Ticket] = field(default_factory=list)
    waiting: list[Ticket] = field(default_factory=list)


class DeviceSlots:
    """Counting slots per device, first come first served, visible in :meth:`status`."""

    def __init__(self, configured: dict[str, int] | None = None, *, gpus: int | None = None) -> None:
        self.gpus = host_gpu_count() if gpus is None else gpus
        self.configured = dict(configured or {})
        self._cond = threading.Condition()
        self._devices: dict[str, _Device] = {}

    def slots_of(self, device: str) -> int:
        if device in self.configured:
            return max(1, int(self.configured[device]))
        if device.startswith("cuda") and "cuda" in self.configured:
            return max(1, int(self.configured["cuda"]))
        if device == "cpu":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        return 1

    def _device(self, name: str) -> _Device:
        if name not in self._devices:
            self._devices[name] = _Device(self.slots_of(name))
        return self._devices[name]

    def acquire(
        self,
        device: str,
        ticket: Ticket,
        *,
        cancelled: Callable[[], bool],
        on_wait: Callable[[str], None] | None = None,
    ) -> bool:
        """Take a slot of ``device`` for ``ticket`` (job, stage); False if cancelled while waiting."""
        with self._cond:
            state = self._device(device)
            if not state.waiting and len(state.running) < state.slots:
                state.running.append(ticket)
                return True
            ticket = {**ticket, "since": time.time()}
            state.waiting.append(ticket)
        if on_wait is not None:
            on_wait(f"waiting for a {device} slot: {state.slots} of {state.slots} busy")
        with self._cond:
            try:
                while True:
                    if cancelled():
                        return False
                    if state.waiting[0] is ticket and len(state.running) < state.slots:
                        state.running.append(ticket)
                        return True
                    self._cond.wait(0.25)
            finally:
                state.waiting.remove(ticket)
                self._cond.notify_all()

    def release(self, device: str, ticket: Ticket) -> None:
        with self._cond:
            state = self._device(device)
            for i, held in enumerate(state.running):
                if held.get("job_id") == ticket.get("job_id") and held.get("stage_index") == ticket.get("stage_index"):
                    del state.running[i]
                    break
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def status(self) -> dict[str, DeviceState]:
        with self._cond:
            return {
                name: {
                    "slots": d.slots,
                    "running": [t.copy() for t in d.running],
                    "waiting": [t.copy() for t in d.waiting],
                }
                for name, d in sorted(self._devices.items())
            }


class AdmittedRunner(Generic[RunnerT]):
    """A runner whose calls first take a slot of their device (see :class:`DeviceSlots`)."""

    def __init__(
        self, inner: RunnerT, slots: DeviceSlots, on_wait: Callable[[ToolCall, str], None] | None = None
    ) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "process")
        self.slots = slots
        self.on_wait = on_wait

    def is_cancelled(self, job_id: str | None) -> bool:
        check = getattr(self.inner, "is_cancelled", None)
        return bool(check and check(job_id))

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        device = device_of(call.config, self.slots.gpus)
        ticket: Ticket = {
            "job_id": call.job_id,
            "stage_index": call.stage_index,
            "plugin": call.plugin,
            "tool": call.tool,
        }
        admitted = self.slots.acquire(
            device,
            ticket,
            cancelled=lambda: self.is_cancelled(call.job_id),
            on_wait=partial(self.on_wait, call) if self.on_wait else None,
        )
        if not admitted:
            return CallResult.failure(EndReason.CANCELLED, "cancelled by request")
        try:
            return self.inner.run(call, on_progress)
        finally:
            self.slots.release(device, ticket)

    def close(self) -> None:
        self.inner.close()
