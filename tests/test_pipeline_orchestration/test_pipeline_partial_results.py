"""When stage N fails, the outputs of stages 0..N-1 come back as the partial result."""

from __future__ import annotations

import json

from forgeflow.jobs.checkpoints import checkpoint_path

from .conftest import chain


def test_partial_result_holds_every_completed_stage(executor):
    envelope = executor.execute(chain("numbers", "scale", "fail", "total"), {"count": 3}, "job-partial")
    assert envelope["partial_result"] == {"numbers": [0, 1, 2], "scaled": [0, 2, 4]}
    assert "result" not in envelope
    assert envelope["stages_executed"] == 2
    assert [s["status"] for s in envelope["stages"]] == ["completed", "completed", "failed", "skipped"]
    failed = envelope["stages"][2]
    assert failed["error_type"] == "RuntimeError" and failed["duration_ms"] is not None


def test_failure_in_the_first_stage_gives_an_empty_partial_result(executor):
    envelope = executor.execute(chain("fail", "numbers"), {"count": 3}, "job-partial-0")
    assert envelope["stage_failed"] == 0
    assert envelope["partial_result"] == {}
    assert envelope["stages_executed"] == 0


def test_partial_results_are_checkpointed_for_crash_recovery(executor, services):
    executor.execute(chain("numbers", "scale", "fail"), {"count": 2}, "job-ckpt")
    data = json.loads(checkpoint_path(services.settings, "job-ckpt").read_text())
    assert data["partial_result"] == {"numbers": [0, 1], "scaled": [0, 2]}


def test_success_envelope_has_the_seed_shape(executor):
    envelope = executor.execute(chain("numbers", "scale", "total"), {"count": 2}, "job-shape")
    assert {"ok", "result", "stages_executed"} <= set(envelope)
    assert not {"error", "error_type", "stage_failed", "partial_result"} & set(envelope)
