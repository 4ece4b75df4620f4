"""The ``forgeflow`` command: its command groups and commands, wired into one app.

Each command lives with the others that act on the same thing: ``run`` (:mod:`forgeflow.cli.run`),
``validate``/``schema``/``sample-clip`` (:mod:`forgeflow.cli.pipelines`), ``plugins``
(:mod:`forgeflow.cli.plugins`), ``engine`` (:mod:`forgeflow.cli.engine`), ``serve``/``up``/
``worker``/``down`` (:mod:`forgeflow.cli.serve`), ``watch``, ``batch`` and ``tokens``. Their exit
codes are :class:`forgeflow.exit_codes.ExitCode`. Importing this module changes nothing in the
process: :func:`prepare_process` does that when a command starts.
"""

from __future__ import annotations

import os
import sys

import typer

from forgeflow.cli.batch import batch
from forgeflow.cli.engine import engine_app
from forgeflow.cli.help import ProseHelp
from forgeflow.cli.pipelines import sample_clip, schema, validate
from forgeflow.cli.plugins import plugins_app
from forgeflow.cli.run import run
from forgeflow.cli.serve import down, serve, up, worker
from forgeflow.cli.tokens import tokens_app
from forgeflow.cli.watch import watch
from forgeflow.redact import install_log_redaction

app = typer.Typer(
    cls=ProseHelp, help="ForgeFlow: fault-isolated multi-plugin vision pipelines on Prefect.", no_args_is_help=True
)


@app.callback()
def prepare_process() -> None:
    # Runs before every command (not on --help). Quiet, offline Prefect for a command-line tool; the
    # user's environment still wins (setdefault). These are read when a command first imports Prefect:
    # - PREFECT_SERVER_ANALYTICS_ENABLED, DO_NOT_TRACK: no telemetry from a local tool (it may be offline);
    # - PREFECT_LOGGING_LEVEL=CRITICAL: the CLI prints its own summary, not Prefect's logs (--verbose
    #   turns them back on);
    # - PREFECT_UI_ENABLED=false: an ephemeral or engine-started Prefect server serves no UI;
    # - PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120: a loaded 2-core machine needs more than
    #   the default 20 s to start the ephemeral server.
    # The processes a command starts (the engine, the API, workers) inherit them.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Every ForgeFlow process a command becomes (API, engine, worker, the stack's parts) logs no credential.
    install_log_redaction()


# The order of registration is the order of ``forgeflow --help``'s command list.
app.add_typer(plugins_app, name="plugins")
app.add_typer(engine_app, name="engine")
app.add_typer(tokens_app, name="tokens")
app.command("watch")(watch)
app.command("batch")(batch)
app.command()(validate)
app.command()(run)
app.command()(schema)
app.command("sample-clip")(sample_clip)
app.command()(serve)
app.command()(up)
app.command()(worker)
app.command()(down)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
