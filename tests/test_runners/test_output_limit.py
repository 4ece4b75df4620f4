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
