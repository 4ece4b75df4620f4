"""What ``forgeflow run`` shows and writes: stage progress bars, the summary table and result, and
the ``--out`` folder (``result.json``, ``events.jsonl``, per-frame outputs as Parquet, annotated media)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from forgeflow.cli.output import console

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import JsonValue

    from forgeflow.events.models import Event
    from forgeflow.events.sinks import MemorySink
    from forgeflow.settings import Settings


def show_progress(progress: Progress, bars: list[TaskID], event: Event) -> None:
    index = getattr(event, "stage_index", None)
    if index is None or not 0 <= index < len(bars):
        return
    bar = bars[index]
    if event.type == "pipeline_stage_start":
        progress.start_task(bar)
        progress.update(bar, status="[yellow]running[/yellow]")
    elif event.type == "pipeline_stage_progress":
        # The bar counts what the tool counts (frames): "37/64 frames" or the tool's own message.
        count = f"{event.done:g}/{event.total:g}" if event.total else f"{event.done:g}"
        pace = f" · {event.rate:.1f}/s" if event.rate else ""
        pace += f" · ETA {_duration(event.eta_s)}" if event.eta_s is not None else ""
        status = f"[yellow]{event.message or count}{pace}[/yellow]"
        if event.total:
            progress.update(bar, total=event.total, completed=event.done, status=status)
        else:
            progress.update(bar, status=status)
    elif event.type == "pipeline_stage_end":
        if event.ok:
            total = progress.tasks[bar].total or 1
            progress.update(bar, completed=total, status=f"[green]done[/green] {event.duration_ms} ms")
        else:
            progress.update(bar, status="[red]failed[/red]")
        progress.stop_task(bar)


def print_summary(results: Console, envelope: Mapping[str, JsonValue], elapsed: float, job_id: str) -> None:
    """The stage table and the result's fields on ``results``; a failure's reason on stderr."""
    listed = envelope.get("stages", [])
    stages = [report for report in listed if isinstance(report, dict)] if isinstance(listed, list) else []
    # "0: plugin.tool" as the progress bars name it. No cell breaks mid-word: with two spaces between
    # columns and no side rules, the soccer pipeline's table fits 80 columns ("peak mem" wraps at its space).
    names = [f"{report['index']}: {report['plugin']}.{report['tool']}" for report in stages]
    table = Table(
        title=f"job {job_id} · {elapsed:.2f} s",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for column in ("stage", "status", "duration", "output", "peak mem"):
        table.add_column(
            column,
            justify="left" if column in ("stage", "status") else "right",
            no_wrap=column != "peak mem",
            min_width=max(map(len, names), default=0) if column == "stage" else None,
        )
    colors = {"completed": "green", "failed": "red", "skipped": "dim"}
    for report, name in zip(stages, names, strict=True):
        status = report["status"]
        table.add_row(
            name,
            f"[{colors.get(str(status), 'white')}]{status}[/]",
            f"{report['duration_ms']:.0f} ms" if report.get("duration_ms") is not None else "",
            _size(report.get("result_size_bytes")),
            f"{report['peak_memory_mb']:.0f} MB" if report.get("peak_memory_mb") else "",
        )
    results.print(table)
    result = envelope.get("result") if envelope["ok"] else envelope.get("partial_result")
    if isinstance(result, dict) and result:
        parts = [_described(key, value) for key, value in result.items()]
        results.print(("result · " if envelope["ok"] else "partial result · ") + ", ".join(parts))
    if not envelope["ok"]:
        console.print(
            f"[red]failed at stage {envelope.get('stage_failed')}: {envelope.get('error_type')}: {envelope.get('error')}[/red]"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _described(key: str, value: JsonValue) -> str:
    from forgeflow.plugins.frames import is_frames

    if isinstance(value, dict) and is_frames(value):
        return f"{key}: {value['frames']} frame(s) in {value['chunks']} chunk(s), {_size(value['size_bytes'])}"
    return f"{key}: {len(value)} item(s)" if isinstance(value, list) else f"{key}: {value!r}"[:80]


def _size(value: JsonValue) -> str:
    """A size in bytes as ``12.3 KB`` or ``512 B``; ``""`` for none (or what is not a number)."""
    if not isinstance(value, (int, float)):
        return ""
    return f"{value / 1024:.1f} KB" if value >= 1024 else f"{value} B"


def write_outputs(
    results: Console, out_dir: Path, envelope: Mapping[str, JsonValue], sink: MemorySink, settings: Settings
) -> None:
    from forgeflow.events.models import JobStatusEvent

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with (out_dir / "events.jsonl").open("w", encoding="utf-8") as fh:
        for event in sink.events:  # the result is in result.json: the terminal message has its summary
            shown = event.summarized() if isinstance(event, JobStatusEvent) else event
            fh.write(shown.model_dump_json() + "\n")
    written = [out_dir / "result.json", out_dir / "events.jsonl"]
    written += _write_frame_outputs(out_dir, envelope, settings)
    annotated = envelope.get("annotated_media")
    if isinstance(annotated, dict) and annotated:  # the job drew its result on its media and stored it: a copy
        from forgeflow.plugins import MediaError, MediaStore

        suffix = _ANNOTATED_SUFFIXES.get(
            str(annotated.get("media_type")), ".mp4" if annotated.get("kind") == "video" else ".jpg"
        )
        target = out_dir / f"annotated{suffix}"
        try:
            shutil.copyfile(MediaStore(settings.media_root).path(str(annotated["ref"])), target)
            written.append(target)
        except (MediaError, OSError) as exc:
            console.print(f"[yellow]annotated media {annotated['ref']} not copied: {exc}[/yellow]")
    elif envelope.get("annotated_media_error"):
        console.print(f"[yellow]{envelope['annotated_media_error']}[/yellow]")
    for path in written:
        results.print(f"wrote {path}")


def _write_frame_outputs(out_dir: Path, envelope: Mapping[str, JsonValue], settings: Settings) -> list[Path]:
    """``<output>.parquet`` for each per-frame output of the (partial) result, written a chunk at a time:
    what an analyst opens with pandas, polars or DuckDB (result.json names them by ref)."""
    from forgeflow.plugins import MediaError, MediaStore
    from forgeflow.plugins.frames import is_frames, write_frames_file

    result = envelope.get("result") if envelope.get("ok") else envelope.get("partial_result")
    store = MediaStore(settings.media_root)
    written = []
    for key, value in (result if isinstance(result, dict) else {}).items():
        if not (isinstance(value, dict) and is_frames(value)):
            continue
        target = out_dir / f"{key}.parquet"
        try:
            write_frames_file(value, store, target)
            written.append(target)
        except (MediaError, OSError) as exc:
            console.print(f"[yellow]{key} ({value['$frames']}) not written: {exc}[/yellow]")
    return written


#: The file suffix of the copy of a job's annotated media, by its media type.
_ANNOTATED_SUFFIXES = {"video/mp4": ".mp4", "image/jpeg": ".jpg", "image/png": ".png"}
_ANNOTATED_SUFFIXES = {"video/mp4": ".mp4", "image/jpeg": ".jpg", "image/png": ".png"}
