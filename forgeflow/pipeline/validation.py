"""Validation of a pipeline before anything runs.

Checks, in order, for every stage: the plugin exists (aliases resolve) and is not UNAVAILABLE,
the tool exists, the config fits the tool's config model, the timeout is sane, and every required
input field is provided — with a compatible type — by the job input or an earlier stage's output
(the context rule of DESIGN.md). All problems are collected, each naming the stage index, plugin,
tool and field, so a user fixes a pipeline in one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from forgeflow.engine.registry import PluginRegistry
from forgeflow.pipeline.compat import field_schema, incompatibility
from forgeflow.pipeline.definition import PipelineDefinition, PipelineStage
from forgeflow.plugins.errors import ForgeFlowError
from forgeflow.plugins.sdk import Tool
from forgeflow.settings import Settings, get_settings


class ValidationIssue(BaseModel):
    """One problem in a pipeline, located as precisely as possible."""

    stage_index: int | None = None
    plugin: str | None = None
    tool: str | None = None
    field: str | None = None
    error_type: str = "PipelineValidationError"
    message: str

    @property
    def location(self) -> str:
        """Where the problem is: ``stage 1 pose.estimate_poses field 'players'`` (parts that apply)."""
        where = []
        if self.stage_index is not None:
            where.append(f"stage {self.stage_index}")
        if self.plugin:
            where.append(f"{self.plugin}.{self.tool}" if self.tool else self.plugin)
        if self.field:
            where.append(f"field {self.field!r}")
        return " ".join(where)


class PipelineValidationError(ForgeFlowError):
    """The pipeline cannot run; ``issues`` says every reason."""

    error_type = "PipelineValidationError"

    def __init__(self, issues: list[ValidationIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(_issue_text(i) for i in issues) or "invalid pipeline")

    @property
    def first_stage(self) -> int | None:
        return next((i.stage_index for i in self.issues if i.stage_index is not None), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "error": self.message,
            "error_type": self.error_type,
            "issues": [i.model_dump() for i in self.issues],
        }


def definition_error(exc: ValidationError) -> PipelineValidationError:
    """A pipeline document that does not parse, as issues naming the stage and field."""
    issues = []
    for err in exc.errors():
        loc = list(err["loc"])
        stage_index = None
        if len(loc) >= 2 and loc[0] in ("stages", "pipeline") and isinstance(loc[1], int):
            stage_index = loc[1]
            loc = loc[2:]
        issues.append(
            ValidationIssue(
                stage_index=stage_index,
                field=".".join(str(p) for p in loc) or None,
                message=err["msg"],
            )
        )
    return PipelineValidationError(issues)


def parse_definition(data: Any) -> PipelineDefinition:
    """Parse a pipeline document (definition, seed list form, or bare list) or raise issues."""
    try:
        return PipelineDefinition.model_validate(data)
    except ValidationError as exc:
        raise definition_error(exc) from None


def _issue_text(issue: ValidationIssue) -> str:
    return f"{issue.location}: {issue.message}" if issue.location else issue.message


@dataclass(frozen=True)
class ResolvedStage:
    """A stage ready to run: canonical plugin, the tool, its config with defaults filled in."""

    index: int
    stage: PipelineStage
    plugin: str
    tool: Tool
    config: dict[str, Any]
    timeout_s: float
    input_fields: tuple[str, ...]
    output_fields: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.index}: {self.stage.plugin}.{self.stage.tool}"


@dataclass(frozen=True)
class ValidatedPipeline:
    definition: PipelineDefinition
    stages: tuple[ResolvedStage, ...]
    job_input_fields: tuple[str, ...] = field(default_factory=tuple)
    """Fields the stages read from the job input (what a template's user must provide)."""


def validate_pipeline(
    definition: PipelineDefinition,
    input_data: dict[str, Any] | None,
    registry: PluginRegistry,
    settings: Settings | None = None,
) -> ValidatedPipeline:
    """Resolve and check every stage; raise :class:`PipelineValidationError` listing all problems.

    ``input_data=None`` validates a template: required inputs that no stage provides are then
    expected from the job input rather than reported.
    """
    settings = settings or get_settings()
    issues: list[ValidationIssue] = []
    if input_data is not None and not isinstance(input_data, dict):
        raise PipelineValidationError([ValidationIssue(field="input", message="job input must be a JSON object")])
    if len(definition.stages) > settings.max_stages:
        issues.append(
            ValidationIssue(
                field="stages",
                message=f"{len(definition.stages)} stages is over the limit of {settings.max_stages}",
            )
        )
    # Context: field name -> (schema, defs, provider) where provider is "input" or a stage index.
    context: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {}
    job_input_fields: list[str] = []
    resolved: list[ResolvedStage] = []

    for index, stage in enumerate(definition.stages):

        def issue(message: str, field: str | None = None, error_type: str = "PipelineValidationError") -> None:
            issues.append(
                ValidationIssue(
                    stage_index=index,  # noqa: B023 - used immediately, inside the loop
                    plugin=stage.plugin,  # noqa: B023
                    tool=stage.tool,  # noqa: B023
                    field=field,
                    error_type=error_type,
                    message=message,
                )
            )

        timeout = definition.stage_timeout(index)
        if timeout > settings.max_stage_timeout_s:
            issue(f"timeout of {timeout:g}s is over the limit of {settings.max_stage_timeout_s:g}s", "timeout_seconds")
        if stage.memory_limit_mb is not None and stage.memory_limit_mb > (cap := settings.stage_memory_cap_mb()):
            issue(
                f"memory_limit_mb of {stage.memory_limit_mb} is over this host's limit of {cap} MB", "memory_limit_mb"
            )
        try:
            entry, tool = registry.tool(stage.plugin, stage.tool)
        except ForgeFlowError as exc:
            issue(exc.message, error_type=exc.error_type)
            continue
        try:
            config = tool.config_model.model_validate(stage.config).model_dump(mode="json")
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                issue(f"invalid config: {err['msg']}", f"config.{loc}" if loc else "config", "ConfigError")
            config = dict(stage.config)

        input_schema = tool.input_model.model_json_schema()
        input_fields = tuple(tool.input_model.model_fields)
        for name, info in tool.input_model.model_fields.items():
            dst, dst_defs = field_schema(input_schema, name)
            if name in context:
                src, src_defs, provider = context[name]
                if provider == "input" and input_data is not None:
                    _check_input_value(input_data[name], info, name, issue)
                elif provider != "input":
                    reason = incompatibility(src, dst, src_defs, dst_defs)
                    if reason:
                        issue(
                            f"input {name!r} from stage {provider} is incompatible: {reason}",
                            name,
                            "IncompatibleStages",
                        )
            elif input_data is not None and name in input_data:
                _check_input_value(input_data[name], info, name, issue)
                context[name] = ({}, {}, "input")
                job_input_fields.append(name)
            elif info.is_required():
                if input_data is None:
                    job_input_fields.append(name)
                    context[name] = ({}, {}, "input")
                else:
                    issue(
                        f"needs input {name!r} ({_type_text(dst)}) that neither the job input nor an earlier stage provides",
                        name,
                        "MissingInput",
                    )

        output_schema = tool.output_model.model_json_schema()
        output_fields = tuple(tool.output_model.model_fields)
        for name in output_fields:
            schema, defs = field_schema(output_schema, name)
            context[name] = (schema, defs, str(index))
        resolved.append(ResolvedStage(index, stage, entry.name, tool, config, timeout, input_fields, output_fields))

    if issues:
        raise PipelineValidationError(issues)
    return ValidatedPipeline(definition, tuple(resolved), tuple(dict.fromkeys(job_input_fields)))


def _check_input_value(value: Any, info: Any, name: str, issue: Any) -> None:
    annotation: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        issue(f"job input {name!r} has the wrong type: {msg}", name, "InputError")


def _type_text(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items", {})
        return f"array of {items.get('type') or items.get('$ref', 'any').rsplit('/', 1)[-1]}"
    return str(kind or "any")
