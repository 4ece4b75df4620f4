"""The one mapping from a job's ending to a process exit code, and a CLI that changes nothing in the
process until a command starts."""

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from forgeflow.exit_codes import ExitCode, JobEnding, exit_code_for, is_job_ending


@pytest.mark.fast
def test_every_ending_has_its_documented_code():
    assert {ending: int(exit_code_for(ending)) for ending in get_args(JobEnding)} == {
        "succeeded": 0,
        "failed": 1,
        "crashed": 1,
        "invalid": 2,
        "cancelled": 3,
    }
    assert ExitCode.INTERRUPTED == 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@pytest.mark.fast
def test_only_an_ending_is_an_ending():
    assert all(is_job_ending(ending) for ending in get_args(JobEnding))
    for status in ("queued", "running", None, "", "SUCCEEDED", 0):
        assert not is_job_ending(status)


@pytest.mark.fast
def test_the_readme_documents_every_code():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert f"\n| {int(code)} | " in text, f"README's exit code table lacks {int(code)} ({code.name})"


def test_importing_the_cli_changes_no_environment_variable_and_a_command_sets_quiet_prefect():
    script = (
        "import os, json\n"
        "before = dict(os.environ)\n"
        "import forgeflow.cli.main as cli\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(cli.app, ['schema'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(json.dumps({k: os.environ.get(k) for k in ('PREFECT_LOGGING_LEVEL', 'DO_NOT_TRACK', 'PREFECT_UI_ENABLED')}))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_LOGGING_LEVEL", "DO_NOT_TRACK", "PREFECT_UI_ENABLED")
    }
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        '{"PREFECT_LOGGING_LEVEL": "CRITICAL", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}'
    )
