"""The ``forgeflow`` command as a user runs it: a real subprocess, real Prefect, real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def forgeflow(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_plugins_list_json_shows_tools_states_and_unavailable_reasons(ff_home, tmp_path):
    result = forgeflow("plugins", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert {"forgesyte-yolo-tracker", "pose-estimator", "classifier", "testkit"} <= set(plugins)
    assert plugins["testkit"]["aliases"] == ["tk"]
    assert {"numbers", "scale", "total", "hang"} <= {t["name"] for t in plugins["testkit"]["tools"]}
    assert plugins["testkit"]["lifecycle"]["state"] == "LOADED"
    broken = plugins["broken-import"]
    assert broken["lifecycle"]["state"] == "UNAVAILABLE"
    assert "forgeflow_missing_dependency_for_tests" in broken["lifecycle"]["last_error"]
    assert plugins["needs-weights"]["unavailable_reason"].startswith("weights file not found")

    table = forgeflow("plugins", "list", cwd=tmp_path)
    assert table.returncode == 0
    assert "testkit" in table.stdout and "UNAVAILABLE" in table.stdout


def test_run_writes_result_and_events_and_reports_failures(ff_home, prefect_api_url, tmp_path):
    pipeline = tmp_path / "chain.json"
    pipeline.write_text(
        json.dumps(
            {
                "pipeline": [
                    {"plugin": "tk", "tool": "numbers"},
                    {"plugin": "testkit", "tool": "scale", "config": {"factor": 10}},
                    {"plugin": "testkit", "tool": "total"},
                ]
            }
        )
    )
    result = forgeflow(
        "run", str(pipeline), "--input-json", '{"count": 4}', "--out", str(tmp_path / "out"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "completed" in result.stderr and "total: 60" in result.stderr
    envelope = json.loads((tmp_path / "out" / "result.json").read_text())
    assert envelope["ok"] and envelope["result"]["total"] == 60
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["status"] == "succeeded"
    assert not list((tmp_path / "out").glob("annotated*"))  # no media: nothing to draw on

    # a job with media and players: --out gets a copy of the annotated image the job stored
    import cv2
    import numpy as np

    image = tmp_path / "frame.jpg"
    cv2.imwrite(str(image), np.full((120, 160, 3), 100, dtype=np.uint8))
    drawn = tmp_path / "drawn.json"
    drawn.write_text(json.dumps({"pipeline": [{"plugin": "tk", "tool": "fake_players"}]}))
    result = forgeflow("run", str(drawn), "--input", str(image), "--out", str(tmp_path / "drawn"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    envelope = json.loads((tmp_path / "drawn" / "result.json").read_text())
    annotated = envelope["annotated_media"]
    assert annotated["kind"] == "image" and annotated["media_type"] == "image/jpeg"
    copy = tmp_path / "drawn" / "annotated.jpg"
    assert f"wrote {copy}" in result.stderr.replace("\n", "")
    from forgeflow.plugins.media import MediaStore
    from forgeflow.settings import get_settings

    assert copy.read_bytes() == MediaStore(get_settings().media_root).path(annotated["ref"]).read_bytes()
    assert cv2.imread(str(copy)).shape == (120, 160, 3)

    failing = tmp_path / "failing.json"
    failing.write_text(
        json.dumps({"pipeline": [{"plugin": "tk", "tool": "numbers"}, {"plugin": "tk", "tool": "fail"}]})
    )
    result = forgeflow("run", str(failing), "--input-json", '{"count": 1}', "--json", cwd=tmp_path)
    assert result.returncode == 1
    envelope = json.loads(result.stdout)
    assert envelope["stage_failed"] == 1 and envelope["partial_result"] == {"numbers": [0]}
    assert "failed at stage 1: RuntimeError: boom" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_rejects_invalid_pipelines_and_bad_media_before_running(ff_home, tmp_path):
    pipeline = tmp_path / "p.json"
    pipeline.write_text(json.dumps({"pipeline": [{"plugin": "tk", "tool": "probe_media"}]}))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    result = forgeflow("run", str(pipeline), "--input", str(empty), cwd=tmp_path)
    assert result.returncode == 2
    assert "empty" in result.stderr
    result = forgeflow("run", str(pipeline), "--input", str(tmp_path / "missing.mp4"), cwd=tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr
    result = forgeflow("run", str(pipeline), cwd=tmp_path)
    assert result.returncode == 2 and "needs input 'media'" in result.stderr


def test_cli_validate_exit_codes_and_messages(tmp_path, ff_home):
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"pipeline": [{"plugin": "tk", "tool": "numbers"}, {"plugin": "testkit", "tool": "scale"}]})
    )
    result = forgeflow("validate", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid, 2 stage(s)" in result.stderr

    malformed = tmp_path / "bad.json"
    malformed.write_text('{"pipeline": [ {"plugin": "tk",, } ]}')
    result = forgeflow("validate", str(malformed), cwd=tmp_path)
    assert result.returncode == 2
    assert "malformed JSON at line 1" in result.stderr

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"pipeline": [{"plugin": "tk", "tool": "numbers"}, {"plugin": "nope", "tool": "x"}]}))
    result = forgeflow("validate", str(unknown), cwd=tmp_path)
    assert result.returncode == 2
    assert "stage 1" in result.stderr and "unknown plugin 'nope'" in result.stderr
