"""Worker logs: trimmed past their limit, keeping how the workers started and what happened last."""

from __future__ import annotations

import pytest

from forgeflow.engine.runners.worker_log import read_log_tail, trim_log

pytestmark = pytest.mark.fast


def test_trimming_keeps_the_header_and_the_tail(tmp_path):
    log = tmp_path / "worker.log"
    header = b"worker 123 started: plugin testkit\n"
    middle = b"".join(b"spam line %06d\n" % i for i in range(20_000))  # ~320 KB of stdout spam
    ending = b"Traceback: the last thing that happened\n"
    log.write_bytes(header + middle + ending)
    assert trim_log(log, max_bytes=100_000, head=1_000, tail=10_000)
    data = log.read_bytes()
    assert data.startswith(header)
    assert data.endswith(ending)
    assert 10_000 <= len(data) <= 12_000
    assert b"bytes of this log cut (over 100000 bytes)" in data
    for line in data.splitlines():  # whole lines only: no line cut in half
        assert line.startswith((b"worker", b"spam line", b"[...", b"Traceback")), line
    assert "the last thing that happened" in read_log_tail(log)
    assert not trim_log(log, max_bytes=100_000)  # under the limit now: left alone


def test_a_missing_log_is_not_an_error(tmp_path):
    assert not trim_log(tmp_path / "none.log", max_bytes=10)
