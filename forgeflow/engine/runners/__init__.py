"""Sandboxed runners: run one tool call in isolation and report what came of it.

Three concrete runners:

* ``process`` (default): warm per-plugin worker processes (:mod:`.process`, :mod:`.worker`);
* ``docker``: warm per-plugin locked-down containers, the same pools and worker protocol
  (:mod:`.docker`);
* ``inline``: in the caller's process, **for plugin unit tests only** (:mod:`.inline`).

``get_runner(settings, registry)`` gives a :class:`~.dispatch.RunnerSet`: each call goes to the
runner it asks for (``ToolCall.runner``, from the stage's or the pipeline's ``runner``), else to
``settings.runner`` (``FORGEFLOW_RUNNER``); each concrete runner is created on its first call.

Every runner implements :class:`~forgeflow.engine.runners.base.Runner`: ``run(call)`` never raises
for anything a plugin does, and records lifecycle transitions in ``registry.lifecycle``.

This module also holds what the runners share on the parent side: resolving and validating a call
before anything is started, and recording lifecycle transitions without ever failing a call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forgeflow.canonical import JsonObject
from forgeflow.engine.runners.base import CallResult, FramesRead, Progress, ProgressCallback, Runner, ToolCall
from forgeflow.engine.runners.protocol import int_field, number_field, object_field, text_field
from forgeflow.pipeline.outcome import NOT_THE_PLUGINS_DOING
from forgeflow.plugins.errors import ForgeFlowError, InputError

if TYPE_CHECKING:
    from forgeflow.engine.runners.dispatch import RunnerSet
    from forgeflow.engine.runners.docker import DockerRunner
    from forgeflow.engine.runners.inline import InlineRunner
    from forgeflow.engine.runners.process import ProcessRunner
    from forgeflow.plugins.registry import PluginEntry, PluginRegistry
    from forgeflow.plugins.sdk import Tool
    from forgeflow.settings import Settings

__all__ = [
    "CallResult",
    "DockerRunner",
    "InlineRunner",
    "ProcessRunner",
    "Progress",
    "ProgressCallback",
    "Runner",
    "RunnerSet",
    "ToolCall",
    "get_runner",
]

log = logging.getLogger("forgeflow.runners")


def get_runner(settings: Settings, registry: PluginRegistry) -> RunnerSet:
    """The host's runner, a :class:`~.dispatch.RunnerSet`: each call to the runner it asks for,
    else to ``settings.runner`` (``process``, ``docker`` or ``inline``); see :mod:`.dispatch`."""
    from forgeflow.engine.runners.dispatch import RunnerSet

    return RunnerSet(settings, registry)


def __getattr__(
    name: str,
) -> (
    type[ProcessRunner] | type[InlineRunner] | type[DockerRunner] | type[RunnerSet]
):  # lazy: importing the package starts nothing heavy
    if name == "ProcessRunner":
        from forgeflow.engine.runners.process import ProcessRunner

        return ProcessRunner
    if name == "InlineRunner":
        from forgeflow.engine.runners.inline import InlineRunner

        return InlineRunner
    if name == "DockerRunner":
        from forgeflow.engine.runners.docker import DockerRunner

        return DockerRunner
    if name == "RunnerSet":
        from forgeflow.engine.runners.dispatch import RunnerSet

        return RunnerSet
    raise AttributeError(name)


@dataclass
class Prepared:
    """A call that passed the parent-side checks."""

    entry: PluginEntry
    tool: Tool

    @property
    def plugin(self) -> str:
        return self.entry.name


def prepare(registry: PluginRegistry, call: ToolCall) -> Prepared | CallResult:
    """Resolve plugin (aliases too) and tool, and validate config and inputs, before starting anything.

    Returns a failed :class:`CallResult` (UnknownPlugin, UnknownTool, PluginUnavailable, ConfigError,
    InputError) that names the plugin, tool and field, or the resolved call.
    """
    try:
        entry, tool = registry.tool(call.plugin, call.tool)
        tool.parse_config(call.config)
        tool.parse_inputs(call.inputs)
    except ForgeFlowError as exc:
        return CallResult.failure(exc.error_type, exc.message)
    except Exception as exc:  # a validator in plugin code that itself crashes
        return CallResult.failure(
            InputError, f"{call.plugin}.{call.tool}: validation failed: {type(exc).__name__}: {exc}"
        )
    return Prepared(entry, tool)


class LifecycleRecorder:
    """Writes lifecycle transitions to ``registry.lifecycle`` (may be None); never raises.

    Calls rejected before they reach a worker (unknown plugin or tool, unavailable plugin, invalid
    config or inputs) change no state: the plugin did nothing wrong, the caller did.
    """

    def __init__(self, registry: PluginRegistry) -> None:
        self.store = registry.lifecycle

    def _do(self, method: str, *args: str | float) -> None:
        if self.store is None:
            return
        try:
            getattr(self.store, method)(*args)
        except Exception:  # the lifecycle store must never fail a call
            log.warning("could not record lifecycle %s%s", method, args[:1], exc_info=True)

    def initialized(self, plugin: str) -> None:
        self._do("initialized", plugin)

    def running(self, plugin: str) -> None:
        self._do("running", plugin)

    def finished(self, plugin: str, result: CallResult) -> None:
        if result.error_type in NOT_THE_PLUGINS_DOING:  # cancelled, or its input refused: nothing failed in it
            self._do("ended_without_fault", plugin, result.duration_ms)
        elif result.ok:
            self._do("succeeded", plugin, result.duration_ms)
        else:
            self._do("failed", plugin, result.error or "", result.error_type or "Error", result.duration_ms)


def result_from_message(message: JsonObject) -> CallResult:
    """A worker's ``result`` message as a :class:`CallResult`."""
    return CallResult(
        ok=bool(message.get("ok")),
        outputs=object_field(message, "outputs") if message.get("ok") else None,
        error=text_field(message, "error"),
        error_type=text_field(message, "error_type"),
        traceback=text_field(message, "traceback"),
        duration_ms=float(number_field(message, "duration_ms") or 0.0),
        result_size_bytes=int_field(message, "result_size_bytes") or 0,
        peak_memory_mb=number_field(message, "peak_memory_mb"),
        reused_outputs=int_field(message, "reused_outputs") or 0,
        computed_outputs=int_field(message, "computed_outputs") or 0,
        frames=FramesRead.model_validate(message["frames"]) if message.get("frames") else None,
    )


def progress_relay(on_progress: ProgressCallback | None) -> Callable[[JsonObject], None] | None:
    """What passes a tool's ``{done, total, message}`` reports on to ``on_progress``: malformed
    reports are dropped and a callback that raises is logged, so neither can fail the call."""
    if on_progress is None:
        return None

    def relay(update: JsonObject) -> None:
        progress = Progress.from_message(update)
        if progress is None:
            return
        try:
            on_progress(progress)
        except Exception:
            log.warning("a progress callback failed", exc_info=True)

    return relay
