"""A frames artifact's bytes: Parquet chunks with a fixed Arrow schema, and the manifest that lists them.

A record model gives one Arrow schema (:func:`record_schema`: a column per field, nested as the model
nests; one JSON text column where it has no columnar form), so the same records always give the same
chunk bytes. An artifact's descriptor (``{"$frames": <manifest ref>, ...}``, :func:`is_frames`) names
its manifest, a Parquet table of the chunks' refs and frame ranges (:func:`manifest`). What a
per-frame output is, and how tools write and read it, is :mod:`forgeflow.plugins.frames`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Final, Required, TypedDict, TypeGuard

from pydantic import BaseModel, JsonValue

from forgeflow.plugins.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa
    from pydantic.json_schema import JsonSchemaValue

    from forgeflow.canonical import JsonObject
    from forgeflow.plugins.media import MediaStore

__all__ = [
    "COMPRESSION",
    "FORMAT",
    "FRAMES_KEY",
    "ChunkEntry",
    "FramesDescriptor",
    "arrow_table",
    "chunk_refs",
    "chunk_rows",
    "is_frames",
    "manifest",
    "parquet_bytes",
    "read_parquet",
    "record_schema",
    "table_rows",
]

#: The key that marks a value as a frames descriptor; its value is the manifest's media ref.
FRAMES_KEY: Final = "$frames"
FORMAT = "parquet"
COMPRESSION = "zstd"


class ChunkEntry(TypedDict):
    """A row of an artifact's manifest: one chunk's media ref and the frames it holds."""

    ref: str
    first_frame: int
    last_frame: int
    frames: int
    size_bytes: int


#: What a per-frame output written as an artifact holds (:meth:`forgeflow.plugins.frames.FrameWriter.finish`):
#: the manifest's ref under ``$frames``, and what the artifact is.
FramesDescriptor = TypedDict(
    "FramesDescriptor",
    {
        "$frames": Required[str],
        "format": str,
        "record": str,
        "frames": int,
        "first_frame": int | None,
        "last_frame": int | None,
        "chunks": int,
        "size_bytes": int,
        "counts": dict[str, int],
        "columns": dict[str, str],
    },
    total=False,
)


def is_frames(value: object) -> TypeGuard[FramesDescriptor]:
    """Whether ``value`` is a frames descriptor (an artifact by ref), not inline data."""
    return isinstance(value, dict) and isinstance(value.get(FRAMES_KEY), str)


def _arrow_type(schema: JsonSchemaValue, defs: JsonSchemaValue) -> pa.DataType | None:
    """The Arrow type of a JSON Schema node (None where a node has no columnar form)."""
    import pyarrow as pa

    if "$ref" in schema:
        return _arrow_type(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        return _arrow_type(options[0], defs) if len(options) == 1 else None
    kind = schema.get("type")
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "string":
        return pa.string()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array" and isinstance(schema.get("items"), dict):
        item = _arrow_type(schema["items"], defs)
        return None if item is None else pa.list_(item)
    if kind == "object" and schema.get("properties") and not schema.get("additionalProperties"):
        fields = []
        for name, sub in schema["properties"].items():
            sub_type = _arrow_type(sub, defs)
            if sub_type is None:
                return None
            fields.append(pa.field(name, sub_type))
        return pa.struct(fields)
    return None


_schemas: dict[type[BaseModel], pa.Schema] = {}


def record_schema(record_type: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a record model: one column per field, nested as the model nests; a model
    with no columnar form (free-form dicts, unions) is one JSON text column ``record``."""
    import pyarrow as pa

    if record_type not in _schemas:
        json_schema = record_type.model_json_schema()
        struct = _arrow_type(json_schema, json_schema.get("$defs", {}))
        if struct is None:
            _schemas[record_type] = pa.schema([pa.field("frame_index", pa.int64()), pa.field("record", pa.string())])
        else:
            _schemas[record_type] = pa.schema(list(struct))
    return _schemas[record_type]


def _is_json_column(schema: pa.Schema) -> bool:
    return list(schema.names) == ["frame_index", "record"]


def arrow_table(records: Sequence[Mapping[str, JsonValue]], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    if _is_json_column(schema):
        rows = [{"frame_index": r["frame_index"], "record": json.dumps(r, sort_keys=True)} for r in records]
        return pa.Table.from_pylist(rows, schema=schema)
    return pa.Table.from_pylist(records, schema=schema)


def table_rows(table: pa.Table) -> list[JsonObject]:
    if _is_json_column(table.schema):
        return [json.loads(text) for text in table.column("record").to_pylist()]
    rows: list[JsonObject] = table.to_pylist()
    return rows


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION, row_group_size=max(1, table.num_rows), write_statistics=False)
    return buf.getvalue()


def read_parquet(data: Path | str | IO[bytes] | pa.NativeFile) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(data)


def manifest(store: MediaStore, descriptor: FramesDescriptor) -> list[ChunkEntry]:
    """The chunks of an artifact, in frame order."""
    ref = descriptor[FRAMES_KEY]
    try:
        rows: list[ChunkEntry] = read_parquet(store.path(ref)).to_pylist()  # the manifest's fixed schema
    except Exception as exc:
        raise InputError(f"cannot read frames artifact {ref}: {type(exc).__name__}: {exc}") from None
    return rows


def chunk_rows(store: MediaStore, chunk: ChunkEntry) -> list[JsonObject]:
    try:
        return table_rows(read_parquet(store.path(chunk["ref"])))
    except Exception as exc:
        raise InputError(f"cannot read frames chunk {chunk['ref']}: {type(exc).__name__}: {exc}") from None


def chunk_refs(store: MediaStore, descriptor: FramesDescriptor) -> list[str]:
    """The media refs of an artifact's chunks (its manifest must be in ``store``)."""
    return [chunk["ref"] for chunk in manifest(store, descriptor)]
