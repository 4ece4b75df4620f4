"""Pipeline definition, as the user writes it.

``PipelineStage`` and ``PipelineDefinition`` keep the seed's exact fields; ``timeout_seconds`` on
the definition is the per-stage timeout, a stage's own ``timeout_seconds`` overrides it.
A pipeline file may be the definition object or the seed's job form ``{"pipeline": [stages]}``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from forgeflow.canonical import JsonObject, JsonObjectField

#: Where a stage's tool call runs: warm sandboxed worker processes, warm locked-down Docker
#: containers, or the caller's own process (plugin unit tests only).
RunnerKind = Literal["process", "docker", "inline"]
RUNNER_DESCRIPTION = (
    "Where the tool call runs: 'process' (warm sandboxed worker processes), 'docker' (warm locked-down "
    "containers of the worker image) or 'inline' (plugin unit tests only; refused unless the host's own "
    "runner is inline). Default: the host's FORGEFLOW_RUNNER."
)


class PipelineStage(BaseModel):
    """One step: a plugin's tool with its config."""

    model_config = ConfigDict(extra="forbid")

    plugin: str = Field(min_length=1, max_length=200, description="Plugin name or alias.")
    plugin_alias: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The alias this stage was written with: ForgeFlow stores and reports every stage under "
        "the plugin's canonical name in `plugin` and keeps the alias here.",
    )
    tool: str = Field(min_length=1, max_length=200, description="Tool name.")
    config: JsonObjectField = Field(default_factory=dict, description="Tool configuration (validated by the tool).")
    timeout_seconds: float | None = Field(
        None, gt=0, description="This stage's timeout in seconds; default: the pipeline's."
    )
    retries: int = Field(0, ge=0, le=10, description="Prefect task retries for this stage.")
    memory_limit_mb: int | None = Field(
        None, ge=64, le=2**20, description="This stage's memory limit in MB; default: the host's (capped by the host)."
    )
    runner: RunnerKind | None = Field(
        None, description=RUNNER_DESCRIPTION + " A stage's runner overrides the pipeline's."
    )
    #: The pipeline's ``runner``, set by the definition that holds this stage (not part of the JSON).
    _pipeline_runner: RunnerKind | None = PrivateAttr(None)

    @field_validator("timeout_seconds")
    @classmethod
    def _positive_finite(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError("timeout_seconds must be a positive number")
        return value

    @property
    def effective_runner(self) -> RunnerKind | None:
        """The stage's own ``runner``, else its pipeline's; None: the host's default."""
        return self.runner or self._pipeline_runner


class PipelineDefinition(BaseModel):
    """An ordered list of stages; stage N's outputs feed stage N+1."""

    model_config = ConfigDict(extra="forbid")

    stages: list[PipelineStage] = Field(min_length=1, description="The stages, in order.")
    timeout_seconds: float = Field(300.0, gt=0, description="Timeout of each stage, in seconds.")
    description: str = Field("", max_length=10_000)
    runner: RunnerKind | None = Field(None, description=RUNNER_DESCRIPTION + " Applies to every stage without its own.")
    resume: bool = Field(
        False,
        description="Resume an earlier attempt of this job: a stage whose call completed before (same plugin "
        "version, tool, config and inputs) is not run again, and a resumable tool continues after the chunks "
        "an interrupted call wrote. POST /v1/jobs/{id}/retry sets it.",
    )

    @model_serializer(mode="wrap")
    def _without_default_resume(self, handler: SerializerFunctionWrapHandler) -> JsonObject:
        # `resume` is said only when set: every pipeline written before it keeps its exact JSON.
        data: JsonObject = handler(self)
        if not self.resume:
            data.pop("resume", None)
        return data

    @field_validator("timeout_seconds")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("timeout_seconds must be a positive number")
        return value

    @model_validator(mode="before")
    @classmethod
    def _accept_seed_list_form(cls, data: object) -> object:
        # The seed writes jobs as {"pipeline": [stages]}; a bare list of stages is accepted too.
        if isinstance(data, list):
            return {"stages": data}
        if isinstance(data, dict) and "stages" not in data and isinstance(data.get("pipeline"), list):
            rest = {k: v for k, v in data.items() if k in ("timeout_seconds", "description", "runner", "resume")}
            return {"stages": data["pipeline"], **rest}
        return data

    @model_validator(mode="after")
    def _stages_know_the_pipeline_runner(self) -> PipelineDefinition:
        # Each stage gets its own copy (a stage object may be shared with another definition).
        stages = []
        for given in self.stages:
            stage = given
            if stage._pipeline_runner != self.runner:
                stage = given.model_copy()
                stage._pipeline_runner = self.runner
            stages.append(stage)
        self.stages = stages
        return self

    def stage_timeout(self, index: int) -> float:
        return self.stages[index].timeout_seconds or self.timeout_seconds

    def stage_runner(self, index: int) -> RunnerKind | None:
        """The runner stage ``index`` asks for (its own, else the pipeline's); None: the host's default."""
        return self.stages[index].effective_runner

    @classmethod
    def from_legacy(cls, plugin_id: str, tool_name: str, config: JsonObject | None = None) -> PipelineDefinition:
        """A Phase 11 single-plugin job ``{plugin_id, tool_name, config}`` as a one-stage pipeline."""
        return cls(stages=[PipelineStage(plugin=plugin_id, tool=tool_name, config=config or {})])


def pipeline_json_schema() -> JsonObject:
    """The published JSON Schema of pipeline files (``forgeflow schema``): every form a pipeline file
    may take — the definition object (``stages``), the seed's job form (``{"pipeline": [...]}``, other
    job fields such as ``job_id`` and ``input`` allowed) and a bare list of stages."""
    definition = PipelineDefinition.model_json_schema()
    defs = definition.pop("$defs", {})
    defs["PipelineDefinition"] = definition
    stages = definition["properties"]["stages"]
    settings = {k: definition["properties"][k] for k in ("timeout_seconds", "description", "runner", "resume")}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://forgeflow.dev/schemas/pipeline.json",
        "title": "ForgeFlow pipeline",
        "anyOf": [
            {"$ref": "#/$defs/PipelineDefinition"},
            {
                "title": "Job form (the seed's)",
                "type": "object",
                "properties": {"pipeline": stages, **settings},
                "required": ["pipeline"],
                "not": {"required": ["stages"]},
            },
            {**stages, "title": "Stages"},
        ],
        "$defs": defs,
    }


def raw_stages(document: object) -> list[JsonValue]:
    """The stages of a pipeline document as written (a definition's JSON, the seed's
    ``{"pipeline": [...]}`` or a bare list), unvalidated; ``[]`` for anything else."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        stages = document.get("stages", document.get("pipeline"))
        return stages if isinstance(stages, list) else []
    return []
