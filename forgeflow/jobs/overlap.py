"""Stages that overlap: a stage reading a per-frame output starts on its first chunks while the stage
writing it still works on later ones, so a long job's wall time approaches its slowest stage.

Stage N+1 may start early when every field it takes from stage N is a ``FrameStream`` on both sides
(:func:`streamed_fields`). Stage N journals each chunk it stores (``<checkpoints>/<key>/<field>.jsonl``,
the same journal a resumed call continues from); once a chunk of each such field is there, stage N+1
starts with a **live feed** in place of the finished artifact (:func:`forgeflow.plugins.frames.live_feed`)
and reads the chunks as they are journalled. When stage N's call ends, its feeds end too
(:func:`end_feeds`): readers finish, or raise ``UpstreamFailed`` if it failed. Each stage is still its
own Prefect task (run from a thread of the flow, in its context), with its own timeout, memory limit
and worker; the messages of both interleave in one gapless stream. An output of at most one chunk is
never journalled (it stays inline): its reader starts when its writer ends, as without overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

from pydantic import JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.pipeline.validation import ResolvedStage
from forgeflow.plugins.checkpoints import Checkpoints
from forgeflow.plugins.frames import end_feed, frame_fields, has_chunks, keep_journalled, live_feed, open_feed
from forgeflow.plugins.media import MediaStore

__all__ = ["end_feeds", "prepare_feeds", "streamed_fields", "wait_for_feeds"]

#: How often the stage loop looks whether a running stage has journalled its first chunks.
FEED_POLL_S = 0.05


def streamed_fields(producer: ResolvedStage, consumer: ResolvedStage) -> tuple[str, ...]:
    """The fields ``consumer`` takes from ``producer``, when it can read every one of them while
    ``producer`` writes them (both sides ``FrameStream``); empty when it must wait for the end."""
    taken = set(consumer.input_fields) & set(producer.output_fields)
    streamed = set(frame_fields(producer.tool.output_model)) & set(frame_fields(consumer.tool.input_model))
    return tuple(sorted(taken)) if taken and taken <= streamed else ()


def _journals(checkpoints: Checkpoints, key: str, stage: ResolvedStage) -> list[Path]:
    paths = [checkpoints.journal(key, name) for name in frame_fields(stage.tool.output_model)]
    return [p for p in paths if p is not None]


def prepare_feeds(checkpoints: Checkpoints, key: str, stage: ResolvedStage, store: MediaStore, resume: bool) -> None:
    """Before a stage's call: its journals hold only the chunks a resumed call continues from (none
    otherwise) and no end, so nothing an earlier attempt left is read as this attempt's."""
    for journal in _journals(checkpoints, key, stage):
        open_feed(journal)
        if resume and stage.tool.resumable:
            keep_journalled(journal, store)  # the valid prefix, rewritten in place
        else:
            journal.unlink(missing_ok=True)


def end_feeds(
    checkpoints: Checkpoints,
    key: str | None,
    stage: ResolvedStage,
    failed: str | None,
    outputs: Mapping[str, JsonValue] | None = None,
) -> None:
    """A stage's call ended with ``outputs``: the readers of its feeds finish with them (or fail with
    ``failed``)."""
    if key is None:
        return
    for name in frame_fields(stage.tool.output_model):
        journal = checkpoints.journal(key, name)
        if journal is not None:
            end_feed(journal, failed=failed, value=(outputs or {}).get(name))


def wait_for_feeds(
    checkpoints: Checkpoints,
    producer: ResolvedStage,
    keys: dict[int, str],
    ready: threading.Event,
    future: Future[JsonObject],
    fields: tuple[str, ...],
) -> JsonObject | None:
    """Live feeds of ``fields`` once ``producer`` (running as ``future``) has journalled a chunk of
    each; None when it ends first (its outputs are then read as they are)."""
    while not future.done():
        if ready.is_set():
            journals = {name: checkpoints.journal(keys[producer.index], name) for name in fields}
            if all(j is not None and has_chunks(j) for j in journals.values()):
                return {name: live_feed(j) for name, j in journals.items() if j is not None}
        try:
            future.exception(timeout=FEED_POLL_S)
        except TimeoutError:
            pass
    return None
