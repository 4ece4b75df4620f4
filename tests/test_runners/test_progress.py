"""In-stage progress: ``ctx.progress`` in a tool reaches the runner's ``on_progress``, rate-limited,
never after the call's result, and never able to fail the call."""

from __future__ import annotations

import json
import math
import time

import pytest

from forgeflow.engine.runners.base import Progress
from forgeflow.plugins.sdk import ToolContext

from ._helpers import call


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_every_report_arrives_when_not_rate_limited(make_runner, kind):
    runner = make_runner(kind, progress_interval_s=0)
    updates: list[Progress] = []
    result = runner.run(call("steps", config={"steps": 4}, job_id="j", stage_index=1), updates.append)
    assert result.ok and result.outputs == {"steps": 4}
    assert [(u.done, u.total, u.message) for u in updates] == [(i, 4, f"step {i}") for i in range(1, 5)]
    assert [u.fraction for u in updates] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_reports_are_rate_limited_but_the_first_and_the_last_go_through(make_runner, kind):
    runner = make_runner(kind, progress_interval_s=30)
    updates: list[Progress] = []
    result = runner.run(call("steps", config={"steps": 50}), updates.append)
    assert result.ok
    assert [u.done for u in updates] == [1, 50]


def test_no_report_of_a_finished_call_reaches_the_next_call(make_runner):
    runner = make_runner("process", progress_interval_s=0)
    first: list[Progress] = []
    assert runner.run(call("steps", config={"steps": 2, "keep_reporting": True}), first.append).ok
    second: list[Progress] = []
    time.sleep(0.1)  # the first call's thread reports (into nothing) meanwhile
    result = runner.run(call("steps", config={"steps": 3, "delay_s": 0.05}), second.append)
    assert result.ok
    assert [u.message for u in first] == ["step 1", "step 2"]
    assert [u.message for u in second] == ["step 1", "step 2", "step 3"]


def test_a_callback_that_raises_does_not_fail_the_call(make_runner):
    runner = make_runner("process", progress_interval_s=0)

    def broken(update: Progress) -> None:
        raise RuntimeError("the watcher broke")

    result = runner.run(call("steps", config={"steps": 3}), broken)
    assert result.ok and result.outputs == {"steps": 3}


@pytest.mark.fast
def test_progress_arguments_are_checked_and_clamped(tmp_path):
    from forgeflow.plugins.media import MediaStore

    sent: list[dict] = []
    ctx = ToolContext(media_store=MediaStore(tmp_path), progress_sink=sent.append, progress_interval_s=0)
    ctx.progress(3, 10)
    ctx.progress(12, 10, "x" * 500)  # over the total: counts as the total; long messages are cut
    ctx.progress(7, None)
    assert sent == [
        {"done": 3, "total": 10, "message": None},
        {"done": 10, "total": 10, "message": "x" * 200},
        {"done": 7, "total": None, "message": None},
    ]
    for done, total in [(-1, 10), (math.nan, 10), (1, 0), (1, math.inf), ("3", 10), (True, 10)]:
        with pytest.raises(ValueError, match=r"ctx\.progress"):
            ctx.progress(done, total)  # type: ignore[arg-type]
    ctx.end_progress()
    ctx.progress(10, 10)
    assert len(sent) == 3  # nothing after the call ended
    ToolContext(media_store=MediaStore(tmp_path)).progress(1, 2)  # outside a call: goes nowhere


@pytest.mark.fast
def test_malformed_reports_are_dropped():
    assert Progress.from_message({"done": 2, "total": 4, "message": "m"}) == Progress(done=2, total=4, message="m")
    assert Progress.from_message({"done": -1}) is None
    assert Progress.from_message({"done": 1, "total": 0}) is None
    assert Progress(done=5, total=None).fraction is None


def test_the_timeout_counts_from_the_last_progress(make_runner):
    """A long stage that keeps reporting more done (a match's frames) runs past its timeout; one that
    stops reporting dies a timeout after its last report; the host's cap bounds it in all."""
    runner = make_runner("process", progress_interval_s=0)
    going = runner.run(call("steps", config={"steps": 8, "delay_s": 0.3}, timeout_s=1.0))  # 2.4 s in all
    assert going.ok, going.error
    stalled = runner.run(call("steps", config={"steps": 3, "delay_s": 1.6}, timeout_s=1.0))
    assert not stalled.ok and stalled.error_type == "TimeoutError"
    assert "timed out after 1 s" in (stalled.error or "")  # no progress before the first 1.6 s
    capped = make_runner("process", progress_interval_s=0, max_stage_timeout_s=1.5)
    over = capped.run(call("steps", config={"steps": 10, "delay_s": 0.3}, timeout_s=1.0))
    assert not over.ok and "FORGEFLOW_MAX_STAGE_TIMEOUT_S" in (over.error or "")


@pytest.mark.fast
def test_a_report_equal_to_the_last_one_is_not_sent_again(tmp_path):
    """The vision plugins end with a final report that repeats their loop's last one (64/64 after
    64/64): one message, not two."""
    from forgeflow.plugins.media import MediaStore

    sent: list[dict] = []
    ctx = ToolContext(media_store=MediaStore(tmp_path), progress_sink=sent.append, progress_interval_s=0)
    ctx.progress(32, 64, "32/64 frames")
    ctx.progress(64, 64, "64/64 frames")
    ctx.progress(64, 64, "64/64 frames")
    ctx.progress(64, 64, "done")  # a new message is news
    assert sent == [
        {"done": 32, "total": 64, "message": "32/64 frames"},
        {"done": 64, "total": 64, "message": "64/64 frames"},
        {"done": 64, "total": 64, "message": "done"},
    ]


@pytest.mark.fast
def test_whole_counts_travel_as_integers():
    from forgeflow.events.models import StageProgress

    progress = Progress(done=64, total=64.0)
    assert progress.model_dump_json() == (
        '{"done":64,"total":64,"message":null,"rate":null,"eta_s":null,"fraction":1.0}'
    )
    message = StageProgress(job_id="j", stage_index=0, plugin="p", tool="t", done=1.0, total=64, fraction=1 / 64)
    data = json.loads(message.model_dump_json())
    assert (data["done"], data["total"]) == (1, 64) and type(data["done"]) is int and type(data["total"]) is int
    assert json.loads(Progress(done=2.5, total=10).model_dump_json())["done"] == 2.5
