"""A worker's side of a batch: the calls of several jobs to one batchable tool, run together.

The runner sends one ``batch`` message (see :mod:`.protocol`): the tool, the config all its calls
share, the longest a call's model pass waits for the others (``max_wait_ms``), the memory limit of
the whole batch, and one item per call (job, stage, inputs, artifact budget, checkpoint key).
Each item runs as an ordinary call (:func:`~.worker_call.execute_call`: its own ``ctx``, cache, media,
progress and typed result) in a thread of its own; their model passes meet in one
:class:`~forgeflow.plugins.batching.BatchGather`. Each item's ``progress`` and ``result`` messages
carry its ``item`` index and go out as they happen: a call that ends early is answered early, and
one that raises fails alone.

The address-space limit (``RLIMIT_AS``) is per process, so it is set once for the batch (the sum of
its calls' limits); the runner's resident-memory watchdog enforces the same sum from outside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore
    from forgeflow.plugins.sdk import Plugin
    from forgeflow.settings import Settings

__all__ = ["run_batch"]


def run_batch(
    plugin: Plugin,
    message: JsonObject,
    settings: Settings,
    send: Callable[[JsonObject], None],
    media_store: MediaStore | None = None,
) -> bool:
    """Run every item of a ``batch`` message, sending each item's progress and result through
    ``send`` (thread-safe); True when the worker must leave afterwards (a MemoryError, say)."""
    from forgeflow.engine.runners.protocol import number_field
    from forgeflow.engine.runners.worker_call import AddressSpaceLimit, execute_call, request_context, rlimit_wanted
    from forgeflow.plugins.batching import BatchGather
    from forgeflow.plugins.sdk import resource_loads

    listed = message.get("items")
    items = [item for item in listed if isinstance(item, dict)] if isinstance(listed, list) else []
    tool = plugin.tools.get(str(message.get("tool", "")))
    if tool is None:
        for index in range(len(items)):
            send(
                {
                    "type": "result",
                    "item": index,
                    "ok": False,
                    "error": f"plugin {plugin.name!r} has no tool {message.get('tool')!r}",
                    "error_type": "UnknownTool",
                    "duration_ms": 0.0,
                }
            )
        return False
    gather = BatchGather(len(items), float(number_field(message, "max_wait_ms") or 0.0) / 1000.0)
    lock = threading.Lock()
    recycle = False
    armed = threading.Event()

    def part(index: int, item: JsonObject) -> None:
        nonlocal recycle
        # this thread's malloc arena (64 MB of address space, reserved on its first allocation)
        # exists before the batch's address-space limit: it must not count against the calls
        bytearray(1 << 17)
        armed.wait()

        def progress(update: JsonObject) -> None:
            send({"type": "progress", "item": index, **update})

        result: JsonObject
        request: JsonObject = {**item, "tool": tool.name, "config": message.get("config") or {}}
        try:
            ctx = request_context(settings, plugin.name, tool.name, item, media_store, progress)
            ctx.gather = gather
            result = execute_call(
                tool,
                request,
                ctx,
                enforce_memory=False,  # the batch's limit is set once, around all of its calls
                measure_peak=False,  # VmHWM is the process's: the runner reports the batch's peak
                max_output_bytes=settings.max_output_bytes,
            )
        except BaseException as exc:  # building the context failed: the call fails, the batch goes on
            result = {"type": "result", "ok": False, "error": str(exc), "error_type": type(exc).__name__}
        finally:
            gather.leave()
        result.update(item=index, resource_loads=resource_loads())
        with lock:
            recycle = recycle or bool(result.get("recycle"))
        send(result)

    limit_mb = number_field(message, "memory_limit_mb")
    threads = [
        threading.Thread(target=part, args=(index, item), name=f"batch-item-{index}", daemon=True)
        for index, item in enumerate(items)
    ]
    for thread in threads:  # started (stacks mapped) before the limit
        thread.start()
    try:
        with AddressSpaceLimit(int(limit_mb) if limit_mb else None, rlimit_wanted()):
            armed.set()
            for thread in threads:
                thread.join()
    finally:
        armed.set()
    return recycle
