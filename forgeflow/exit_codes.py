"""The process exit codes of ForgeFlow's commands: the one mapping from a job's terminal status to an
exit code, and the codes a command ends with on its own account.

Exit codes exist only at a process boundary: ``forgeflow run`` and ``forgeflow watch`` end with the
code of the job they followed, and the process ``forgeflow worker`` starts for a flow run
(:mod:`forgeflow.jobs.handoff`) ends with the code of the engine job it handed over, which its Prefect
worker reads. Inside a process a job ends with a status, never a code. The README's command table
documents these codes.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal, TypeGuard

#: How a job ended, as the engine, the API and the WebSocket say it: the API's terminal statuses
#: (``succeeded``, ``failed``, ``cancelled``, ``crashed``) and the engine's ``invalid`` (the pipeline
#: did not validate).
JobEnding = Literal["succeeded", "failed", "invalid", "cancelled", "crashed"]


class ExitCode(IntEnum):
    """What a ForgeFlow command's exit status means."""

    OK = 0  #: the job succeeded (or the command did what it was asked)
    FAILED = 1  #: the job failed or crashed, or the command could not do its work (no engine, API gone)
    INVALID = 2  #: the pipeline, the input or an option is invalid: nothing ran
    CANCELLED = 3  #: the job was cancelled (through the API, or its flow run by Prefect)
    INTERRUPTED = 130  #: Ctrl-C in the terminal (128 + SIGINT): the job was cancelled on the way out


_FOR_ENDING: dict[JobEnding, ExitCode] = {
    "succeeded": ExitCode.OK,
    "failed": ExitCode.FAILED,
    "crashed": ExitCode.FAILED,
    "invalid": ExitCode.INVALID,
    "cancelled": ExitCode.CANCELLED,
}


def exit_code_for(ending: JobEnding) -> ExitCode:
    """The exit code of a process that followed a job to ``ending``."""
    return _FOR_ENDING[ending]


def is_job_ending(status: object) -> TypeGuard[JobEnding]:
    """Whether ``status`` (as a JSON message gave it) is a :data:`JobEnding`, not ``queued``/``running``."""
    return status in _FOR_ENDING
