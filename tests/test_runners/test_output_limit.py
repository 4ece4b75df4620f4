"""The per-stage output limit: outputs over FORGEFLOW_MAX_OUTPUT_BYTES never leave the worker."""

from __future__ import annotations

import pytest

from ._helpers import call


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_an_output_over_the_limit_is_an_output_error_naming_stage_and_size(make_runner, kind):
    runner = make_runner(kind, max_output_bytes=4096)
    small = runner.run(call("numbers", inputs={"count": 10}, job_id="j", stage_index=0))
    assert small.ok and small.outputs == {"numbers": list(range(10))}
    big = runner.run(call("numbers", inputs={"count": 5000}, job_id="j", stage_index=2))
    assert not big.ok and big.outputs is None
    assert big.error_type == "OutputError"
    size = len(('{"numbers":[' + ",".join(str(i) for i in range(5000)) + "]}").encode())
    assert big.result_size_bytes == size
    assert f"stage 2 (testkit.numbers) returned {size} bytes of output, over the limit of 4096" in big.error
    assert "FORGEFLOW_MAX_OUTPUT_BYTES" in big.error
    again = runner.run(call("numbers", inputs={"count": 3}))  # the worker keeps serving
    assert again.ok and again.outputs == {"numbers": [0, 1, 2]}


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_an_output_no_store_can_hold_is_an_output_error(make_runner, kind):
    runner = make_runner(kind)
    deep: list = []
    for _ in range(150):
        deep = [deep]
    for value, problem in [("a\x00b", "U+0000"), (deep, "nested deeper than 100 levels")]:
        result = runner.run(call("echo", inputs={"value": value}, stage_index=1))
        assert not result.ok and result.error_type == "OutputError"
        assert result.error.startswith("stage 1 (testkit.echo) returned outputs a job cannot store: ")
        assert problem in result.error
    assert runner.run(call("echo", inputs={"value": "fine"})).outputs == {"value": "fine"}


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_a_huge_error_message_keeps_its_head_and_tail(make_runner, kind):
    from forgeflow.engine.runners.worker import ERROR_MAX_CHARS

    runner = make_runner(kind)
    message = "HEAD" + "x" * 1_000_000 + "TAIL"
    result = runner.run(call("fail", config={"message": message, "error": "ValueError"}))
    assert not result.ok and result.error_type == "ValueError"
    assert len(result.error) < ERROR_MAX_CHARS + 100
    assert result.error.startswith("HEAD") and result.error.endswith("TAIL")
    assert f"[… {len(message) - ERROR_MAX_CHARS} characters cut …]" in result.error
