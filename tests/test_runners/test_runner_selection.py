"""Choosing a runner per pipeline and per stage: the definition, its published schema, the ToolCall a
stage makes, and the RunnerSet that dispatches it (the docker side: test_docker_runner.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.pipeline.definition import PipelineDefinition, pipeline_json_schema

from ._helpers import call

pytestmark = pytest.mark.fast


def test_a_stage_runner_overrides_the_pipelines():
    definition = PipelineDefinition.model_validate(
        {
            "runner": "docker",
            "stages": [{"plugin": "p", "tool": "a"}, {"plugin": "p", "tool": "b", "runner": "process"}],
        }
    )
    assert [definition.stage_runner(i) for i in range(2)] == ["docker", "process"]
    assert definition.stages[0].runner is None  # the JSON keeps what was written
    assert PipelineDefinition.model_validate(definition.model_dump()).stage_runner(0) == "docker"  # round trip
    seed = PipelineDefinition.model_validate({"pipeline": [{"plugin": "p", "tool": "a"}], "runner": "docker"})
    assert seed.stage_runner(0) == "docker"
    plain = PipelineDefinition.model_validate([{"plugin": "p", "tool": "a"}])
    assert plain.runner is None and plain.stage_runner(0) is None  # the host's default
    with pytest.raises(ValidationError):
        PipelineDefinition.model_validate({"stages": [{"plugin": "p", "tool": "a", "runner": "kubernetes"}]})


def test_a_stage_shared_by_two_definitions_keeps_each_pipelines_runner():
    one = PipelineDefinition.model_validate({"runner": "docker", "stages": [{"plugin": "p", "tool": "a"}]})
    two = PipelineDefinition(stages=one.stages, runner="process")
    assert (one.stage_runner(0), two.stage_runner(0)) == ("docker", "process")


def test_published_schema_knows_the_runner_field():
    import jsonschema

    schema = pipeline_json_schema()
    stage = schema["$defs"]["PipelineStage"]["properties"]["runner"]
    assert stage["anyOf"][0]["enum"] == ["process", "docker", "inline"]
    validator = jsonschema.Draft202012Validator(schema)
    good = {"plugin": "p", "tool": "t", "runner": "docker"}
    for document in ({"stages": [good], "runner": "process"}, {"pipeline": [good], "runner": "docker"}, [good]):
        assert validator.is_valid(document), document
        PipelineDefinition.model_validate(document)
    for bad in ({"stages": [{**good, "runner": "vm"}]}, {"stages": [good], "runner": "vm"}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ValidationError):
            PipelineDefinition.model_validate(bad)


class _Recording:
    """A runner that records the calls it gets (to see what the stage loop puts in a ToolCall)."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        self.calls.append(call)
        return CallResult(ok=True, outputs={"numbers": [1]} if call.tool == "numbers" else {})

    def close(self) -> None:
        pass


def test_each_stage_call_carries_the_runner_its_pipeline_asks_for(registry, settings):
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.stages import JobRun, Services, execute
    from forgeflow.pipeline import outcome

    runner = _Recording()
    services = Services(settings, registry, runner, MemorySink())
    definition = PipelineDefinition.model_validate(
        {
            "runner": "docker",
            "stages": [
                {"plugin": "testkit", "tool": "numbers"},
                {"plugin": "testkit", "tool": "noop", "runner": "inline"},
            ],
        }
    )
    execute(JobRun("job-r", services, outcome.pending_reports(definition.stages)), definition, None, {"count": 1})
    assert [(c.tool, c.runner) for c in runner.calls] == [("numbers", "docker"), ("noop", "inline")]
    assert ToolCall.model_validate(runner.calls[0].model_dump(mode="json")).runner == "docker"  # to the engine and back


def test_runner_set_dispatches_and_refuses_inline_on_a_real_host(make_runner_set):
    inline_host = make_runner_set("inline")
    assert inline_host.run(call("pid", runner="inline")).outputs == {"pid": os.getpid()}
    assert list(inline_host.runners()) == ["inline"]

    host = make_runner_set("process")
    refused = host.run(call("pid", runner="inline"))
    assert refused.error_type == "RunnerError" and "inline" in refused.error
    assert host.runners() == {}  # nothing was created, nothing ran


def test_a_job_cancelled_before_its_runner_exists_stays_cancelled(make_runner_set):
    host = make_runner_set("inline")
    assert host.cancel_job("job-c") == 0
    assert host.is_cancelled("job-c")
    result = host.run(call("noop", job_id="job-c"))
    assert result.error_type == "Cancelled" and host.runners() == {}
    host.forget_job("job-c")
    assert host.run(call("noop", job_id="job-c")).ok


def test_runner_set_status_is_empty_before_any_call(make_runner_set, settings):
    status: dict[str, Any] = make_runner_set("process").status()
    assert status == {
        "runners": [],
        "workers": [],
        "pools": [],
        "idle_memory_mb": 0.0,
        "idle_memory_budget_mb": settings.idle_worker_memory_mb,
        "evicted": 0,
    }
