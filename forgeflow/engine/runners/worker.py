"""The sandboxed worker: ``python -m forgeflow.engine.runners.worker --plugin NAME``.

One worker process serves one plugin. It loads the plugin **only** from its installed entry point
(group ``forgeflow.plugins``), never from a path a request names, says ``ready``, then answers
``call`` messages one at a time until its stdin closes (see :mod:`.protocol`).

Start-up, in order:

* the protocol gets private duplicates of fds 0 and 1; fd 0 becomes ``/dev/null`` and fd 1 becomes
  a copy of stderr (the worker's log file), and ``sys.stdout`` is ``sys.stderr``: a plugin's
  ``print``, ``input()`` or raw ``os.write(1, ...)`` can never corrupt or steal protocol bytes;
* ``PR_SET_PDEATHSIG = SIGKILL`` (the worker dies with the runner that started it) and
  ``faulthandler`` (a segfault leaves a Python traceback in the log).

Per call: the address-space limit (``RLIMIT_AS``) is set to the current ``VmSize`` plus the call's
memory limit and restored afterwards, ``/proc/self/clear_refs`` is reset so ``VmHWM`` gives the
call's peak memory, and every exception becomes a typed result (``error_type`` = the exception's
class name, or a ForgeFlow error's ``error_type``). After a ``MemoryError`` the worker answers, then
exits, so that the next call gets a fresh process with an unfragmented heap.

``--media-out DIR`` (the Docker runner's containers, whose media root is mounted read-only): media a
tool stores go to ``DIR``, which the runner imports into the host's media store after each call;
reading still sees the whole store. The protocol is the same over the container's stdin/stdout.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
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


# --- process set-up ----------------------------------------------------------------------------


def isolate_stdio() -> tuple[int, int]:
    """Give the protocol private copies of fds 0/1 and point the real ones away from it."""
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr
    return proto_in, proto_out


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


# --- plugin loading ----------------------------------------------------------------------------


def load_plugin(name: str) -> tuple[Plugin | None, str | None]:
    """The installed plugin named ``name`` (entry point group ``forgeflow.plugins``), or why not."""
    from importlib.metadata import entry_points

    from forgeflow.plugins.registry import ENTRY_POINT_GROUP, load_entry_point

    matches = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not matches:
        return None, f"no installed plugin named {name!r} (entry point group {ENTRY_POINT_GROUP!r})"
    entry = load_entry_point(matches[0])
    if not entry.available:
        return None, entry.unavailable_reason
    assert entry.plugin is not None  # an available entry has its plugin
    for module in entry.plugin.preload:
        try:
            importlib.import_module(module)
        except Exception as exc:
            return None, f"cannot preload {module!r}: {type(exc).__name__}: {exc}"
    return entry.plugin, None


def overlay_media_store(read_root: Path, write_root: Path) -> MediaStore:
    """A media store that reads from a read-only media root and writes new media to a writable
    folder (Docker mode)."""
    from forgeflow.plugins.errors import MediaNotFound
    from forgeflow.plugins.media import MediaInfo, MediaStore

    read_store = MediaStore(read_root)

    class Overlay(MediaStore):
        def path(self, ref: str) -> Path:
            try:
                return read_store.path(ref)
            except MediaNotFound:
                return MediaStore.path(self, ref)

        def info(self, ref: str) -> MediaInfo:
            try:
                return read_store.info(ref)
            except MediaNotFound:
                return MediaStore.info(self, ref)

    return Overlay(write_root)


#: The name this went by when it was a class.
_OverlayMediaStore = overlay_media_store


# --- main loops ----------------------------------------------------------------------------------


def serve(plugin_name: str, proto_in: int, proto_out: int, media_out: Path | None = None) -> int:
    from forgeflow.engine.runners.protocol import read_message_blocking, write_message
    from forgeflow.settings import get_settings

    plugin, reason = load_plugin(plugin_name)
    if plugin is None:
        write_message(proto_out, {"type": "unavailable", "reason": reason})
        return 0
    settings = get_settings()
    store = overlay_media_store(settings.media_root, media_out) if media_out is not None else None
    write_message(proto_out, {"type": "ready", "pid": os.getpid(), "plugin": plugin.name, "version": plugin.version})
    from forgeflow.plugins.sdk import resource_loads

    def send_progress(update: JsonObject) -> None:
        send({"type": "progress", **update})

    send_lock = threading.Lock()

    def send(reply: JsonObject) -> None:  # a batch's calls answer from their own threads
        with send_lock:
            write_message(proto_out, reply)

    while True:
        message = read_message_blocking(proto_in)
        if message is None or message.get("type") == "shutdown":
            return 0
        if message.get("type") == "batch":
            from forgeflow.engine.runners.worker_batch import run_batch

            if run_batch(plugin, message, settings, send, media_store=store):
                return 0
            continue
        if message.get("type") != "call":
            print(f"forgeflow worker: ignoring message of type {message.get('type')!r}", file=sys.stderr)
            continue
        result = run_request(
            plugin, message, settings, measure_peak=True, media_store=store, progress_sink=send_progress
        )
        result["resource_loads"] = resource_loads()
        send(result)
        if result.get("recycle"):
            return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgeflow-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", required=True, help="canonical name of an installed plugin")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--media-out", type=Path, help="writable folder for media a tool stores (Docker mode)")
    args = parser.parse_args(argv)

    proto_in, proto_out = isolate_stdio()
    faulthandler.enable(file=sys.stderr, all_threads=True)
    from forgeflow.processes import die_with_parent

    die_with_parent(args.parent_pid)
    print(
        f"[forgeflow worker pid={os.getpid()} plugin={args.plugin} started {time.strftime('%Y-%m-%dT%H:%M:%S')}]",
        file=sys.stderr,
        flush=True,
    )
    return serve(args.plugin, proto_in, proto_out, args.media_out)


if __name__ == "__main__":
    sys.exit(main())
