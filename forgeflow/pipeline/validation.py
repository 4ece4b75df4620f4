"""Validation of a pipeline before anything runs.

Checks, in order, for every stage: the plugin exists (aliases resolve) and is not UNAVAILABLE,
the tool exists, the config fits the tool's config model, the timeout is sane, and every required
input field is provided — with a compatible type — by the job input or an earlier stage's output
(the context rule of DESIGN.md). All problems are collected, each naming the stage index, plugin,
tool and field, so a user fixes a pipeline in one round.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from forgeflow.canonical import JsonObject
from forgeflow.pipeline.compat import field_schema, incompatibility
from forgeflow.pipeline.definition import PipelineDefinition, PipelineStage
from forgeflow.plugins.errors import ForgeFlowError
from forgeflow.plugins.registry import PluginRegistry
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


def definition_error(exc: ValidationError, stages_key: str | None = "stages") -> PipelineValidationError:
    """A pipeline document that does not parse, as issues naming the stage and field; an issue with the
    list of stages itself names ``stages_key`` (the key the document holds it under; None: nothing, the
    caller names the list)."""
    issues = []
    for err in exc.errors():
        loc = list(err["loc"])
        message = err["msg"]
        stage_index = None
        if len(loc) >= 2 and loc[0] in ("stages", "pipeline") and isinstance(loc[1], int):
            stage_index = loc[1]
            loc = loc[2:]
        elif loc in (["stages"], ["pipeline"]):  # the list of stages itself (empty, say)
            loc = [stages_key] if stages_key else []
            if err["type"] == "too_short":
                message = "a pipeline needs at least one stage"
        issues.append(
            ValidationIssue(
                stage_index=stage_index,
                field=".".join(str(p) for p in loc) or None,
                message=message,
            )
        )
    return PipelineValidationError(issues)


def parse_definition(data: object, *, list_named_by_caller: bool = False) -> PipelineDefinition:
    """Parse a pipeline document (definition, seed list form, or bare list) or raise issues. An issue
    with the list of stages names the key the document holds it under (``stages`` or ``pipeline``),
    or none for a bare list, or when ``list_named_by_caller`` (the caller wrapped a list its user sent)."""
    try:
        return PipelineDefinition.model_validate(data)
    except ValidationError as exc:
        stages_key: str | None = "stages"
        if list_named_by_caller or isinstance(data, list):
            stages_key = None
        elif isinstance(data, dict) and "stages" not in data and "pipeline" in data:
            stages_key = "pipeline"
        raise definition_error(exc, stages_key) from None


def _issue_text(issue: ValidationIssue) -> str:
    return f"{issue.location}: {issue.message}" if issue.location else issue.message


@dataclass(frozen=True)
class ResolvedStage:
    """A stage ready to run: canonical plugin, the tool, its config with defaults filled in."""

    index: int
    stage: PipelineStage
    plugin: str
    tool: Tool
    config: JsonObject
    timeout_s: float
    input_fields: tuple[str, ...]
    output_fields: tuple[str, ...]

    @property
    def name(self) -> str:
        """``plugin.tool`` with the canonical plugin name (whatever name or alias the stage used)."""
        return f"{self.plugin}.{self.tool.name}"


#: ``error_type`` of a stage that needs a field only a later stage produces (a warning while the job
#: input may still provide it; an error for a template, and for a job whose input does not).
STAGE_ORDER = "StageOrder"


@dataclass(frozen=True)
class ValidatedPipeline:
    definition: PipelineDefinition
    stages: tuple[ResolvedStage, ...]
    job_input_fields: tuple[str, ...] = field(default_factory=tuple)
    """Fields the stages read from the job input (what a template's user must provide)."""
    warnings: tuple[ValidationIssue, ...] = ()
    """What may still run but is likely a mistake: a job input field that a later stage produces
    (``StageOrder``; only when no job input was given to check)."""

    def canonical_definition(self) -> PipelineDefinition:
        """The definition with every stage's plugin named canonically (aliases resolved), as stored
        and reported everywhere; a stage written with an alias keeps it in ``plugin_alias``."""
        stages = []
        for resolved in self.stages:
            stage = resolved.stage
            if stage.plugin != resolved.plugin:
                stage = stage.model_copy(update={"plugin": resolved.plugin, "plugin_alias": stage.plugin})
            stages.append(stage)
        return self.definition.model_copy(update={"stages": stages})


def validate_pipeline(
    definition: PipelineDefinition,
    input_data: JsonObject | None,
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
    warnings: list[ValidationIssue] = []
    producers = _producers(definition, registry)

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
        if stage.plugin_alias is not None and _plugin_named(registry, stage.plugin_alias) != entry.name:
            issue(f"{stage.plugin_alias!r} is not a name of plugin {entry.name!r}", "plugin_alias")
        try:
            config = tool.config_model.model_validate(stage.config).model_dump(mode="json")
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                hint = ""
                if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:  # a misspelt option
                    close = difflib.get_close_matches(str(err["loc"][0]), list(tool.config_model.model_fields), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                issue(f"invalid config: {err['msg']}{hint}", f"config.{loc}" if loc else "config", "ConfigError")
            config = dict(stage.config)

        input_schema = model_schema(tool.input_model)
        input_fields = tuple(tool.input_model.model_fields)
        for name, info in tool.input_model.model_fields.items():
            dst, dst_defs = field_schema(input_schema, name)
            if name in context:
                src, src_defs, provider = context[name]
                if provider == "input" and input_data is not None:
                    _check_input_value(input_data[name], tool.input_model, name, issue)
                elif provider != "input":
                    reason = incompatibility(src, dst, src_defs, dst_defs)
                    if reason:
                        issue(
                            f"input {name!r} from stage {provider} is incompatible: {reason}",
                            name,
                            "IncompatibleStages",
                        )
            elif input_data is not None and name in input_data:
                _check_input_value(input_data[name], tool.input_model, name, issue)
                context[name] = ({}, {}, "input")
                job_input_fields.append(name)
            elif info.is_required():
                later = next(((i, label) for i, label in producers.get(name, ()) if i > index), None)
                if input_data is None:
                    job_input_fields.append(name)
                    context[name] = ({}, {}, "input")
                    if later is not None:
                        warnings.append(
                            ValidationIssue(
                                stage_index=index,
                                plugin=entry.name,
                                tool=stage.tool,
                                field=name,
                                error_type=STAGE_ORDER,
                                message=f"needs {name!r} from the job input, but {_order_hint(name, later)}",
                            )
                        )
                else:
                    hint = f"; {_order_hint(name, later)}" if later is not None else ""
                    issue(
                        f"needs input {name!r} ({_type_text(dst)}) that neither the job input nor an earlier "
                        f"stage provides{hint}",
                        name,
                        "MissingInput",
                    )

        output_schema = model_schema(tool.output_model)
        output_fields = tuple(tool.output_model.model_fields)
        for name in output_fields:
            schema, defs = field_schema(output_schema, name)
            context[name] = (schema, defs, str(index))
        resolved.append(ResolvedStage(index, stage, entry.name, tool, config, timeout, input_fields, output_fields))

    if issues:
        raise PipelineValidationError(issues)
    return ValidatedPipeline(definition, tuple(resolved), tuple(dict.fromkeys(job_input_fields)), tuple(warnings))


def _plugin_named(registry: PluginRegistry, name: str) -> str | None:
    try:
        return registry.resolve(name).name
    except ForgeFlowError:
        return None


def _producers(definition: PipelineDefinition, registry: PluginRegistry) -> dict[str, list[tuple[int, str]]]:
    """Output field → the stages that produce it, as ``(index, "plugin.tool")`` in order (stages whose
    plugin or tool does not resolve are left out: they get their own issue)."""
    producers: dict[str, list[tuple[int, str]]] = {}
    for index, stage in enumerate(definition.stages):
        try:
            entry, tool = registry.tool(stage.plugin, stage.tool)
        except ForgeFlowError:
            continue
        for name in tool.output_model.model_fields:
            producers.setdefault(name, []).append((index, f"{entry.name}.{tool.name}"))
    return producers


def _order_hint(name: str, later: tuple[int, str]) -> str:
    index, label = later
    return f"stage {index} {label} produces it: move that stage earlier, or pass {name!r} in the job input"


@functools.lru_cache(maxsize=4096)
def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A tool model's JSON Schema, made once per model (pydantic builds it anew on every call, which
    was most of a submission's validation). Shared: read it, never change it."""
    return model.model_json_schema()


@functools.lru_cache(maxsize=4096)
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = model.model_fields[name]
    annotation: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(annotation)


def _check_input_value(
    value: object, model: type[BaseModel], name: str, issue: Callable[[str, str | None, str], None]
) -> None:
    try:
        _field_adapter(model, name).validate_python(value)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        issue(f"job input {name!r} has the wrong type: {msg}", name, "InputError")


def _type_text(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items", {})
        return f"array of {items.get('type') or items.get('$ref', 'any').rsplit('/', 1)[-1]}"
    return str(kind or "any")
