"""The pipeline definition model and validation before anything runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from forgeflow.pipeline.compat import incompatibility
from forgeflow.pipeline.definition import PipelineDefinition, PipelineStage, pipeline_json_schema
from forgeflow.pipeline.validation import PipelineValidationError, parse_definition, validate_pipeline

pytestmark = pytest.mark.fast

SEED_JOB = {
    "job_id": "job-123",
    "pipeline": [
        {
            "plugin": "forgesyte-yolo-tracker",
            "tool": "detect_players",
            "config": {"device": "cuda", "confidence": 0.25},
        },
        {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"model": "light"}},
        {"plugin": "classifier", "tool": "classify_actions", "config": {}},
    ],
}


def test_seed_example_model_as_written():
    pipeline = PipelineDefinition(
        stages=[
            PipelineStage(plugin="videotracker", tool="detect_players"),
            PipelineStage(plugin="pose", tool="estimate_poses"),
        ],
        timeout_seconds=60.0,
    )
    assert [s.plugin for s in pipeline.stages] == ["videotracker", "pose"]
    assert pipeline.stages[0].config == {}
    assert pipeline.timeout_seconds == 60.0
    assert pipeline.description == ""
    assert PipelineDefinition(stages=[PipelineStage(plugin="a", tool="b")]).timeout_seconds == 300.0


def test_seed_list_form_and_bare_list_are_accepted():
    from_job = parse_definition(SEED_JOB)
    assert [s.tool for s in from_job.stages] == ["detect_players", "estimate_poses", "classify_actions"]
    assert from_job.stages[0].config == {"device": "cuda", "confidence": 0.25}
    assert parse_definition(SEED_JOB["pipeline"]) == from_job


def test_per_stage_timeout_overrides_pipeline_timeout():
    pipeline = PipelineDefinition(
        stages=[PipelineStage(plugin="a", tool="b", timeout_seconds=5), PipelineStage(plugin="a", tool="c")],
        timeout_seconds=30,
    )
    assert pipeline.stage_timeout(0) == 5
    assert pipeline.stage_timeout(1) == 30


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan])
def test_non_positive_or_infinite_timeouts_are_rejected(timeout):
    with pytest.raises(PipelineValidationError) as err:
        parse_definition({"stages": [{"plugin": "a", "tool": "b"}], "timeout_seconds": timeout})
    assert err.value.issues[0].field == "timeout_seconds"


def test_empty_stage_list_and_unknown_fields_are_rejected():
    with pytest.raises(PipelineValidationError) as err:
        parse_definition({"stages": []})
    assert err.value.issues[0].field == "stages"
    with pytest.raises(PipelineValidationError) as err:
        parse_definition({"stages": [{"plugin": "a", "tool": "b", "confg": {}}]})
    assert err.value.issues[0].stage_index == 0
    assert err.value.issues[0].field == "confg"


def test_published_json_schema_describes_stages():
    schema = pipeline_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "stages" in schema["$defs"]["PipelineDefinition"]["required"]
    stage = schema["$defs"]["PipelineStage"]
    assert set(stage["required"]) == {"plugin", "tool"}
    assert stage["properties"]["timeout_seconds"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert stage["properties"]["memory_limit_mb"]["anyOf"][0]["maximum"] == 2**20


def test_published_json_schema_accepts_every_documented_form():
    import jsonschema

    validator = jsonschema.Draft202012Validator(pipeline_json_schema())
    examples = Path(__file__).resolve().parents[2] / "examples"
    for name in ("soccer-analysis.json", "seed-phase-12.json"):  # the seed's job form, with job_id and input
        document = json.loads((examples / name).read_text())
        assert validator.is_valid(document), name
        PipelineDefinition.model_validate(document)  # and the model agrees
    stage = {"plugin": "p", "tool": "t", "timeout_seconds": 5, "memory_limit_mb": 512, "retries": 1}
    for document in ({"stages": [stage], "timeout_seconds": 60}, {"pipeline": [stage]}, [stage]):
        assert validator.is_valid(document), document
        PipelineDefinition.model_validate(document)
    for bad in (
        {},
        {"stages": []},
        {"pipeline": [{"plugin": "p"}]},
        {"stages": [{**stage, "memory_limit_mb": 10**12}]},
        {"stages": [{**stage, "timeout_seconds": 0}]},
        {"stages": [stage], "extra": 1},
    ):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ValidationError):
            PipelineDefinition.model_validate(bad)


def test_memory_limit_is_capped_by_the_host(registry):
    from forgeflow.settings import Settings

    settings = Settings(max_stage_memory_mb=1024)
    stages = [{"plugin": "testkit", "tool": "noop", "memory_limit_mb": 2048}]
    with pytest.raises(PipelineValidationError) as exc:
        validate_pipeline(PipelineDefinition(stages=stages), {}, registry, settings)
    [issue] = exc.value.issues
    assert (issue.stage_index, issue.field) == (0, "memory_limit_mb")
    assert "1024 MB" in issue.message
    stages[0]["memory_limit_mb"] = 1024
    assert validate_pipeline(PipelineDefinition(stages=stages), {}, registry, settings).stages[0].index == 0
    assert Settings().stage_memory_cap_mb() > 0  # default: this host's physical memory


def test_valid_chain_resolves_aliases_and_fills_config_defaults(registry):
    validated = validate_pipeline(
        parse_definition({"pipeline": [{"plugin": "tk", "tool": "numbers"}, {"plugin": "testkit", "tool": "scale"}]}),
        {"count": 3},
        registry,
    )
    assert [s.plugin for s in validated.stages] == ["testkit", "testkit"]
    assert validated.stages[1].config == {"factor": 2}
    assert validated.job_input_fields == ("count",)


def issues_of(registry, document, input_data):
    with pytest.raises(PipelineValidationError) as err:
        validate_pipeline(parse_definition(document), input_data, registry)
    return err.value.issues


def test_unknown_plugin_and_tool_are_named_with_a_suggestion(registry):
    issues = issues_of(
        registry,
        {"pipeline": [{"plugin": "testkitt", "tool": "numbers"}, {"plugin": "testkit", "tool": "scal"}]},
        {"count": 1},
    )
    assert (issues[0].stage_index, issues[0].error_type) == (0, "UnknownPlugin")
    assert "did you mean 'testkit'" in issues[0].message
    assert (issues[1].stage_index, issues[1].error_type) == (1, "UnknownTool")
    assert "did you mean 'scale'" in issues[1].message


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [("needs-weights", "weights file not found"), ("broken-import", "No module named 'forgeflow_missing_dependency")],
)
def test_unavailable_plugins_are_rejected_with_their_reason(registry, plugin, reason):
    issues = issues_of(registry, {"pipeline": [{"plugin": plugin, "tool": "detect"}]}, {})
    assert issues[0].error_type == "PluginUnavailable"
    assert reason in issues[0].message


def test_config_of_the_wrong_type_names_the_field(registry):
    issues = issues_of(
        registry,
        {
            "pipeline": [
                {"plugin": "testkit", "tool": "numbers"},
                {"plugin": "testkit", "tool": "scale", "config": {"factor": "x"}},
            ]
        },
        {"count": 1},
    )
    assert [(i.stage_index, i.field, i.error_type) for i in issues] == [(1, "config.factor", "ConfigError")]


def test_missing_input_and_incompatible_types_are_named(registry):
    issues = issues_of(
        registry,
        {
            "pipeline": [
                {"plugin": "testkit", "tool": "numbers"},
                {"plugin": "testkit", "tool": "measure_text"},
                {"plugin": "testkit", "tool": "scale"},
                {"plugin": "testkit", "tool": "total"},
                {"plugin": "testkit", "tool": "label_total"},
            ]
        },
        {"count": 2},
    )
    by_stage = {i.stage_index: i for i in issues}
    assert set(by_stage) == {1, 4}
    assert by_stage[1].field == "text" and by_stage[1].error_type == "MissingInput"
    assert by_stage[4].field == "total" and by_stage[4].error_type == "IncompatibleStages"
    assert "integer is not string" in by_stage[4].message


def test_job_input_of_the_wrong_type_is_rejected(registry):
    issues = issues_of(registry, {"pipeline": [{"plugin": "testkit", "tool": "numbers"}]}, {"count": "many"})
    assert (issues[0].stage_index, issues[0].field, issues[0].error_type) == (0, "count", "InputError")
    issues = issues_of(registry, {"pipeline": [{"plugin": "testkit", "tool": "numbers"}]}, {"count": -5})
    assert issues[0].field == "count"  # the field's constraints (ge=0) apply too


def test_stage_count_and_timeout_limits(registry, monkeypatch):
    from forgeflow.settings import get_settings

    monkeypatch.setenv("FORGEFLOW_MAX_STAGES", "2")
    monkeypatch.setenv("FORGEFLOW_MAX_STAGE_TIMEOUT_S", "60")
    get_settings.cache_clear()
    issues = issues_of(
        registry,
        {"stages": [{"plugin": "testkit", "tool": "noop"}] * 3, "timeout_seconds": 3600},
        {},
    )
    assert any(i.field == "stages" and "limit of 2" in i.message for i in issues)
    assert any(i.field == "timeout_seconds" and i.stage_index == 0 for i in issues)


def test_template_validation_expects_missing_fields_from_the_job_input(registry):
    validated = validate_pipeline(
        parse_definition(
            {"pipeline": [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "scale"}]}
        ),
        None,
        registry,
    )
    assert validated.job_input_fields == ("count",)


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        ({"type": "integer"}, {"type": "number"}, True),
        ({"type": "number"}, {"type": "integer"}, False),
        ({"type": "array", "items": {"type": "integer"}}, {"type": "array", "items": {"type": "number"}}, True),
        ({"type": "array", "items": {"type": "string"}}, {"type": "array", "items": {"type": "number"}}, False),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, {"type": "integer"}, False),
        ({"type": "integer"}, {"anyOf": [{"type": "integer"}, {"type": "null"}]}, True),
        ({"enum": ["a", "b"]}, {"enum": ["a", "b", "c"]}, True),
        ({"type": "string"}, {"enum": ["a"]}, False),
        (
            {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}},
            {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
            True,
        ),
        (
            {"type": "object", "properties": {"y": {"type": "integer"}}},
            {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
            False,
        ),
        ({"type": "integer"}, {}, True),
    ],
)
def test_schema_compatibility(src, dst, ok):
    assert (incompatibility(src, dst) is None) is ok


def test_compatibility_follows_refs_between_models():
    src_defs = {
        "Player": {
            "type": "object",
            "properties": {"box": {"type": "array", "items": {"type": "number"}}},
            "required": ["box"],
        }
    }
    dst_defs = {
        "P": {
            "type": "object",
            "properties": {"box": {"type": "array", "items": {"type": "number"}}},
            "required": ["box"],
        }
    }
    src = {"type": "array", "items": {"$ref": "#/$defs/Player"}}
    dst = {"type": "array", "items": {"$ref": "#/$defs/P"}}
    assert incompatibility(src, dst, src_defs, dst_defs) is None
    dst_defs["P"]["required"] = ["box", "track_id"]
    assert "track_id" in incompatibility(src, dst, src_defs, dst_defs)


def test_a_stage_that_needs_what_a_later_stage_makes_is_named(registry):
    """``total`` first, ``scale`` (which makes its ``scaled``) last: a template (no job input) is valid
    but warned about, a job input without ``scaled`` is refused with the same hint, and a job input
    that gives ``scaled`` is fine."""
    definition = parse_definition(
        [{"plugin": "testkit", "tool": "total"}, {"plugin": "tk", "tool": "numbers"}, {"plugin": "tk", "tool": "scale"}]
    )
    hint = "stage 2 testkit.scale produces it: move that stage earlier, or pass 'scaled' in the job input"
    validated = validate_pipeline(definition, None, registry)
    [warning] = validated.warnings
    assert (warning.stage_index, warning.plugin, warning.field, warning.error_type) == (
        0,
        "testkit",
        "scaled",
        "StageOrder",
    )
    assert warning.message == f"needs 'scaled' from the job input, but {hint}"
    with pytest.raises(PipelineValidationError) as err:
        validate_pipeline(definition, {"count": 2}, registry)
    [issue] = err.value.issues
    assert issue.error_type == "MissingInput" and issue.message.endswith(hint)
    assert validate_pipeline(definition, {"count": 2, "scaled": [1]}, registry).warnings == ()
    in_order = parse_definition([{"plugin": "tk", "tool": "numbers"}, {"plugin": "tk", "tool": "scale"}])
    assert validate_pipeline(in_order, None, registry).warnings == ()


def test_a_misspelt_config_key_gets_a_suggestion(registry):
    with pytest.raises(PipelineValidationError) as err:
        validate_pipeline(
            parse_definition([{"plugin": "videotracker", "tool": "detect_players", "config": {"confidance": 0.3}}]),
            None,
            registry,
        )
    [issue] = err.value.issues
    assert issue.field == "config.confidance" and issue.error_type == "ConfigError"
    assert issue.message == "invalid config: Extra inputs are not permitted; did you mean 'confidence'?"


def test_the_canonical_definition_names_plugins_canonically_and_keeps_the_alias(registry):
    definition = parse_definition([{"plugin": "tk", "tool": "numbers"}, {"plugin": "testkit", "tool": "scale"}])
    canonical = validate_pipeline(definition, None, registry).canonical_definition()
    assert [(s.plugin, s.plugin_alias) for s in canonical.stages] == [("testkit", "tk"), ("testkit", None)]
    assert validate_pipeline(canonical, None, registry).canonical_definition() == canonical  # stable
    wrong = parse_definition([{"plugin": "testkit", "plugin_alias": "pose", "tool": "numbers"}])
    with pytest.raises(PipelineValidationError) as err:
        validate_pipeline(wrong, None, registry)
    assert err.value.issues[0].field == "plugin_alias"


def test_an_empty_list_of_stages_is_named_by_the_key_it_came_under():
    for document, field in (({"stages": []}, "stages"), ({"pipeline": []}, "pipeline"), ([], None)):
        with pytest.raises(PipelineValidationError) as err:
            parse_definition(document)
        assert err.value.issues[0].field == field, document
        assert err.value.issues[0].message == "a pipeline needs at least one stage"
