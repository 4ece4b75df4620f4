"""``PipelineExecutor``: the seed's entry point to run a pipeline and get its result envelope."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.jobs.flow import FlowResult, flow_parameters, pipeline_flow
from forgeflow.jobs.stages import PipelineFailed, Services, current_services, use_services
from forgeflow.pipeline.definition import PipelineDefinition

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun, State


class PipelineExecutor:
    """Runs a pipeline as one Prefect flow run (one task per stage) in this process.

    Each stage runs in the configured sandboxed runner; realtime messages go to the services'
    sink. ``execute`` returns ``{"ok": True, "result": {...}, "stages_executed": N}`` or
    ``{"ok": False, "error", "error_type", "stage_failed", "partial_result", ...}``.
    """

    def __init__(self, services: Services | None = None) -> None:
        self.services = services

    def execute(
        self,
        pipeline: PipelineDefinition | JsonObject | list[JsonValue] | None,
        input_data: JsonObject,
        job_id: str,
    ) -> JsonObject:
        document = pipeline.model_dump(mode="json") if isinstance(pipeline, PipelineDefinition) else pipeline
        services = self.services or current_services()
        parameters = flow_parameters(document, input_data, job_id, services.settings.jobs_dir / job_id)
        with use_services(services):
            state = pipeline_flow(**parameters, return_state=True)
        return self._envelope(state)

    def execute_flow_run(self, flow_run: FlowRun) -> JsonObject:
        """Run a flow run that exists already (one a deployment made, handed over by a Prefect
        worker) in this process, with its own parameters; returns the envelope like :meth:`execute`."""
        from prefect.client.schemas.objects import State
        from prefect.flow_engine import run_flow

        with use_services(self.services or current_services()):
            state = run_flow(pipeline_flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        assert isinstance(state, State)  # what run_flow returns for return_type="state" (the flow is sync)
        return self._envelope(state)

    @staticmethod
    def _envelope(state: State[FlowResult] | State[JsonObject]) -> JsonObject:
        from prefect.utilities.annotations import quote

        if state.is_completed():  # a completed run's envelope, quoted so that Prefect did not walk it
            envelope: object = state.result()
            if isinstance(envelope, quote):
                envelope = envelope.unquote()
            if isinstance(envelope, dict):
                return envelope
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, PipelineFailed):
            return outcome.envelope.to_dict()
        if isinstance(outcome, BaseException):
            raise outcome
        raise RuntimeError(f"flow run ended in state {state.type}: {state.message}")
