"""Per-frame outputs as chunked, columnar artifacts: how a match's worth of records travels.

A tool's per-frame output (players, poses, actions: one record per processed frame) grows with the
video: ~28 KB a frame as JSON for the soccer pipeline, ~3.7 GB for a 90-minute match. So a field
declared :class:`FrameStream` is never a JSON array passed whole. The tool returns any iterable of
records (a generator, typically); the SDK pulls it record by record and writes a chunk of
``chunk_frames`` records at a time as a Parquet file into the content-addressed media store. The
output field then holds a small **descriptor** naming the artifact::

    {"$frames": "sha256:…", "format": "parquet", "record": "FramePlayers", "frames": 135000,
     "first_frame": 0, "last_frame": 134999, "chunks": 528, "size_bytes": …, "counts": {"players": …},
     "columns": {"frame_index": "int64", …}}

``$frames`` is the ref of the artifact's manifest (a Parquet table listing the chunks' refs and frame
ranges). The next stage declares its input ``FrameStream[...]`` too and iterates it: chunks are read
one at a time, so neither stage ever holds more than one chunk. An output of at most ``chunk_frames``
records (an image, a short clip) stays an inline JSON list, as before: small results stay readable.

Why Parquet (measured in ``bench/bench_frames.py``, BENCHMARKS.md): every chunk is a complete file
that pandas, polars, DuckDB and Spark open in one line; with zstd the soccer records are ~8× smaller
than JSON; a chunk is its own row group, so a reader (or a page over REST) decodes only the chunks
that hold the frames it wants. Arrow IPC reads faster, but DuckDB has no built-in IPC reader and the
files are larger; at ~22 records a frame the decode cost is negligible beside a model's.

Deterministic: the same records give the same chunk bytes (fixed schema from the record model, fixed
writer options, no timestamps), hence the same refs and the same descriptor.

A tool whose input field is a plain ``list[...]`` still gets a list (the chunks read into memory):
third-party tools keep working unchanged; only streaming ones have flat memory.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar, get_args

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler, JsonValue
from pydantic_core import core_schema

from forgeflow.plugins.errors import InputError, OutputError, format_validation_error
from forgeflow.plugins.frame_chunks import (
    COMPRESSION,
    FORMAT,
    FRAMES_KEY,
    ChunkEntry,
    FramesDescriptor,
    arrow_table,
    chunk_refs,
    chunk_rows,
    is_frames,
    manifest,
    parquet_bytes,
    read_parquet,
    record_schema,
)
from forgeflow.plugins.frame_feeds import (
    LIVE_KEY,
    LiveFeed,
    UpstreamFailed,
    end_feed,
    has_chunks,
    is_live,
    live_feed,
    live_records,
    open_feed,
)
from forgeflow.plugins.frame_journal import JournalEntry, journal_chunk, keep_journalled

if TYPE_CHECKING:
    from pydantic.json_schema import JsonSchemaValue

    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore

# The artifact's bytes are :mod:`.frame_chunks`', live feeds :mod:`.frame_feeds`', chunk journals
# :mod:`.frame_journal`'s; their names that the
# rest of ForgeFlow uses are importable from here, the one module a per-frame output is known by.
__all__ = [
    "FORMAT",
    "FRAMES_KEY",
    "LIVE_KEY",
    "ArtifactBudgetExceeded",
    "FrameStream",
    "FrameWriter",
    "FramesDescriptor",
    "JournalEntry",
    "LiveFeed",
    "UpstreamFailed",
    "chunk_refs",
    "end_feed",
    "frame_fields",
    "has_chunks",
    "is_frames",
    "is_live",
    "iter_frame_records",
    "keep_journalled",
    "live_feed",
    "open_feed",
    "open_stream",
    "page_frames",
    "record_schema",
    "write_frames_file",
]

#: JSON Schema keyword on a streamed field: its records may arrive as an artifact, not inline.
SCHEMA_MARK = "x-forgeflow-frames"

R = TypeVar("R", bound=BaseModel)


class ArtifactBudgetExceeded(OutputError):
    """A job's per-frame artifacts would take more disk than FORGEFLOW_MAX_ARTIFACT_BYTES_PER_JOB."""

    error_type = "ArtifactBudgetExceeded"


# --- the type tools declare ---------------------------------------------------------------------


class FrameStream(Generic[R]):
    """A per-frame sequence of records ``R`` (each with an int ``frame_index``), in frame order.

    Declare it on an output model (``players: FrameStream[FramePlayers]``) and return any iterable
    of ``R`` (or dicts): the SDK writes it chunk by chunk. Declare it on an input model and iterate
    it: records arrive one chunk at a time, whether the upstream output was inline or an artifact.
    Its JSON Schema is that of ``list[R]``, so the pipeline's type check between stages is unchanged.
    Iterate it once (a stream, not a list); ``frames`` says how many records it holds when known.
    """

    def __init__(
        self, records: Iterable[Any], record_type: type[R], *, frames: int | None = None, source: str = ""
    ) -> None:
        self._records = records
        self.record_type = record_type
        self.frames = frames
        self._source = source  # an artifact's ref: its records are checked as they are read

    def __iter__(self) -> Iterator[R]:
        from pydantic import ValidationError

        for position, item in enumerate(self._records):
            if isinstance(item, self.record_type) or not self._source:
                yield item
                continue
            try:
                yield self.record_type.model_validate(item)
            except ValidationError as exc:
                raise InputError(
                    f"frames artifact {self._source}: record {position} is not a {self.record_type.__name__}: "
                    f"{format_validation_error(exc)}"
                ) from None

    def __repr__(self) -> str:
        return f"FrameStream[{self.record_type.__name__}](frames={self.frames})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: object, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        args = get_args(source)
        if len(args) != 1 or not (isinstance(args[0], type) and issubclass(args[0], BaseModel)):
            raise TypeError("FrameStream needs a record model: FrameStream[MyFrameRecord]")
        record_type: type[BaseModel] = args[0]
        if "frame_index" not in record_type.model_fields:
            raise TypeError(f"{record_type.__name__} needs an int field 'frame_index' to be a FrameStream record")

        def validate(value: object, as_list: core_schema.ValidatorFunctionWrapHandler) -> FrameStream[BaseModel]:
            if isinstance(value, FrameStream):
                return value
            if isinstance(value, (list, tuple)):  # inline (small): checked at once, errors located
                records = as_list(value)
                return FrameStream(records, record_type, frames=len(records))
            if is_frames(value):  # Tool.invoke opens artifacts (open_stream) before validation
                raise ValueError("a frames artifact is read by the SDK inside a tool call, not validated as data")
            if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
                raise ValueError(f"expected a list of {record_type.__name__} records or a frames artifact")
            return FrameStream(value, record_type)  # a tool's own iterable: the writer checks each record

        list_schema = handler.generate_schema(types.GenericAlias(list, (record_type,)))  # list[record_type]
        return core_schema.no_info_wrap_validator_function(
            validate,
            list_schema,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v, when_used="always"),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """``list[R]``'s schema, marked: what the type check between stages compares."""
        json_schema = handler(schema)
        json_schema[SCHEMA_MARK] = True
        return json_schema


def frame_fields(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The fields of ``model`` declared ``FrameStream[R]``, with their record types."""
    found: dict[str, type[BaseModel]] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        origin = getattr(annotation, "__origin__", None)
        if origin is FrameStream:
            found[name] = get_args(annotation)[0]
    return found


# --- writing ----------------------------------------------------------------------------------------


@dataclass
class FrameWriter:
    """Writes one per-frame output: records in, inline list or artifact descriptor out.

    ``budget_bytes`` is what the job may still write. ``journal`` (a file of
    :class:`forgeflow.plugins.checkpoints.Checkpoints`) gets a line per chunk stored, so that
    :meth:`resume` of a later attempt of the same call starts with them.
    """

    store: MediaStore
    record_type: type[BaseModel]
    field_name: str
    chunk_frames: int
    budget_bytes: int | None = None
    label: str = ""
    journal: Path | None = None
    #: Set by :meth:`resume`: records up to this frame are in the resumed chunks, later ones are written.
    resume_after: int | None = None
    #: Hears the frames stored so far after each chunk (progress of a tool that reports none).
    on_chunk: Callable[[int], None] | None = None
    _pending: list[JsonObject] = field(default_factory=list)
    _chunks: list[ChunkEntry] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)
    _frames: int = 0
    _size: int = 0
    _first: int | None = None
    _last: int | None = None

    def write_all(self, records: Iterable[object]) -> list[JsonValue] | JsonObject:
        for item in records:
            self.append(item)
        return self.finish()

    def restart(self) -> None:
        """Start from frame 0: what an earlier attempt journalled is dropped."""
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)

    def resume(self) -> int | None:
        """Start with the chunks an earlier attempt of the call journalled (those still in the store, in
        order); returns the last frame they hold (None: nothing to resume)."""
        if self.journal is None:
            return None
        kept = keep_journalled(self.journal, self.store)
        if kept is None:
            self.journal = None
        for chunk in kept or []:
            self._chunks.append(
                {
                    "ref": chunk["ref"],
                    "first_frame": chunk["first_frame"],
                    "last_frame": chunk["last_frame"],
                    "frames": chunk["frames"],
                    "size_bytes": chunk["size_bytes"],
                }
            )
            self._frames += int(chunk["frames"])
            self._size += int(chunk["size_bytes"])
            for key, value in (chunk.get("counts") or {}).items():
                self._counts[key] = self._counts.get(key, 0) + int(value)
            self._first = chunk["first_frame"] if self._first is None else self._first
            self._last = chunk["last_frame"]
        self.resume_after = self._last
        return self._last

    def append(self, item: object) -> None:
        try:
            model = item if isinstance(item, self.record_type) else self.record_type.model_validate(item)
        except Exception as exc:
            raise OutputError(
                f"{self.label} output {self.field_name!r}: record {self._frames} is not a "
                f"{self.record_type.__name__}: {exc}"
            ) from None
        record = model.model_dump(mode="json")
        index = record["frame_index"]
        if self.resume_after is not None and index <= self.resume_after:
            return  # in a resumed chunk already
        if self._last is not None and index < self._last:
            raise OutputError(
                f"{self.label} output {self.field_name!r}: frame_index {index} after {self._last} "
                "(per-frame records must come in frame order)"
            )
        if self._first is None:
            self._first = index
        self._last = index
        self._frames += 1
        self._pending.append(record)
        # one chunk more than a chunk is held back, so an output of exactly one chunk stays inline
        if len(self._pending) > self.chunk_frames:
            self._flush(self._pending[: self.chunk_frames])
            del self._pending[: self.chunk_frames]

    def _flush(self, records: list[JsonObject]) -> None:
        data = parquet_bytes(arrow_table(records, record_schema(self.record_type)))
        self._size += len(data)
        if self.budget_bytes is not None and self._size > self.budget_bytes:
            raise ArtifactBudgetExceeded(
                f"{self.label} output {self.field_name!r} needs more than the job's artifact budget "
                f"({self.budget_bytes} bytes left of FORGEFLOW_MAX_ARTIFACT_BYTES_PER_JOB) after "
                f"{self._frames} frames"
            )
        first, last = _frame_index(records[0]), _frame_index(records[-1])
        info = self.store.put_bytes(data, filename=f"{self.field_name}-{first}.parquet")
        chunk: ChunkEntry = {
            "ref": info.ref,
            "first_frame": first,
            "last_frame": last,
            "frames": len(records),
            "size_bytes": len(data),
        }
        self._chunks.append(chunk)
        counts = _list_counts(records)
        for key, value in counts.items():
            self._counts[key] = self._counts.get(key, 0) + value
        if self.on_chunk is not None:
            self.on_chunk(sum(c["frames"] for c in self._chunks))
        if self.journal is not None and not journal_chunk(self.journal, {**chunk, "counts": counts}):
            self.journal = None  # no checkpoints (a read-only or full disk): never fail the call

    def finish(self) -> list[JsonValue] | JsonObject:
        """The inline list (at most one chunk of records, nothing stored) or the artifact's descriptor."""
        if not self._chunks:
            records: list[JsonValue] = list(self._pending)
            self._pending = []
            return records
        if self._pending:
            self._flush(self._pending)
            self._pending = []
        import pyarrow as pa

        manifest = pa.Table.from_pylist(
            self._chunks,
            schema=pa.schema(
                [
                    pa.field("ref", pa.string()),
                    pa.field("first_frame", pa.int64()),
                    pa.field("last_frame", pa.int64()),
                    pa.field("frames", pa.int64()),
                    pa.field("size_bytes", pa.int64()),
                ]
            ),
        )
        info = self.store.put_bytes(parquet_bytes(manifest), filename=f"{self.field_name}.manifest.parquet")
        schema = record_schema(self.record_type)
        return {
            FRAMES_KEY: info.ref,
            "format": FORMAT,
            "record": self.record_type.__name__,
            "frames": self._frames,
            "first_frame": self._first,
            "last_frame": self._last,
            "chunks": len(self._chunks),
            "size_bytes": self._size,
            "counts": dict(sorted(self._counts.items())),
            "columns": {f.name: str(f.type) for f in schema},
        }

    @property
    def size_bytes(self) -> int:
        return self._size


def _frame_index(record: Mapping[str, JsonValue]) -> int:
    """A dumped record's ``frame_index`` (an int field of every record model: :class:`FrameStream`)."""
    index = record["frame_index"]
    if not isinstance(index, int):
        raise TypeError(f"frame_index {index!r} is not an int")
    return index


def _list_counts(records: Sequence[Mapping[str, JsonValue]]) -> dict[str, int]:
    """Items of each list column, summed over ``records`` (``players``: people detected)."""
    counts: dict[str, int] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, list):
                counts[key] = counts.get(key, 0) + len(value)
    return counts


# --- reading ----------------------------------------------------------------------------------------


def _artifact_records(store: MediaStore, descriptor: FramesDescriptor) -> Iterator[JsonObject]:
    for chunk in manifest(store, descriptor):
        yield from chunk_rows(store, chunk)


def iter_frame_records(value: object, store: MediaStore) -> Iterator[JsonObject]:
    """The records of a per-frame value, inline list, artifact or live feed, one chunk in memory at a time."""
    if is_frames(value):
        yield from _artifact_records(store, value)
    elif is_live(value):
        yield from live_records(store, value)
    elif isinstance(value, list):
        yield from _inline_records(value)


def page_frames(value: object, store: MediaStore, start: int, limit: int) -> tuple[list[JsonObject], int | None]:
    """Up to ``limit`` records from frame ``start`` on, and the frame the next page starts at (None: no
    more). Only the chunks from ``start`` on are read, and only until the page is full."""

    def records() -> Iterator[JsonObject]:
        if not is_frames(value):
            yield from _inline_records(value)
            return
        for chunk in manifest(store, value):
            if chunk["last_frame"] >= start:
                yield from chunk_rows(store, chunk)

    def from_start(record: JsonObject) -> bool:
        index = record.get("frame_index", -1)
        return isinstance(index, (int, float)) and index >= start

    page = list(itertools.islice(filter(from_start, records()), limit + 1))
    return page[:limit], (_frame_index(page[limit]) if len(page) > limit else None)


def write_frames_file(
    value: object, store: MediaStore, out: str | Path | IO[bytes], record_type: type[BaseModel] | None = None
) -> int:
    """One Parquet file of a per-frame output (a row group per chunk) written to ``out`` (a path or a
    binary file), chunk by chunk; returns the number of records. An inline list is written the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    count = 0
    try:
        if is_frames(value):
            for chunk in manifest(store, value):
                table = read_parquet(store.path(chunk["ref"]))
                writer = writer or pq.ParquetWriter(out, table.schema, compression=COMPRESSION)
                writer.write_table(table)
                count += table.num_rows
        else:
            rows = list(_inline_records(value))
            schema = record_schema(record_type) if record_type is not None else None
            table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
            writer = pq.ParquetWriter(out, table.schema, compression=COMPRESSION)
            writer.write_table(table)
            count = table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return count


def open_stream(value: FramesDescriptor | LiveFeed, record_type: type[R], store: MediaStore) -> FrameStream[R]:
    """An artifact's (or a live feed's) records as the :class:`FrameStream` a tool iterates, read from
    ``store`` a chunk at a time."""
    if is_frames(value):
        frames = value.get("frames")
        source = value[FRAMES_KEY]
    elif is_live(value):
        frames, source = None, value[LIVE_KEY]
    else:
        raise InputError("neither a frames artifact nor a live feed")
    return FrameStream(
        iter_frame_records(value, store),
        record_type,
        frames=frames if isinstance(frames, int) else None,
        source=source,
    )


def _inline_records(value: object) -> Iterator[JsonObject]:
    """The records of an inline per-frame value (a list of JSON objects; None: no records)."""
    if isinstance(value, list):
        for record in value:
            if isinstance(record, dict):
                yield record
