"""The spool (forgeflow.events.spool): one writer per file, one deliverer per file (claim by rename),
a claim of a dead process taken over, and a torn last line skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgeflow.events import spool

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def live_other_pid() -> int:
    return os.getppid()  # the process that started pytest: alive, and not this one


def write(path: Path, lines: list[str], mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_append_then_read_back_in_order(tmp_path):
    path = spool.new_spool_path(tmp_path / "spool")
    assert path.parent == tmp_path / "spool"
    assert path.name.startswith(f"{os.getpid()}-") and path.name.endswith(".jsonl")
    assert spool.new_spool_path(tmp_path / "spool") != path
    spool.append_events(path, [{"n": 1}, {"n": 2}])
    spool.append_events(path, [{"n": 3, "text": "héllo"}])
    assert spool.read_events(path) == [{"n": 1}, {"n": 2}, {"n": 3, "text": "héllo"}]
    [found] = spool.spool_files(tmp_path / "spool")
    assert (found.path, found.writer, found.claimer) == (path, os.getpid(), None)


def test_a_torn_last_line_and_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path / "1-ab.jsonl", ['{"n": 1}\n', "\n", '{"n": 2}\n', '{"n": 3, "te'])
    assert spool.read_events(path) == [{"n": 1}, {"n": 2}]
    assert spool.read_events(tmp_path / "missing.jsonl") == []


def test_spool_files_are_listed_oldest_first_and_others_ignored(tmp_path):
    folder = tmp_path / "spool"
    newer = write(folder / "11-aa.jsonl", ["{}\n"], mtime=2_000_000)
    older = write(folder / "22-bb.jsonl.claimed-33", ["{}\n"], mtime=1_000_000)
    for name in ("notes.txt", "44-cc.jsonl.bad", "x-dd.jsonl", "55-ZZ.jsonl", "66-ee.json"):
        write(folder / name, ["{}\n"])
    files = spool.spool_files(folder)
    assert [(f.path, f.writer, f.claimer) for f in files] == [(older, 22, 33), (newer, 11, None)]
    assert files[0].unclaimed_path == folder / "22-bb.jsonl"
    assert spool.spool_files(tmp_path / "nowhere") == []


def test_claim_a_file_whose_writer_is_gone_and_release_it(tmp_path, dead_pid):
    path = write(tmp_path / f"{dead_pid}-aa.jsonl", [json.dumps({"n": 1}) + "\n"])
    [file] = spool.spool_files(tmp_path)
    claimed = spool.claim(file)
    assert claimed == tmp_path / f"{dead_pid}-aa.jsonl.claimed-{os.getpid()}"
    assert claimed.exists() and not path.exists()
    assert spool.read_events(claimed) == [{"n": 1}]
    # this process's own claim is its to deliver again; a second claimer of the old name finds nothing
    [mine] = spool.spool_files(tmp_path)
    assert mine.claimer == os.getpid() and spool.claim(mine) == claimed
    assert spool.claim(file) is None
    spool.release(claimed)
    assert path.exists() and not claimed.exists()
    spool.release(claimed)  # releasing twice is harmless


def test_a_live_writers_file_is_left_unless_asked(tmp_path):
    writer = live_other_pid()
    path = write(tmp_path / f"{writer}-aa.jsonl", ["{}\n"])
    [file] = spool.spool_files(tmp_path)
    assert spool.claim(file) is None and path.exists()
    claimed = spool.claim(file, skip_live_writers=False)
    assert claimed is not None and claimed.name == f"{writer}-aa.jsonl.claimed-{os.getpid()}"
    # this process's own unclaimed file may be claimed by itself
    own = write(tmp_path / f"{os.getpid()}-bb.jsonl", ["{}\n"])
    [own_file] = [f for f in spool.spool_files(tmp_path) if f.path == own]
    assert spool.claim(own_file) is not None


def test_a_claim_of_a_live_process_stands_and_one_of_a_dead_process_is_taken_over(tmp_path, dead_pid):
    live = write(tmp_path / f"{dead_pid}-aa.jsonl.claimed-{live_other_pid()}", ["{}\n"])
    stale = write(tmp_path / f"{dead_pid}-bb.jsonl.claimed-{dead_pid}", ["{}\n"])
    by_path = {f.path: f for f in spool.spool_files(tmp_path)}
    assert spool.claim(by_path[live]) is None and live.exists()
    assert spool.claim(by_path[live], skip_live_writers=False) is None  # a live claimer always wins
    taken = spool.claim(by_path[stale])
    assert taken == tmp_path / f"{dead_pid}-bb.jsonl.claimed-{os.getpid()}"
    assert taken.exists() and not stale.exists()
