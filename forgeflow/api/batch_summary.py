"""A batch's summary for analysis: one row per file, as Parquet and as CSV.

Each row: the file's name and media ref, its status, the job that stands for it (and the earlier job
it reused, if any), how many attempts it took, the record counts of each output of its result
(``players``: frames, ``players.players``: boxes over all frames, a list output: its length), the
error and its type. Built from the store on request, so it is the batch's state at that moment
(final once the batch ended).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import TypedDict

from pydantic import JsonValue

from forgeflow.api.store.batches import FileState
from forgeflow.plugins.frames import is_frames

COLUMNS = ("position", "name", "media", "status", "job_id", "reused_from", "attempts", "records", "error", "error_type")


class FileView(TypedDict):
    """One file as ``GET /v1/batches/{id}`` shows it (:class:`~forgeflow.api.batch_models.BatchFile`)."""

    position: int
    name: str
    media: str | None
    job_id: str | None
    status: str
    reused_from: str | None
    attempts: int
    error: str | None
    error_type: str | None


class SummaryRow(FileView):
    """A row of the summary: the file, and its record counts as a JSON object text."""

    records: str


def _count(value: JsonValue) -> int:
    """A count a frames descriptor holds (null: none)."""
    return int(value) if isinstance(value, (int, float, str)) else 0


def record_counts(envelope: Mapping[str, JsonValue] | None) -> dict[str, int]:
    """Per output of the job's result: frames of a per-frame artifact and its summed counts, or a list's length."""
    if not envelope:
        return {}
    result = envelope.get("result") if envelope.get("ok") else envelope.get("partial_result")
    counts: dict[str, int] = {}
    for name, value in (result if isinstance(result, dict) else {}).items():
        if isinstance(value, dict) and is_frames(value):
            counts[name] = _count(value.get("frames") or 0)
            per_item = value.get("counts")
            for key, count in (per_item if isinstance(per_item, dict) else {}).items():
                counts[f"{name}.{key}"] = _count(count)
        elif isinstance(value, list):
            counts[name] = len(value)
    return counts


def file_view(state: FileState, status: str) -> FileView:
    """One file as ``GET /v1/batches/{id}`` shows it."""
    f = state.file
    return {
        "position": f["position"],
        "name": f["name"],
        "media": f["media"],
        "job_id": f["job_id"],
        "status": status,
        "reused_from": state.reused_from,
        "attempts": f["attempts"],
        "error": None if status == "succeeded" else state.error,
        "error_type": None if status == "succeeded" else state.error_type,
    }


def summary_rows(files: list[tuple[FileState, str]]) -> list[SummaryRow]:
    """The summary's rows (``records`` as a JSON object text, so both formats hold it as one column)."""
    return [
        {**file_view(state, status), "records": json.dumps(record_counts(state.envelope), sort_keys=True)}
        for state, status in files
    ]


def to_csv(rows: list[SummaryRow]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def to_parquet(rows: list[SummaryRow]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            pa.field("position", pa.int32()),
            pa.field("name", pa.string()),
            pa.field("media", pa.string()),
            pa.field("status", pa.string()),
            pa.field("job_id", pa.string()),
            pa.field("reused_from", pa.string()),
            pa.field("attempts", pa.int32()),
            pa.field("records", pa.string()),
            pa.field("error", pa.string()),
            pa.field("error_type", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
