"""Where a job runs: one decision for the API, ``forgeflow run`` and a worker's flow run."""

from typing import Any

import pytest

from forgeflow.jobs.placement import JobOrigin, place_job, stage_calls_on_engine
from forgeflow.settings import Settings

pytestmark = pytest.mark.fast

API, CLI, FLOW_RUN = JobOrigin.API, JobOrigin.CLI, JobOrigin.FLOW_RUN
WITH_API = {"api_url": "http://127.0.0.1:8000"}


@pytest.mark.parametrize(
    ("origin", "settings", "engine_running", "no_engine", "where", "start_engine"),
    [
        # the API: the deployment's workers, or this host's engine (started if none runs)
        (API, {"launch": "deployment"}, False, False, "deployment", False),
        (API, {}, False, False, "engine", True),
        (API, {}, True, False, "engine", False),
        # forgeflow run: the running engine, one started in the background, or this process
        (CLI, {}, True, False, "engine", False),
        (CLI, {}, False, False, "engine", True),
        (CLI, {"auto_engine": False}, False, False, "here", False),
        (CLI, {"auto_engine": False}, True, False, "engine", False),
        (CLI, {}, True, True, "here", False),
        (CLI, {"use_engine": False}, True, False, "here", False),
        (CLI, {"runner": "inline"}, True, False, "here", False),
        (CLI, {"runner": "docker"}, False, False, "engine", True),
        # a worker's flow run: handed to a running engine when its events have an API to go to
        (FLOW_RUN, WITH_API, True, False, "engine", False),
        (FLOW_RUN, WITH_API, False, False, "here", False),
        (FLOW_RUN, {}, True, False, "here", False),
        (FLOW_RUN, {**WITH_API, "use_engine": False}, True, False, "here", False),
    ],
)
def test_where_a_job_runs(
    tmp_path: Any,
    origin: JobOrigin,
    settings: dict[str, Any],
    engine_running: bool,
    no_engine: bool,
    where: str,
    start_engine: bool,
) -> None:
    chosen = Settings(home=tmp_path, **{"auto_engine": True, **settings})  # the tests' environment turns it off
    placement = place_job(chosen, origin, engine_running=engine_running, no_engine=no_engine)
    assert (placement.where, placement.start_engine) == (where, start_engine)
    assert placement.where == "engine" or placement.reason  # running elsewhere always says why


def test_stage_calls_go_to_the_engine_only_from_outside_it_with_the_process_runner(tmp_path: Any) -> None:
    assert stage_calls_on_engine(Settings(home=tmp_path), in_engine=False)
    assert not stage_calls_on_engine(Settings(home=tmp_path), in_engine=True)
    assert not stage_calls_on_engine(Settings(home=tmp_path, runner="docker"), in_engine=False)
    assert not stage_calls_on_engine(Settings(home=tmp_path, use_engine=False), in_engine=False)
