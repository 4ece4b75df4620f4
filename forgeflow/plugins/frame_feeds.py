"""Live feeds: a per-frame output read while its stage still writes it (stages that overlap).

A producer journals each chunk it stores (one JSON line per chunk, :mod:`forgeflow.plugins.checkpoints`);
a consumer's input is then a live feed (``{"$frames_live": <journal>}``, :func:`live_feed`) whose
records it reads as lines appear (:func:`live_records`), until the producer's call ends
(:func:`end_feed`: its final value, or the failure a reader raises as :class:`UpstreamFailed`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypedDict, TypeGuard

from pydantic import JsonValue

from forgeflow.plugins.errors import InputError
from forgeflow.plugins.frame_chunks import chunk_rows, is_frames, manifest

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore

__all__ = [
    "LIVE_KEY",
    "LIVE_POLL_S",
    "LiveFeed",
    "UpstreamFailed",
    "end_feed",
    "has_chunks",
    "is_live",
    "live_feed",
    "live_records",
    "open_feed",
]


class UpstreamFailed(InputError):
    """The stage whose per-frame output this stage was reading as it grew failed before finishing it."""

    error_type = "UpstreamFailed"


#: The key of a live feed: a per-frame output its stage is still writing, named by its chunk journal.
LIVE_KEY: Final = "$frames_live"
#: How often a reader of a live feed looks for the next chunk.
LIVE_POLL_S = 0.05


#: A live feed's value: the journal of the chunks written so far.
LiveFeed = TypedDict("LiveFeed", {"$frames_live": str})


def is_live(value: object) -> TypeGuard[LiveFeed]:
    """Whether ``value`` is a live feed (an output still being written), not a finished one."""
    return isinstance(value, dict) and isinstance(value.get(LIVE_KEY), str)


def live_feed(journal: Path) -> JsonObject:  # a LiveFeed, as the JSON of a stage's inputs
    """The value a consumer stage gets for an output whose chunks are journalled to ``journal`` as they come."""
    return {LIVE_KEY: str(journal)}


def _end_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".end")


def has_chunks(journal: Path) -> bool:
    """Whether a chunk was journalled (a reader can start on it)."""
    try:
        return journal.stat().st_size > 0
    except OSError:
        return False


def open_feed(journal: Path) -> None:
    """A producer starts (again): no end is known yet."""
    _end_path(journal).unlink(missing_ok=True)


def end_feed(journal: Path, *, failed: str | None = None, value: JsonValue = None) -> None:
    """The producer's call ended with ``value`` (the output: inline records or an artifact): its
    readers finish with what they did not read yet, or, when it ``failed``, raise :class:`UpstreamFailed`."""
    end = _end_path(journal)
    try:
        end.parent.mkdir(parents=True, exist_ok=True)
        tmp = end.with_name(end.name + ".tmp")
        tmp.write_text(json.dumps({"failed": failed, "value": value}), encoding="utf-8")
        tmp.replace(end)
    except OSError:
        pass


def live_records(store: MediaStore, value: LiveFeed) -> Iterator[JsonObject]:
    """The records of a live feed as its chunks are journalled, until its producer's call ends."""
    journal = Path(value[LIVE_KEY])
    end = _end_path(journal)
    offset = 0
    chunks_read = 0
    while True:
        ended = end.exists()  # looked at before the journal: every line written before the end is read
        try:
            with journal.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            data = b""
        complete = data[: data.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            chunks_read += 1
            yield from chunk_rows(store, json.loads(line))
        if ended and not complete:
            marker = json.loads(end.read_text(encoding="utf-8"))
            if marker.get("failed"):
                raise UpstreamFailed(f"the stage writing this input failed: {marker['failed']}")
            final = marker.get("value")
            if is_frames(final):  # chunks not journalled here (a call reused from an earlier attempt)
                for chunk in manifest(store, final)[chunks_read:]:
                    yield from chunk_rows(store, chunk)
            elif isinstance(final, list) and chunks_read == 0:  # an output of one chunk or less: inline
                yield from final
            return
        if not complete:
            time.sleep(LIVE_POLL_S)
