"""``forgeflow worker``: Prefect's process worker, with ForgeFlow's command for each flow run.

A Prefect process worker starts one process per flow run, ``python -m prefect.engine`` by default,
which imports Prefect and ForgeFlow and loads models afresh each time. This worker is the same
worker (same work pool type, ``process``; same polling, limits, cancellation and crash handling)
whose flow-run command, unless the deployment sets one, is ``<this interpreter> -m
forgeflow.jobs.handoff``: the flow run is handed to the host's engine. A plain ``prefect worker
start`` on the same pool still works, with the cold command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from prefect.utilities.processutils import command_to_string
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

HANDOFF_MODULE = "forgeflow.jobs.handoff"


class HandoffJobConfiguration(ProcessJobConfiguration):
    """A flow run's process: the handoff, in the worker's own interpreter (no ``PATH`` lookup)."""

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id)
        if not self._command_configured:
            self.command = command_to_string([sys.executable, "-m", HANDOFF_MODULE])
            self._command_configured = True


class ForgeflowWorker(ProcessWorker):
    """:class:`~prefect.workers.process.ProcessWorker` whose flow runs go to the host's engine."""

    job_configuration = HandoffJobConfiguration


async def run_worker(pool: str, name: str | None, limit: int | None) -> None:
    async with ForgeflowWorker(work_pool_name=pool, name=name, limit=limit) as worker:
        await worker.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgeflow worker")
    parser.add_argument("--pool", default="forgeflow-process")
    parser.add_argument("--name", default=None)
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = parser.parse_args(argv)
    from forgeflow.redact import install_log_redaction

    install_log_redaction()
    try:
        asyncio.run(run_worker(args.pool, args.name, args.limit))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
