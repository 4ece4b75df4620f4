"""The inline runner: runs a call in the caller's own process. **For plugin unit tests only.**

It gives the same results as the process runner for everything a plugin does *normally*: the same
validation and error types (``UnknownTool``, ``ConfigError``, ``InputError``, ``OutputError``,
the plugin's exception class name with a traceback, ``MemoryError``), the same ``outputs`` and
``result_size_bytes``, and the same lifecycle transitions. It gives **no isolation**: no timeout
(a hanging tool hangs the caller), no memory limit (``peak_memory_mb`` is None), and a segfault or
``os._exit`` takes the caller down with it. ForgeFlow never selects it outside tests
(``FORGEFLOW_RUNNER=inline`` is for a plugin's own test suite).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from forgeflow.engine.runners import LifecycleRecorder, prepare, progress_relay, result_from_message
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.engine.runners.worker_call import build_context, execute_call

if TYPE_CHECKING:
    from forgeflow.plugins.registry import PluginRegistry
    from forgeflow.settings import Settings


class InlineRunner:
    """Runs tool calls in this process, with the process runner's validation and results."""

    name = "inline"

    def __init__(self, settings: Settings, registry: PluginRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.lifecycle = LifecycleRecorder(registry)
        self._initialized: set[str] = set()
        self._lock = threading.Lock()

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        prepared = prepare(self.registry, call)
        if isinstance(prepared, CallResult):
            return prepared
        plugin = prepared.plugin
        with self._lock:
            first = plugin not in self._initialized
            self._initialized.add(plugin)
        if first:
            self.lifecycle.initialized(plugin)
        self.lifecycle.running(plugin)
        ctx = build_context(
            self.settings,
            plugin,
            prepared.tool.name,
            call.job_id,
            call.stage_index,
            progress_sink=progress_relay(on_progress),
            artifact_budget_bytes=call.artifact_budget_bytes,
            checkpoint_key=call.checkpoint_key,
            resume=call.resume,
        )
        request = {
            "config": call.config,
            "inputs": call.inputs,
            "memory_limit_mb": call.memory_limit_mb,
            "stage_index": call.stage_index,
        }
        message = execute_call(
            prepared.tool,
            request,
            ctx,
            enforce_memory=False,
            measure_peak=False,
            max_output_bytes=self.settings.max_output_bytes,
        )
        result = result_from_message(message)
        self.lifecycle.finished(plugin, result)
        return result

    def close(self) -> None:
        """Nothing to stop: no worker processes."""
