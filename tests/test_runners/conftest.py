"""Fixtures of the runner tests: settings for the per-test FORGEFLOW_HOME, and runners that are
always closed (no worker outlives its test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def settings(ff_home):
    from forgeflow.settings import get_settings

    return get_settings()


@pytest.fixture
def make_runner_set(settings, registry) -> Iterator[Callable[..., Any]]:
    """``make_runner_set(default="process", **setting_overrides)`` → what ``get_runner`` gives (a
    RunnerSet: each call to the runner it asks for), closed at teardown."""
    from forgeflow.engine.runners import get_runner

    made: list[Any] = []

    def factory(kind: str = "process", registry_=None, **overrides: Any) -> Any:
        runner = get_runner(settings.model_copy(update={"runner": kind, **overrides}), registry_ or registry)
        made.append(runner)
        return runner

    yield factory
    for runner in made:
        runner.close()


@pytest.fixture
def make_runner(make_runner_set) -> Callable[..., Any]:
    """``make_runner(kind="process", **setting_overrides)`` → the concrete runner of ``kind`` (made by
    the RunnerSet ``get_runner`` gives), closed at teardown."""

    def factory(kind: str = "process", registry_=None, **overrides: Any) -> Any:
        return make_runner_set(kind, registry_, **overrides).runner(kind)

    return factory


@pytest.fixture
def runner(make_runner):
    """A process runner with warm workers (the default)."""
    return make_runner("process")
