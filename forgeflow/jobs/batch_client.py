"""A client of the API's ``/v1/batches`` (and the media upload it needs), for the batch flow and the CLI.

Files of a folder on this host travel to the API's media store by upload (``POST /v1/media``), so a
batch flow run or ``forgeflow batch`` works on any host: the API and the workers read the media by ref.
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from forgeflow.tls import tls_context

TERMINAL_BATCH = frozenset({"succeeded", "failed", "cancelled"})


class BatchApiError(RuntimeError):
    """The API refused a batch request (``status_code``, the API's ``error``)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def folder_files(folder: Path, pattern: str, max_files: int) -> list[Path]:
    """The files of ``folder`` matching the glob ``pattern``, sorted by name, at most ``max_files``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern))
    return found[:max_files]


class BatchClient:
    """The API at ``api_url`` with ``token`` (an API token, or a worker host's ingest token)."""

    def __init__(self, api_url: str, token: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=timeout, verify=tls_context())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                reason = response.json().get("error") or response.text
            except ValueError:
                reason = response.text
            raise BatchApiError(
                f"{response.request.method} {response.request.url.path}: {reason}", response.status_code
            )
        data: dict[str, Any] = response.json()
        return data

    def upload(self, path: Path) -> dict[str, Any]:
        """Store the file in the API's media store: ``{"ref": ..., ...}`` (the bytes stream, never whole in memory)."""
        with path.open("rb") as fh:
            answer = self.http.post(
                "/v1/media",
                content=fh,
                headers={"Content-Type": "application/octet-stream", "X-Filename": quote(path.name)},
                timeout=httpx.Timeout(60.0, read=None, write=None),
            )
        return self._json(answer)

    def upload_folder(self, paths: list[Path]) -> tuple[list[dict[str, str]], dict[str, str]]:
        """Each file uploaded: the ``[{ref, name}]`` of the stored ones, and why each other was refused."""
        media: list[dict[str, str]] = []
        refused: dict[str, str] = {}
        for path in paths:
            try:
                media.append({"ref": self.upload(path)["ref"], "name": path.name})
            except BatchApiError as exc:
                if exc.status_code >= 500 or exc.status_code in (401, 403):
                    raise
                refused[path.name] = str(exc)
        return media, refused

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/batches", json=body))

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/batches/{quote(batch_id, safe='')}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/batches/{quote(batch_id, safe='')}/cancel"))

    def retry(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/batches/{quote(batch_id, safe='')}/retry"))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{quote(job_id, safe='')}"))

    def summary(self, batch_id: str, kind: str) -> bytes:
        """The batch's summary, ``kind`` ``csv`` or ``parquet``."""
        answer = self.http.get(f"/v1/batches/{quote(batch_id, safe='')}/summary.{kind}")
        if answer.status_code >= 400:
            self._json(answer)
        return answer.content

    def wait(self, batch_id: str, poll_s: float = 1.0, on_update: Any = None) -> dict[str, Any]:
        """The batch once it ended; ``on_update(batch)`` after each read while it runs."""
        while True:
            batch = self.get(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch["status"] in TERMINAL_BATCH:
                return batch
            time.sleep(poll_s)
