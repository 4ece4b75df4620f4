"""A worker's log file: where it is, how it is kept small, and the tail a crash error quotes.

Everything a plugin prints in its worker process goes to ``logs_dir/workers/<plugin>.log``
(appended, shared by the plugin's workers). A log past :data:`LOG_MAX_BYTES` loses its middle
(:func:`trim_log`); a crash message quotes what the worker wrote since its call began
(:func:`read_log_tail`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "LOG_KEEP_HEAD_BYTES",
    "LOG_KEEP_TAIL_BYTES",
    "LOG_MAX_BYTES",
    "LOG_TAIL_BYTES",
    "file_size",
    "read_log_tail",
    "trim_log",
    "worker_log_path",
]

#: Worker logs are trimmed when they pass this size: their head (how the workers started) and their
#: tail (what happened last) are kept, the middle goes.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP_HEAD_BYTES = 64 * 1024
LOG_KEEP_TAIL_BYTES = 1024 * 1024
#: How much of a worker's log a crash error quotes.
LOG_TAIL_BYTES = 2048


def worker_log_path(logs_dir: Path, plugin: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in plugin)
    return logs_dir / "workers" / f"{safe}.log"


def trim_log(
    path: Path, max_bytes: int = LOG_MAX_BYTES, head: int = LOG_KEEP_HEAD_BYTES, tail: int = LOG_KEEP_TAIL_BYTES
) -> bool:
    """Cut the middle of a log past ``max_bytes``, keeping its first ``head`` and last ``tail`` bytes
    with a line saying how much went. True when it trimmed. Writers use O_APPEND, so they go on at
    the new end."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return False
        with path.open("r+b") as fh:
            first = fh.read(head)
            first = first[: first.rfind(b"\n") + 1] or first  # whole lines
            fh.seek(max(size - tail, 0))
            last = fh.read()
            last = last[last.find(b"\n") + 1 :] or last
            cut = size - len(first) - len(last)
            fh.seek(0)
            fh.write(first + f"[... {cut} bytes of this log cut (over {max_bytes} bytes) ...]\n".encode() + last)
            fh.truncate()
    except OSError:
        return False
    return True


def read_log_tail(path: Path, since: int = 0, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of ``path`` written after offset ``since`` (as text)."""
    try:
        size = path.stat().st_size
        if since > size:  # truncated meanwhile
            since = 0
        start = max(since, size - limit)
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace").strip()


def file_size(path: Path) -> int:
    """The size of ``path`` in bytes (0 when it is not there): where a call's part of a log begins."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
