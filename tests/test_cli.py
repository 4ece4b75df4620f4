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
    # the summary is the command's result: stdout; the progress bars are diagnostics: stderr
    assert "completed" in result.stdout and "total: 60" in result.stdout
    assert "total: 60" not in result.stderr
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
    assert f"wrote {copy}" in result.stdout.replace("\n", "")
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
    assert "valid, 2 stage(s)" in result.stdout and "0: testkit.numbers" in result.stdout  # canonical, not tk
    assert result.stderr == ""

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


def test_validate_warns_on_stderr_and_suggests_config_keys(tmp_path, ff_home):
    """Stage order and a GPU this host lacks are warnings (stderr, exit 0, the result on stdout); a
    misspelt config key is an error with a suggestion."""
    from forgeflow.engine.admission import host_gpu_count

    backwards = tmp_path / "backwards.json"
    backwards.write_text(
        json.dumps(
            [
                {"plugin": "testkit", "tool": "total"},
                {"plugin": "tk", "tool": "numbers"},
                {"plugin": "tk", "tool": "scale"},
            ]
        )
    )
    result = forgeflow("validate", str(backwards), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid, 3 stage(s)" in result.stdout and "job input: scaled, count" in result.stdout
    assert "stage 0 testkit.total field 'scaled': needs 'scaled' from the job input" in result.stderr
    assert (
        "stage 2 testkit.scale produces it: move that stage earlier" in result.stderr and "StageOrder" in result.stderr
    )

    cuda = tmp_path / "cuda.json"
    cuda.write_text(json.dumps([{"plugin": "videotracker", "tool": "detect_players", "config": {"device": "cuda"}}]))
    result = forgeflow("validate", str(cuda), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0: forgesyte-yolo-tracker.detect_players" in result.stdout
    if host_gpu_count() == 0:
        assert (
            "asks for 'cuda', but this host has no NVIDIA GPU" in result.stderr and "DeviceUnavailable" in result.stderr
        )

    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{"plugin": "videotracker", "tool": "detect_players", "config": {"confidance": 0.3}}]))
    result = forgeflow("validate", str(typo), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "config.confidance" in result.stderr and "did you mean 'confidence'?" in result.stderr


def test_plugins_show_is_a_readable_summary_and_json_on_request(tmp_path, ff_home):
    result = forgeflow("plugins", "show", "tk", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("testkit ") and "(aliases: tk)" in lines[0]
    numbers = next(i for i, line in enumerate(lines) if line.startswith("numbers:"))
    rows = [" ".join(line.split()) for line in lines[numbers : numbers + 8]]
    assert "input count integer required" in rows
    assert "output numbers array of integer" in rows
    assert "config start integer 0" in rows
    assert max(len(line) for line in lines) <= 200
    as_json = json.loads(forgeflow("plugins", "show", "tk", "--json", cwd=tmp_path).stdout)
    assert as_json["name"] == "testkit" and "schemas" in as_json["tools"][0]


def test_help_names_values_not_python_types(tmp_path):
    for args in (["--help"], ["run", "--help"], ["validate", "--help"], ["plugins", "show", "--help"]):
        result = forgeflow(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        for ugly in ("<bool>", "<str>", "<path>", "{FILE}", "{file}", "{NAME}"):
            assert ugly not in result.stdout, (args, ugly, result.stdout)
    run = forgeflow("run", "--help", cwd=tmp_path).stdout
    assert "run [OPTIONS] FILE" in run and "--input" in run and "MEDIA" in run
    listing = " ".join(forgeflow("--help", cwd=tmp_path).stdout.split())
    # a command's summary is its first paragraph as one sentence, not cut at the docstring's line ends
    assert "With none running, one starts in the background and stays warm for the next run" in listing


def test_the_run_summary_fits_80_columns_without_breaking_plugin_tool(capsys):
    from rich.console import Console

    from forgeflow.cli.results import print_summary

    names = [
        ("forgesyte-yolo-tracker", "detect_players"),
        ("pose-estimator", "estimate_poses"),
        ("classifier", "classify_actions"),
    ]
    envelope = {
        "ok": True,
        "result": {"players": [1] * 64},
        "stages": [
            {
                "index": i,
                "plugin": p,
                "tool": t,
                "status": "completed",
                "duration_ms": 12345.0,
                "result_size_bytes": 483477,
                "peak_memory_mb": 1234.0,
            }
            for i, (p, t) in enumerate(names)
        ],
    }
    console = Console(width=80, record=True, force_terminal=False)
    print_summary(console, envelope, 12.3, "job-1234567890ab")
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for index, (plugin, tool) in enumerate(names):
        assert f"{index}: {plugin}.{tool}" in text, text
    assert "12345 ms" in text and "472.1 KB" in text and "1234 MB" in text  # no number cut either
