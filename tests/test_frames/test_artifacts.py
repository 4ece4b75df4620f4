"""Per-frame outputs as chunked Parquet artifacts, in-process: the SDK's FrameStream written and read
through Tool.invoke, as a worker runs it (no Prefect, no model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from forgeflow.plugins import ArtifactBudgetExceeded, MediaStore, ToolContext
from forgeflow.plugins.builtin.schemas import FramePlayers
from forgeflow.plugins.errors import InputError, OutputError
from forgeflow.plugins.frames import (
    FRAMES_KEY,
    FrameWriter,
    chunk_refs,
    is_frames,
    iter_frame_records,
    page_frames,
    write_frames_file,
)

pytestmark = pytest.mark.fast


def tool(name: str) -> Any:
    from forgeflow_testplugins.testkit import plugin

    return plugin.tools[name]


@pytest.fixture
def store(tmp_path: Path) -> MediaStore:
    return MediaStore(tmp_path / "media")


def ctx_of(store: MediaStore, chunk_frames: int = 10, **extra: Any) -> ToolContext:
    return ToolContext(media_store=store, chunk_frames=chunk_frames, **extra)


def crowd(store: MediaStore, frames: int, chunk_frames: int = 10, people: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = tool("crowd_players").invoke(
        {"frames": frames, "people": people}, {"media": "unused"}, ctx_of(store, chunk_frames)
    )
    return out["players"]


def test_a_long_output_is_an_artifact_named_by_ref(store):
    players = crowd(store, frames=25, chunk_frames=10, people=3)
    assert is_frames(players)
    assert players["frames"] == 25 and players["chunks"] == 3
    assert (players["first_frame"], players["last_frame"]) == (0, 24)
    assert players["counts"] == {"players": 75}
    assert players["record"] == "FramePlayers" and players["format"] == "parquet"
    assert players["columns"]["frame_index"] == "int64"
    assert "list<item: struct<box" in players["columns"]["players"]
    # the manifest and every chunk are in the content-addressed store, each a Parquet file
    refs = chunk_refs(store, players)
    assert len(refs) == 3
    for ref in [players[FRAMES_KEY], *refs]:
        assert store.info(ref).media_type == "application/vnd.apache.parquet"
    assert players["size_bytes"] == sum(store.info(r).size_bytes for r in refs)


def test_records_read_back_equal_the_inline_output(store):
    inline = crowd(store, frames=25, chunk_frames=100)
    assert isinstance(inline, list) and len(inline) == 25  # one chunk or less: inline JSON, as before
    artifact = crowd(store, frames=25, chunk_frames=10)
    assert list(iter_frame_records(artifact, store)) == inline


def test_an_output_of_exactly_one_chunk_stays_inline(store):
    assert isinstance(crowd(store, frames=10, chunk_frames=10), list)
    assert is_frames(crowd(store, frames=11, chunk_frames=10))


def test_artifacts_are_byte_identical_across_runs(store, tmp_path):
    first = crowd(store, frames=25)
    other = MediaStore(tmp_path / "elsewhere")
    second = crowd(other, frames=25)
    assert first == second  # same manifest ref, so the same chunk refs, so the same bytes
    for ref in [first[FRAMES_KEY], *chunk_refs(store, first)]:
        assert store.path(ref).read_bytes() == other.path(ref).read_bytes()


def test_a_streaming_consumer_reads_the_artifact_chunk_by_chunk(store):
    players = crowd(store, frames=25, people=4)
    out = tool("count_players").invoke({}, {"players": players}, ctx_of(store))
    counts = list(iter_frame_records(out["counts"], store))
    assert [c["frame_index"] for c in counts] == list(range(25))
    assert {c["players"] for c in counts} == {4}


def test_a_list_consumer_gets_every_record(store):
    players = crowd(store, frames=25, people=4)
    out = tool("count_players_list").invoke({}, {"players": players}, ctx_of(store))
    assert out == {"frames": 25, "total_players": 100}


def test_the_artifact_budget_is_a_clear_error(store):
    with pytest.raises(ArtifactBudgetExceeded, match="FORGEFLOW_MAX_ARTIFACT_BYTES_PER_JOB"):
        tool("crowd_players").invoke(
            {"frames": 100, "people": 20}, {"media": "unused"}, ctx_of(store, artifact_budget_bytes=2000)
        )


def test_records_out_of_frame_order_are_an_output_error(store):
    writer = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=2, label="t")
    writer.append({"frame_index": 5, "timestamp_s": 0.2, "players": []})
    with pytest.raises(OutputError, match="frame order"):
        writer.append({"frame_index": 4, "timestamp_s": 0.1, "players": []})


def test_a_record_of_the_wrong_shape_is_an_output_error(store):
    writer = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=2, label="t")
    with pytest.raises(OutputError, match="record 0 is not a FramePlayers"):
        writer.append({"frame_index": 0, "players": [{"box": [1, 2]}]})


def test_a_missing_chunk_is_an_input_error_naming_it(store):
    players = crowd(store, frames=25)
    lost = chunk_refs(store, players)[1]
    store.path(lost).unlink()
    with pytest.raises(InputError, match=lost):
        tool("count_players_list").invoke({}, {"players": players}, ctx_of(store))


def test_pages_by_frame_read_only_the_chunks_they_need(store):
    players = crowd(store, frames=35, chunk_frames=10)
    first_chunk = chunk_refs(store, players)[0]
    store.path(first_chunk).unlink()  # frames 0..9: a page from frame 12 never opens it
    page, next_start = page_frames(players, store, start=12, limit=5)
    assert [r["frame_index"] for r in page] == [12, 13, 14, 15, 16] and next_start == 17
    page, next_start = page_frames(players, store, start=30, limit=10)
    assert [r["frame_index"] for r in page] == [30, 31, 32, 33, 34] and next_start is None
    inline = crowd(store, frames=8, chunk_frames=100)
    assert page_frames(inline, store, start=6, limit=5) == (inline[6:], None)


def test_one_file_for_analysts_opens_in_polars_and_duckdb(store, tmp_path):
    import duckdb
    import polars as pl
    import pyarrow.parquet as pq

    players = crowd(store, frames=25, people=3)
    path = tmp_path / "players.parquet"
    assert write_frames_file(players, store, path) == 25
    assert pq.ParquetFile(path).num_row_groups == 3  # a row group per chunk
    frame = pl.read_parquet(path)
    assert frame.height == 25 and frame.columns == ["frame_index", "timestamp_s", "players"]
    flat = frame.explode("players").unnest("players")
    assert flat.height == 75 and {"box", "confidence", "track_id"} <= set(flat.columns)
    rows = duckdb.sql(f"select count(*), max(frame_index) from read_parquet('{path}')").fetchall()
    assert rows == [(25, 24)]
    assert pq.read_table(path).column("frame_index").to_pylist() == list(range(25))


def test_a_resumed_writer_continues_after_its_journalled_chunks(store, tmp_path):
    from forgeflow_testplugins.testkit import crowd_frame

    records = [crowd_frame(i, i / 25, 3) for i in range(45)]
    whole = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=10)
    expected = whole.write_all(records)
    journal = tmp_path / "players.jsonl"
    first = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=10, journal=journal)
    for record in records[:27]:  # killed after 27 frames: chunks 0-9 and 10-19 are stored and journalled
        first.append(record)
    assert len(journal.read_text().splitlines()) == 2
    journal.write_text(journal.read_text() + '{"ref": "sha256:cut')  # a line the kill cut short
    second = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=10, journal=journal)
    assert second.resume() == 19
    assert second.write_all(records) == expected  # frames up to 19 are dropped, the rest written as before


def test_a_journal_naming_a_lost_chunk_resumes_before_it(store, tmp_path):
    from forgeflow_testplugins.testkit import crowd_frame

    records = [crowd_frame(i, i / 25, 3) for i in range(35)]
    journal = tmp_path / "players.jsonl"
    first = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=10, journal=journal)
    expected = first.write_all(records)
    lost = chunk_refs(store, expected)[1]
    store.path(lost).unlink()
    second = FrameWriter(store=store, record_type=FramePlayers, field_name="players", chunk_frames=10, journal=journal)
    assert second.resume() == 9  # chunk 10-19 is gone: only the first one is kept
    assert second.write_all(records) == expected
    assert store.has(lost)
