"""One call inside a worker: its context, its memory limit, and its outcome as a ``result`` message.

The sandboxed worker (:mod:`.worker`) runs each ``call`` message through :func:`run_request`; a
``batch`` (:mod:`.worker_batch`) runs each of its items through :func:`execute_call` in a thread of
its own; the inline runner (:mod:`.inline`) uses :func:`build_context` and :func:`execute_call` in
the job's own process. Per call: the address-space limit (``RLIMIT_AS``) is set to the current
``VmSize`` plus the call's memory limit and restored afterwards, ``/proc/self/clear_refs`` is reset so
``VmHWM`` gives the call's peak memory, and every exception becomes a typed result.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from forgeflow.engine.runners.protocol import int_field, object_field, text_field

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import JsonValue

    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore
    from forgeflow.plugins.sdk import Plugin, Tool, ToolContext
    from forgeflow.settings import Settings

#: ``FORGEFLOW_WORKER_RLIMIT_AS``: ``auto`` (default: on, except on hosts with an NVIDIA driver,
#: whose CUDA context reserves far more address space than it uses), ``on`` or ``off``. Where it is
#: off, the runner's resident-memory watchdog alone enforces the limit.
RLIMIT_ENV = "FORGEFLOW_WORKER_RLIMIT_AS"
#: Longest error message of a failed call (a plugin may raise with megabytes of text).
ERROR_MAX_CHARS = 16_000
_MEMORY_MESSAGES = ("can't allocate memory", "cannot allocate memory", "std::bad_alloc", "out of memory")


def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmSize, VmHWM, VmRSS ...), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rlimit_wanted() -> bool:
    mode = os.environ.get(RLIMIT_ENV, "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        return True
    return not os.path.exists("/dev/nvidiactl")


class AddressSpaceLimit:
    """``RLIMIT_AS`` soft limit = current VmSize + ``limit_mb`` for the duration of a call."""

    def __init__(self, limit_mb: int | None, enabled: bool) -> None:
        self.limit_mb = limit_mb
        self.enabled = enabled and limit_mb is not None
        self._previous: tuple[int, int] | None = None

    def __enter__(self) -> AddressSpaceLimit:
        if not self.enabled or self.limit_mb is None:
            return self
        import resource

        vmsize_kb = proc_status_kb("VmSize")
        if vmsize_kb is None:
            self.enabled = False
            return self
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        new = vmsize_kb * 1024 + int(self.limit_mb) * 1024 * 1024
        if hard != resource.RLIM_INFINITY:
            new = min(new, hard)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (new, hard))
            self._previous = (soft, hard)
        except (ValueError, OSError):
            self.enabled = False
        return self

    def restore(self) -> None:
        if self._previous is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self._previous)
            self._previous = None

    def __exit__(self, *exc: object) -> None:
        self.restore()


# --- one call ----------------------------------------------------------------------------------


def is_memory_error(exc: BaseException) -> bool:
    """A MemoryError, or what libraries raise instead when an allocation or mapping is refused."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, (ImportError, OSError)):
        # A shared library that cannot be mapped under RLIMIT_AS ("failed to map segment from
        # shared object"), or ENOMEM from the OS.
        text = str(exc).lower()
        return "failed to map segment" in text or "cannot allocate memory" in text
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        if "cuda" in text:  # GPU memory is not the stage's host-memory limit
            return False
        return any(m in text for m in _MEMORY_MESSAGES)
    return False


def build_context(
    settings: Settings,
    plugin: str,
    tool: str,
    job_id: str | None = None,
    stage_index: int | None = None,
    media_store: MediaStore | None = None,
    progress_sink: Callable[[JsonObject], None] | None = None,
    artifact_budget_bytes: int | None = None,
    checkpoint_key: str | None = None,
    resume: bool = False,
) -> ToolContext:
    from forgeflow.plugins.cache import OutputCache, job_cache_dir
    from forgeflow.plugins.checkpoints import Checkpoints
    from forgeflow.plugins.media import MediaStore
    from forgeflow.plugins.sdk import ToolContext

    cache_root = job_cache_dir(settings.cache_dir, job_id) if settings.reuse_outputs and job_id else None
    return ToolContext(
        cache=OutputCache(cache_root),
        media_store=media_store or MediaStore(settings.media_root),
        input_roots=list(settings.media_input_roots),
        max_bytes=settings.max_media_bytes,
        max_frames=settings.max_frames,
        max_pixels=settings.max_pixels,
        chunk_frames=settings.frame_chunk_frames,
        artifact_budget_bytes=artifact_budget_bytes
        if artifact_budget_bytes is not None
        else settings.max_artifact_bytes_per_job,
        checkpoints=Checkpoints(settings.checkpoints_dir),
        checkpoint_key=checkpoint_key,
        resume=resume,
        job_id=job_id,
        stage_index=stage_index,
        plugin=plugin,
        tool=tool,
        progress_sink=progress_sink,
        progress_interval_s=settings.progress_interval_s,
    )


def execute_call(
    tool: Tool,
    request: Mapping[str, JsonValue],
    ctx: ToolContext,
    *,
    enforce_memory: bool,
    measure_peak: bool,
    max_output_bytes: int | None = None,
) -> JsonObject:
    """Run one call and describe its outcome as a ``result`` message. Never raises. Outputs over
    ``max_output_bytes`` (as canonical JSON) are an ``OutputError``: they never leave the worker."""
    from forgeflow.canonical import canonical_bytes, storable_problem
    from forgeflow.plugins.errors import ForgeFlowError, StageMemoryExceeded

    limit_mb = int_field(request, "memory_limit_mb")
    label = f"{tool.plugin_name}.{tool.name}"
    peak_ok = measure_peak and reset_peak_memory()
    error: BaseException | None = None
    outputs: JsonObject | None = None
    limit = AddressSpaceLimit(limit_mb, enforce_memory and rlimit_wanted())
    start = time.perf_counter()
    try:
        with limit:
            outputs = tool.invoke(object_field(request, "config") or {}, object_field(request, "inputs") or {}, ctx)
    except BaseException as exc:
        error = exc
    finally:
        limit.restore()
        ctx.end_progress()  # nothing the tool left running may report after the result
    duration_ms = (time.perf_counter() - start) * 1000.0
    peak_kb = proc_status_kb("VmHWM") if peak_ok else None
    result: JsonObject = {
        "type": "result",
        "ok": error is None,
        "outputs": None,
        "error": None,
        "error_type": None,
        "traceback": None,
        "duration_ms": round(duration_ms, 3),
        "result_size_bytes": 0,
        "peak_memory_mb": round(peak_kb / 1024.0, 1) if peak_kb is not None else None,
        "recycle": False,
        "reused_outputs": ctx.cache.hits,
        "computed_outputs": ctx.cache.misses,
        "frames": seen.model_dump() if (seen := ctx.frames_seen()) is not None else None,
    }
    if error is None:
        stage = int_field(request, "stage_index")
        where = f"stage {stage} ({label})" if stage is not None else label
        try:
            size = result["result_size_bytes"] = len(canonical_bytes(outputs))
            if max_output_bytes is not None and size > max_output_bytes:
                result.update(
                    ok=False,
                    error=f"{where} returned {size} bytes of output, over the limit of {max_output_bytes} "
                    "(FORGEFLOW_MAX_OUTPUT_BYTES): store large data in the media store (ctx.media) and return its ref",
                    error_type="OutputError",
                )
                return result
            json.dumps(outputs, allow_nan=False)
            problem = storable_problem(outputs)
            if problem is not None:
                result.update(
                    ok=False, error=f"{where} returned outputs a job cannot store: {problem}", error_type="OutputError"
                )
                return result
            result["outputs"] = outputs
            return result
        except (TypeError, ValueError) as exc:
            result.update(
                ok=False, error=f"{label} returned outputs that are not valid JSON: {exc}", error_type="OutputError"
            )
            return result
    result["ok"] = False
    if is_memory_error(error):
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        where = f"its memory limit of {limit_mb} MB" if limit.enabled or limit_mb else "the memory available"
        if isinstance(error, (ImportError, OSError)):
            detail += "; importing a library needs address space too (torch's CUDA build maps about 4 GB)"
        result.update(
            error=f"{label} exceeded {where} ({detail})",
            error_type=StageMemoryExceeded.error_type,
            recycle=True,
        )
    elif isinstance(error, ForgeFlowError):
        result.update(error=error.message, error_type=error.error_type)
        if error.error_type not in ("ConfigError", "InputError", "OutputError"):
            result["traceback"] = _format_traceback(error)
    else:
        result.update(error=str(error) or type(error).__name__, error_type=type(error).__name__)
        result["traceback"] = _format_traceback(error)
    if isinstance(error, (SystemExit, KeyboardInterrupt)):
        result["recycle"] = True
    # What a plugin raises travels in messages and stores: a class name of at most 200 characters, a
    # message of at most ERROR_MAX_CHARS (its head and its tail).
    result["error_type"] = str(result["error_type"])[:200]
    text = str(result["error"])
    if len(text) > ERROR_MAX_CHARS:
        half = ERROR_MAX_CHARS // 2
        result["error"] = f"{text[:half]}\n[… {len(text) - 2 * half} characters cut …]\n{text[-half:]}"
    error.__traceback__ = None  # drop the frames (and whatever they allocated) now
    return result


def _format_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-16_000:]
    except Exception:  # pragma: no cover - formatting must never fail the call
        return f"{type(exc).__name__}: (traceback unavailable)"


def run_request(
    plugin: Plugin,
    request: Mapping[str, JsonValue],
    settings: Settings,
    *,
    measure_peak: bool,
    media_store: MediaStore | None = None,
    progress_sink: Callable[[JsonObject], None] | None = None,
) -> JsonObject:
    tool_name = text_field(request, "tool") or ""
    tool = plugin.tools.get(tool_name)
    if tool is None:
        return {
            "type": "result",
            "ok": False,
            "error": f"plugin {plugin.name!r} has no tool {tool_name!r}",
            "error_type": "UnknownTool",
            "duration_ms": 0.0,
        }
    ctx = request_context(settings, plugin.name, tool.name, request, media_store, progress_sink)
    return execute_call(
        tool, request, ctx, enforce_memory=True, measure_peak=measure_peak, max_output_bytes=settings.max_output_bytes
    )


def request_context(
    settings: Settings,
    plugin: str,
    tool: str,
    request: Mapping[str, JsonValue],
    media_store: MediaStore | None,
    progress_sink: Callable[[JsonObject], None] | None,
) -> ToolContext:
    """The context of the call ``request`` describes (a ``call`` message, or an item of a ``batch``)."""
    return build_context(
        settings,
        plugin,
        tool,
        text_field(request, "job_id"),
        int_field(request, "stage_index"),
        media_store=media_store,
        progress_sink=progress_sink,
        artifact_budget_bytes=int_field(request, "artifact_budget_bytes"),
        checkpoint_key=text_field(request, "checkpoint_key"),
        resume=bool(request.get("resume")),
    )
