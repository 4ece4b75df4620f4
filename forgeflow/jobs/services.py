"""What a job run uses, built once per process: settings, plugins, a runner, an event sink, media sync.

:func:`current_services` gives this context's :class:`Services` (:func:`use_services` sets them for a
block, e.g. the engine's own), else a process-wide default built from the settings. Stage calls go to
this host's engine when one is running (its warm workers), else to a runner of this process's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forgeflow.engine.runners.base import Runner
from forgeflow.events.sinks import EventSink, sink_from_settings
from forgeflow.jobs.media_sync import MediaSync
from forgeflow.plugins.lifecycle import LifecycleStore
from forgeflow.plugins.registry import PluginRegistry
from forgeflow.settings import Settings, get_settings

if TYPE_CHECKING:
    from forgeflow.jobs.head_start import HeadStart

__all__ = ["ENGINE_PROCESS_ENV", "Services", "current_services", "use_services"]

#: Set in the engine's own process: its flow runs use its pools directly.
ENGINE_PROCESS_ENV = "FORGEFLOW_ENGINE_PROCESS"


@dataclass
class Services:
    settings: Settings
    registry: PluginRegistry
    runner: Runner
    sink: EventSink
    #: Fetches the media a stage reads from the API and uploads what it made (a host apart from the
    #: API: ``FORGEFLOW_API_URL`` set); None: this host's media store is the one (embedded mode).
    media_sync: MediaSync | None = None
    #: The job's first stage call, started by the engine ahead of its flow run (the engine's services
    #: of one job: :mod:`forgeflow.jobs.head_start`); its task takes it over.
    head_start: HeadStart | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, sink: EventSink | None = None) -> Services:
        """Services for a job run in this process. Stage calls go to this host's engine when one is
        running (its warm workers), else to a runner of this process's own."""
        from forgeflow.engine.runners import get_runner

        settings = settings or get_settings()
        registry = PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
        runner = _engine_runner(settings) or get_runner(settings, registry)
        sink = sink or sink_from_settings(settings)
        return cls(settings, registry, runner, sink, MediaSync.from_settings(settings))

    def is_cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled (runners that support cancelling know)."""
        check = getattr(self.runner, "is_cancelled", None)
        return bool(check and check(job_id))

    def close(self) -> None:
        self.runner.close()
        self.sink.close()
        if self.media_sync is not None:
            self.media_sync.close()


def _engine_runner(settings: Settings) -> Runner | None:
    from forgeflow.jobs.placement import stage_calls_on_engine

    if not stage_calls_on_engine(settings, in_engine=bool(os.environ.get(ENGINE_PROCESS_ENV))):
        return None
    from forgeflow.engine.client import EngineClient, EngineRunner

    client = EngineClient(settings.engine_socket_path)
    return EngineRunner(client) if client.alive() else None


_services_var: contextvars.ContextVar[Services | None] = contextvars.ContextVar("forgeflow_services", default=None)
_default_services: Services | None = None
_default_lock = threading.Lock()


def current_services() -> Services:
    """The services of this context (see :func:`use_services`), else the process-wide default."""
    services = _services_var.get()
    if services is not None:
        return services
    global _default_services
    with _default_lock:
        if _default_services is None:
            _default_services = Services.from_settings()
        return _default_services


@contextlib.contextmanager
def use_services(services: Services) -> Iterator[Services]:
    token = _services_var.set(services)
    try:
        yield services
    finally:
        _services_var.reset(token)
