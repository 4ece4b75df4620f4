"""A job's annotated media: its result drawn on its ``input.media``, stored, named in its envelope.

What is drawn is what the pipeline's tools declare (``draws`` in :meth:`forgeflow.plugins.sdk.Plugin.tool`):
:func:`layers_of` reads it off the validated stages, so the stage loop draws a job without knowing any
plugin's output fields. :func:`with_annotated_media` is what the loop calls once a job ended: it renders
the media (:func:`forgeflow.jobs.annotate.annotate_media`), puts the file in the media store (uploading
it to the API on a worker host) and sets the envelope's ``annotated_media``
(:class:`~forgeflow.pipeline.outcome.AnnotatedMedia`) or, when drawing, encoding or storing failed,
``annotated_media_error``: annotation never fails a job. When every drawn field is a stream its stage
writes as a feed, :func:`drawn_live` / :func:`annotate_live` draw the video alongside the last stage.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from forgeflow.canonical import JsonObject
from forgeflow.jobs.annotate import Layers, annotate_media, has_drawable
from forgeflow.jobs.job_run import JobRun
from forgeflow.jobs.media_sync import MediaSync
from forgeflow.pipeline.outcome import AnnotatedMedia, ResultEnvelope
from forgeflow.pipeline.validation import ResolvedStage
from forgeflow.plugins.errors import MediaError
from forgeflow.plugins.frames import frame_fields, live_feed
from forgeflow.plugins.media import REF_PREFIX, MediaKind, MediaStore
from forgeflow.plugins.sdk import DrawKind, Tool
from forgeflow.settings import Settings

__all__ = [
    "Annotation",
    "annotate_job",
    "annotate_live",
    "annotated_filename",
    "drawn_live",
    "layers_of",
    "with_annotated_media",
]

log = logging.getLogger("forgeflow.jobs.annotate")

#: The annotated media, or why it was not made; ``(None, None)``: nothing to draw on or with.
Annotation = tuple[AnnotatedMedia | None, str | None]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def layers_of(tools: Iterable[Tool]) -> dict[DrawKind, str]:
    """Which result field holds each kind of drawing, as a pipeline's tools (in stage order) declare it
    in ``draws`` (a later stage's declaration of a kind wins, as its output would in the result)."""
    layers: dict[DrawKind, str] = {}
    for tool in tools:
        for field_name, kind in tool.draws:
            layers[kind] = field_name
    return layers


def _safe_name(job_id: str) -> str:
    return _UNSAFE.sub("_", job_id).strip("._")[:100] or "job"


def annotated_filename(job_id: str, kind: MediaKind) -> str:
    """The stored file's name: ``annotated-<job id>.mp4`` (a video) or ``.jpg`` (an image)."""
    return f"annotated-{_safe_name(job_id)}{'.mp4' if kind == 'video' else '.jpg'}"


def annotate_job(
    settings: Settings,
    job_id: str,
    job_input: JsonObject,
    result: JsonObject | None,
    layers: Layers,
    media_sync: MediaSync | None = None,
) -> Annotation:
    """The job's result drawn on its ``input.media``, stored: ``(annotated_media, None)``;
    ``(None, error)`` when that failed; ``(None, None)`` when there is nothing to draw on or with
    (no ``media``, nothing drawable, or ``FORGEFLOW_ANNOTATE_MEDIA=false``). Never raises."""
    media = job_input.get("media") if isinstance(job_input, dict) else None
    if not settings.annotate_media or not isinstance(media, str) or not media or not has_drawable(result, layers):
        return None, None
    assert result is not None
    try:
        store = MediaStore(settings.media_root)
        if media_sync is not None and media.startswith(REF_PREFIX) and not store.has(media):
            media_sync.fetch({"media": media})
        source = store.resolve(media, input_roots=settings.media_input_roots)
        folder = settings.jobs_dir / _safe_name(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".annotate-", dir=folder) as tmp:
            drawn = annotate_media(source, result, Path(tmp) / "annotated.mp4", store, layers=layers)
            info = store.put_file(
                drawn.path, filename=annotated_filename(job_id, drawn.kind), max_bytes=settings.max_media_bytes
            )
        if media_sync is not None:
            media_sync.upload({"annotated_media": info.ref})
    except MediaError as exc:
        return None, _failed(job_id, exc.message)
    except Exception as exc:  # a result of an unexpected shape, OpenCV, the disk: the job keeps its status
        return None, _failed(job_id, f"{type(exc).__name__}: {exc}")
    annotated = AnnotatedMedia(
        ref=info.ref, media_type=info.media_type, kind=info.kind, size_bytes=info.size_bytes, frames=drawn.frames
    )
    return annotated, None


def _failed(job_id: str, message: str) -> str:
    error = f"annotated media not made: {message}"[:4000]
    log.warning("job %s: %s", job_id, error)
    return error


def drawn_live(run: JobRun, stages: Sequence[ResolvedStage], layers: Layers, input_data: JsonObject) -> dict[str, int]:
    """The drawn fields and the stages that make them, when the job's media can be annotated while its
    last stage runs: each is a ``FrameStream`` its stage writes as a feed. Empty otherwise (the job is
    annotated after its stages)."""
    settings = run.services.settings
    if not settings.annotate_media or not isinstance(input_data.get("media"), str):
        return {}
    drawn = {key: run.field_stage[key] for key in layers.values() if key in run.field_stage}
    streamed = all(key in frame_fields(stages[index].tool.output_model) for key, index in drawn.items())
    return drawn if streamed else {}


def annotate_live(run: JobRun, drawn: dict[str, int], layers: Layers, input_data: JsonObject) -> Annotation:
    """The job's annotated media drawn from its stages' feeds while they still write (the video is read
    and encoded alongside the last stage, not after it); (None, None) when the job stopped first."""
    feeds: JsonObject = {}
    for key, index in drawn.items():
        ready = run.feeding.setdefault(index, threading.Event())
        while not ready.wait(0.1):
            if run.stopping.is_set():
                return None, None
        journal = run.checkpoints.journal(run.call_keys[index], key)
        if journal is None:
            return None, None
        feeds[key] = live_feed(journal)
    services = run.services
    return annotate_job(services.settings, run.job_id, input_data, feeds, layers, services.media_sync)


def with_annotated_media(
    run: JobRun,
    input_data: JsonObject,
    result: JsonObject,
    layers: Layers,
    envelope: ResultEnvelope,
    drawn: Annotation = (None, None),
) -> ResultEnvelope:
    """The envelope with the job's annotated media (:func:`annotate_job`; ``drawn`` when it was made
    while the stages ran) or the reason it could not be made; unchanged when there is nothing to draw.
    Never fails the job."""
    if not has_drawable(result, layers):
        return envelope
    services = run.services
    annotated, error = drawn
    if annotated is None:
        annotated, error = annotate_job(services.settings, run.job_id, input_data, result, layers, services.media_sync)
    if annotated is None and error is None:
        return envelope
    return envelope.model_copy(update={"annotated_media": annotated, "annotated_media_error": error})
