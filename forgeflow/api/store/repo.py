"""The API store: one object that routes, the launcher, batches, tests and benchmarks talk to.

:class:`Store` wires the store's parts once, over one :class:`~forgeflow.api.store.db.Database`
(the engine and the one write lock, so every write is one transaction under one lock):

* :class:`~forgeflow.api.store.ingest.Ingestor` — events in: dedupe by ``event_id``, a gapless
  ``seq`` per job, the events written, the derived job/stage/plugin state applied (from the pure
  reducer, :mod:`forgeflow.events.reduce`), all in one transaction, published after the commit;
* :class:`~forgeflow.api.store.jobs.JobRepo` — submitted jobs, their stage rows, cancel requests;
* :class:`~forgeflow.api.store.launches.LaunchBook` — the launcher's bookkeeping;
* :class:`~forgeflow.api.store.event_log.EventLog` — stored events read back;
* :class:`~forgeflow.api.store.templates.TemplateRepo`, :class:`~forgeflow.api.store.audit.AuditLog`,
  :class:`~forgeflow.api.store.plugins.PluginObservations`, :class:`~forgeflow.api.store.batches.BatchRepo`.

Its methods delegate to them (the names callers have always used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from forgeflow.api.store.audit import AuditLog
from forgeflow.api.store.batches import BatchRepo
from forgeflow.api.store.db import Database
from forgeflow.api.store.event_log import EventLog, StoredEvent
from forgeflow.api.store.ingest import Ingestor, Publish, ResolvePlugin
from forgeflow.api.store.jobs import JobRepo
from forgeflow.api.store.launches import LaunchBook
from forgeflow.api.store.plugins import PluginObservations
from forgeflow.api.store.rows import AuditRow, JobRow, PluginObservedRow, StageRow, TemplateRow
from forgeflow.api.store.templates import TemplateRepo, TemplateStats
from forgeflow.canonical import JsonObject
from forgeflow.events.models import Event


class Store:
    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.engine = self.db.engine
        self.dialect = self.db.dialect
        self.ingestor = Ingestor(self.db)
        self.jobs = JobRepo(self.db, self.ingestor)
        #: Submit a job (see :meth:`JobRepo.create <forgeflow.api.store.jobs.JobRepo.create>`).
        self.create_job = self.jobs.create
        self.launches = LaunchBook(self.db)
        self.event_log = EventLog(self.db)
        self.templates = TemplateRepo(self.db)
        self.audit = AuditLog(self.db)
        self.plugins = PluginObservations(self.db)
        self.batches = BatchRepo(self.db)

    def migrate(self) -> None:
        self.db.migrate()

    def close(self) -> None:
        self.db.close()

    def ping(self) -> None:
        self.db.ping()

    # --- events --------------------------------------------------------------------------------
    def ingest(
        self,
        batch: Iterable[Event],
        *,
        publish: Publish | None = None,
        resolve_plugin: ResolvePlugin | None = None,
        alive: Iterable[str] = (),
    ) -> list[StoredEvent]:
        """Store new events (duplicates by ``event_id`` are skipped), then publish them in order; the
        jobs named ``alive`` get their heartbeat in the same transaction."""
        return self.ingestor.ingest(batch, publish=publish, resolve_plugin=resolve_plugin, alive=alive)

    def events_after(self, job_id: str, after_seq: int, limit: int = 1000) -> list[StoredEvent]:
        return self.event_log.after_seq(job_id, after_seq, limit)

    def events_after_cursor(self, after_cursor: int, limit: int = 1000) -> list[StoredEvent]:
        return self.event_log.after_cursor(after_cursor, limit)

    def max_cursor(self) -> int:
        return self.event_log.max_cursor()

    def event_dicts(self, job_id: str) -> list[JsonObject]:
        return self.event_log.dicts(job_id)

    # --- jobs ----------------------------------------------------------------------------------
    def done_work(self, work_key: str) -> JobRow | None:
        return self.jobs.done_work(work_key)

    def get_job(self, job_id: str) -> JobRow | None:
        return self.jobs.get(job_id)

    def list_jobs(
        self, statuses: list[str] | None, limit: int, offset: int, template_id: str | None = None
    ) -> tuple[list[JobRow], int]:
        return self.jobs.page(statuses, limit, offset, template_id)

    def stage_rows(self, job_id: str) -> list[StageRow]:
        return self.jobs.stage_rows(job_id)

    def has_terminal(self, job_id: str) -> bool:
        return self.jobs.has_terminal(job_id)

    def set_cancel_requested(self, job_id: str, by: str | None = None) -> None:
        self.jobs.set_cancel_requested(job_id, by)

    # --- launcher bookkeeping --------------------------------------------------------------------
    def jobs_to_launch(self, limit: int) -> list[JobRow]:
        return self.launches.jobs_to_launch(limit)

    def launched_active_jobs(self) -> list[JobRow]:
        return self.launches.launched_active_jobs()

    def claim_launch(self, job_id: str) -> bool:
        return self.launches.claim_launch(job_id)

    def set_launched(
        self, job_id: str, pid: int | None, create_time: float | None, *, flow_run_id: str | None = None
    ) -> None:
        self.launches.set_launched(job_id, pid, create_time, flow_run_id=flow_run_id)

    def reset_launch(self, job_id: str) -> None:
        self.launches.reset_launch(job_id)

    def silent_jobs(self, job_ids: Iterable[str], silent_s: float) -> list[JobRow]:
        return self.launches.silent_jobs(job_ids, silent_s)

    # --- templates -------------------------------------------------------------------------------
    def create_template(
        self, template_id: str, name: str, definition: JsonObject, created_by: str | None = None
    ) -> TemplateRow:
        return self.templates.create(template_id, name, definition, created_by)

    def update_template(self, template_id: str, name: str, definition: JsonObject) -> TemplateRow | None:
        return self.templates.update(template_id, name, definition)

    def get_template(self, template_id: str) -> TemplateRow | None:
        return self.templates.get(template_id)

    def list_templates(self) -> list[TemplateRow]:
        return self.templates.all()

    def delete_template(self, template_id: str, by: str | None = None) -> bool:
        return self.templates.delete(template_id, by)

    def template_stats(self, template_id: str) -> TemplateStats:
        return self.templates.stats(template_id)

    # --- audit, meta, plugins --------------------------------------------------------------------
    def audit_entries(self, limit: int, offset: int = 0) -> tuple[list[AuditRow], int]:
        return self.audit.entries(limit, offset)

    def meta_value(self, key: str, factory: Callable[[], str]) -> str:
        return self.audit.meta_value(key, factory)

    def observed_plugins(self) -> dict[str, PluginObservedRow]:
        return self.plugins.observed()
