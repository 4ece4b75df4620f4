"""``forgeflow watch JOB_ID``: follow a job of a running API over its WebSocket, one JSON message a line.

The token (``FORGEFLOW_API_TOKEN``, or the first line of ``--token-file``) travels in the
``Authorization`` header of the WebSocket handshake, never in the URL. A dropped connection resumes
after the last ``seq`` received; the command ends when the job does (exit 0 when it succeeded, 1 when
it failed or crashed, 3 when it was cancelled: :func:`forgeflow.exit_codes.exit_code_for`) or when the API refuses the call (exit 2, with its reason).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from forgeflow.cli.output import console
from forgeflow.exit_codes import ExitCode, exit_code_for, is_job_ending

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject


def _token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").splitlines()[0].strip() or None
        except (OSError, IndexError) as exc:
            console.print(f"[red]--token-file {token_file}: {getattr(exc, 'strerror', None) or 'empty'}[/red]")
            raise typer.Exit(ExitCode.INVALID) from None
    from forgeflow.settings import get_settings

    secret = get_settings().api_token
    return secret.get_secret_value() if secret is not None else None


def _status(api: str, job_id: str, headers: dict[str, str]) -> str | None:
    from urllib.parse import quote

    import httpx

    try:
        answer = httpx.get(f"{api.rstrip('/')}/v1/jobs/{quote(job_id, safe='')}", headers=headers, timeout=30)
        return str(answer.json()["status"]) if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def watch(
    job_id: str = typer.Argument(..., help="The job to follow."),
    api: str | None = typer.Option(None, "--api", help="The API's URL (default: FORGEFLOW_API_URL, else this host's)."),
    after_seq: int = typer.Option(0, "--after-seq", min=0, help="Only messages after this seq."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="A file whose first line is the token (default: FORGEFLOW_API_TOKEN)."
    ),
) -> None:
    """Follow a job's realtime messages from the API (JSON lines on stdout) until it ends."""
    from urllib.parse import quote

    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    from forgeflow.api.auth import WS_PROTOCOL
    from forgeflow.settings import get_settings

    settings = get_settings()
    if api is None:
        from forgeflow.api.app import local_api_url

        api = local_api_url(settings)
    base = api.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    token = _token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    position = after_seq
    status: str | None = None
    attempts = 0
    while True:
        url = f"{base}/v1/ws/jobs/{quote(job_id, safe='')}?after_seq={position}"
        try:
            with connect(
                url, additional_headers=headers, subprotocols=[Subprotocol(WS_PROTOCOL)], open_timeout=30
            ) as ws:
                attempts = 0
                for text in ws:
                    message: JsonObject = json.loads(text)
                    seq = message.get("seq", position)
                    position = max(position, seq if isinstance(seq, int) else position)
                    if message.get("type") == "job_status":
                        said = message.get("status")
                        status = said if isinstance(said, str) else None
                    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
                    sys.stdout.flush()
                if ws.close_code == 1000 and ws.close_reason == "job finished":
                    if status is None:  # it ended before --after-seq: ask for its status
                        status = _status(api, job_id, headers)
                    raise typer.Exit(exit_code_for(status) if is_job_ending(status) else ExitCode.FAILED)
        except InvalidStatus as exc:
            response = exc.response
            try:
                reason = json.loads(response.body or b"{}").get("error", "")
            except ValueError:
                reason = ""
            console.print(f"[red]the API refused the stream ({response.status_code}): {reason}[/red]")
            raise typer.Exit(ExitCode.INVALID) from None
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            attempts += 1
            if attempts > 10:
                console.print(f"[red]lost the API at {api}: {exc}[/red]")
                raise typer.Exit(ExitCode.FAILED) from None
        time.sleep(min(5.0, 0.2 * 2**attempts))
