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

Per call (:mod:`.worker_call`): the address-space limit (``RLIMIT_AS``) is set to the current
``VmSize`` plus the call's memory limit and restored afterwards, ``/proc/self/clear_refs`` is reset so
``VmHWM`` gives the call's peak memory, and every exception becomes a typed result (``error_type`` =
the exception's class name, or a ForgeFlow error's ``error_type``). After a ``MemoryError`` the worker
answers, then exits, so that the next call gets a fresh process with an unfragmented heap.

``--media-out DIR`` (the Docker runner's containers, whose media root is mounted read-only): media a
tool stores go to ``DIR``, which the runner imports into the host's media store after each call;
reading still sees the whole store. The protocol is the same over the container's stdin/stdout.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.engine.runners.worker_batch import run_batch
from forgeflow.engine.runners.worker_call import (
    ERROR_MAX_CHARS,
    RLIMIT_ENV,
    build_context,
    execute_call,
    run_request,
)

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore
    from forgeflow.plugins.sdk import Plugin

#: What a call is and does lives in :mod:`.worker_call`; these names stay importable from here.
__all__ = ["ERROR_MAX_CHARS", "RLIMIT_ENV", "build_context", "execute_call", "load_plugin", "main", "serve"]

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


# --- plugin loading ----------------------------------------------------------------------------


def load_plugin(name: str) -> tuple[Plugin | None, str | None]:
    """The installed plugin named ``name`` (entry point group ``forgeflow.plugins``), or why not."""
    from forgeflow.plugins.registry import ENTRY_POINT_GROUP, installed_entry_points, load_entry_point

    matches = [ep for ep in installed_entry_points() if ep.name == name]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgeflow-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", help="canonical name of an installed plugin")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--media-out", type=Path, help="writable folder for media a tool stores (Docker mode)")
    parser.add_argument("--fork-server", type=int, metavar="FD", help="fork workers on the socket FD (.worker_fork)")
    parser.add_argument("--preload", action="append", default=[], help="a module the fork server imports first")
    args = parser.parse_args(argv)

    faulthandler.enable(file=sys.stderr, all_threads=True)
    from forgeflow.processes import die_with_parent

    die_with_parent(args.parent_pid)
    if args.fork_server is not None:
        from forgeflow.engine.runners.worker_fork import serve_forks

        return serve_forks(args.fork_server, args.preload, main)
    if not args.plugin:
        parser.error("--plugin is required")
    proto_in, proto_out = isolate_stdio()
    print(
        f"[forgeflow worker pid={os.getpid()} plugin={args.plugin} started {time.strftime('%Y-%m-%dT%H:%M:%S')}]",
        file=sys.stderr,
        flush=True,
    )
    return serve(args.plugin, proto_in, proto_out, args.media_out)


if __name__ == "__main__":
    sys.exit(main())
