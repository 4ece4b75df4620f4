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
def make_runner(settings, registry) -> Iterator[Callable[..., Any]]:
    """``make_runner(kind="process", **setting_overrides)`` → a runner closed at teardown."""
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
def runner(make_runner):
    """A process runner with warm workers (the default)."""
    return make_runner("process")
