"""Chunk journals: a line per chunk a per-frame output has stored so far, in the call's checkpoints.

:class:`forgeflow.plugins.frames.FrameWriter` journals each chunk as it stores it
(:func:`journal_chunk`); a later attempt of the call resumes from the chunks still usable
(:func:`keep_journalled`), and a stage that overlaps reads them as a live feed
(:mod:`forgeflow.plugins.frame_feeds`). Where journals live is :mod:`forgeflow.plugins.checkpoints`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from forgeflow.plugins.frame_chunks import ChunkEntry

if TYPE_CHECKING:
    from pathlib import Path

    from forgeflow.plugins.media import MediaStore

__all__ = ["JournalEntry", "journal_chunk", "keep_journalled"]


class JournalEntry(ChunkEntry):
    """A line of a chunk journal: a chunk stored, and the items of each list column it holds."""

    counts: dict[str, int]


def keep_journalled(journal: Path, store: MediaStore) -> list[JournalEntry] | None:
    """The chunks a journal names that an attempt may continue from: those still in the store, in frame
    order, up to the first line a kill cut short or the first chunk lost. The journal is rewritten to
    hold just those, so what is appended next follows them. None: the journal cannot be rewritten."""
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []  # nothing journalled: nothing to keep
    except OSError:
        return None
    kept: list[JournalEntry] = []
    for line in lines:
        try:
            chunk: JournalEntry = json.loads(line)
            ref, first, last = chunk["ref"], int(chunk["first_frame"]), int(chunk["last_frame"])
        except (ValueError, KeyError, TypeError):
            break  # a line cut by the kill: what came before it holds
        if (kept and first <= kept[-1]["last_frame"]) or not store.has(ref):
            break
        kept.append({**chunk, "first_frame": first, "last_frame": last})
    try:
        tmp = journal.with_name(journal.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines[: len(kept)]), encoding="utf-8")
        tmp.replace(journal)
    except OSError:
        return None
    return kept


def journal_chunk(journal: Path, entry: JournalEntry) -> bool:
    """Append ``entry`` to ``journal``; False when it cannot be written (a read-only or full disk)."""
    try:
        journal.parent.mkdir(parents=True, exist_ok=True)
        with journal.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError:
        return False
    return True
