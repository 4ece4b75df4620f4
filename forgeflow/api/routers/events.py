"""Realtime: the internal ingest endpoint and the WebSocket streams.

``POST /internal/v1/events`` (Bearer ingest token, or an ``admin`` API token) stores each event
(dedupe by ``event_id``, per-job ``seq``) and only then broadcasts it.

``WS /v1/ws/jobs/{job_id}?after_seq=N`` streams one job: it subscribes first, replays the stored
messages with ``seq > N`` (default 0: everything) from the database, then sends live ones, skipping
any ``seq`` already sent and filling a gap from the database, so every message arrives exactly once
and in order. The stream closes (1000, "job finished") after the terminal ``job_status``.

``WS /v1/ws/jobs?after_cursor=N`` streams every job. Each message also carries ``cursor``, the
global position of the stream; without ``after_cursor`` it starts with live messages. It also
carries ``batch_progress`` messages (live only, no cursor) whenever a batch's counts change.

A stream needs a ``read`` token, in ``Authorization: Bearer`` or the ``forgeflow.bearer.`` subprotocol
(:mod:`forgeflow.api.auth`); a token in the URL is refused.

A client whose queue (``ws_queue_size``) overflows is closed with code 1013 and a reason naming
where to resume; the others and the ingestion never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from forgeflow.api.auth import WS_PROTOCOL, Scope, forbidden, ws_subprotocols
from forgeflow.api.deps import ApiState, api_state, get_state
from forgeflow.api.errors import ApiError, ApiErrorType
from forgeflow.api.hub import Notice, Subscription
from forgeflow.api.models import MAX_POSITION, ErrorBody, IngestBatch, IngestResult
from forgeflow.api.store import StoredEvent
from forgeflow.pipeline.outcome import is_terminal

log = logging.getLogger(__name__)

router = APIRouter(tags=["realtime"])

REPLAY_PAGE = 500
MAX_INGEST_BYTES = 64 * 1024 * 1024


async def _check_ingest(request: Request) -> None:
    api_state(request).auth.check_ingest(request)


@router.post(
    "/internal/v1/events",
    response_model=IngestResult,
    summary="Ingest events from flow runs (internal)",
    dependencies=[Depends(_check_ingest)],
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid ingest token."},
        403: {"model": ErrorBody, "description": "An API token without the `admin` scope (`missing_scope`)."},
        413: {"model": ErrorBody, "description": "Batch too large."},
        422: {"model": ErrorBody, "description": "An event is malformed (nothing of the batch is stored)."},
    },
)
async def ingest_events(request: Request, batch: IngestBatch, state: ApiState = Depends(get_state)) -> IngestResult:
    """Body `{"events": [event, ...], "alive": [job_id, ...]}`. Events are stored (a re-delivered
    `event_id` once), numbered per job, and then broadcast. Each job's status, stage table and plugin
    lifecycle follow from them. `alive` (and every event) tells that a job's host still runs it."""
    parsed = batch.events
    alive = {*batch.alive, *(e.job_id for e in parsed)}
    stored = await run_in_threadpool(
        lambda: state.store.ingest(parsed, publish=state.publish, resolve_plugin=state.resolve_plugin, alive=alive)
    )
    if state.launcher is not None and any(e.terminal for e in stored):
        state.launcher.wake()
    return IngestResult(received=len(parsed), stored=len(stored), duplicates=len(parsed) - len(stored))


# --- WebSockets -----------------------------------------------------------------------------------


@dataclass
class _Position:
    last: int


async def _deny(websocket: WebSocket, status: int, error: str, error_type: str) -> None:
    body = {"error": error, "error_type": error_type}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    except RuntimeError:
        await websocket.close(code=4000 + status, reason=error[:120])


async def _admit(websocket: WebSocket, state: ApiState) -> bool:
    """Whether the caller may read the streams; a refusal is answered (401, 403) before the upgrade."""
    try:
        principal = state.auth.identify_ws(websocket)
        if not principal.may(Scope.READ):
            raise forbidden(principal, Scope.READ)
    except ApiError as exc:
        await _deny(websocket, exc.status, exc.error, exc.error_type)
        return False
    return True


async def _accept(websocket: WebSocket) -> None:
    """Accept, answering ``forgeflow.v1`` when the client offered it (a browser that offered subprotocols
    needs one back); the bearer subprotocol is never echoed."""
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in ws_subprotocols(websocket) else None)


def _query_int(websocket: WebSocket, name: str) -> int | None:
    raw = websocket.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20 or int(raw) > MAX_POSITION:
        raise ValueError(f"{name} must be an integer from 0 to {MAX_POSITION}")
    return int(raw)


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _run_stream(
    websocket: WebSocket,
    state: ApiState,
    sub: Subscription,
    sender: Coroutine[object, object, str],
    pos: _Position,
    resume_param: str,
) -> None:
    reader = asyncio.create_task(_drain_client(websocket))
    sending = asyncio.create_task(sender)
    overflow = asyncio.create_task(sub.overflowed.wait())
    try:
        done, _ = await asyncio.wait({reader, sending, overflow}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done and not sending.cancelled():
            exc = sending.exception()
            if exc is None and sending.result() == "finished":
                await _close(websocket, 1000, "job finished")
            elif exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                log.error("websocket stream failed", exc_info=exc)
                await _close(websocket, 1011, f"internal error; reconnect with {resume_param}={pos.last}")
        elif overflow in done:
            sending.cancel()
            with contextlib.suppress(BaseException):
                await sending
            reason = (
                f"slow consumer: over {state.hub.queue_size} messages queued; resume with {resume_param}={pos.last}"
            )
            await _close(websocket, 1013, reason, wait_s=60)
    finally:
        state.hub.unsubscribe(sub)
        for task in (reader, sending, overflow):
            task.cancel()
        for task in (reader, sending, overflow):
            with contextlib.suppress(BaseException):
                await task


async def _close(websocket: WebSocket, code: int, reason: str, wait_s: float = 10) -> None:
    """Close with a reason; the frame waits behind what the client has not read yet (up to ``wait_s``)."""
    if WebSocketState.DISCONNECTED in (websocket.application_state, websocket.client_state):
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code=code, reason=reason.encode()[:120].decode(errors="ignore")), wait_s)


async def _send_job(websocket: WebSocket, state: ApiState, sub: Subscription, job_id: str, pos: _Position) -> str:
    store = state.store

    async def send(event: StoredEvent) -> bool:
        await websocket.send_text(event.payload)
        pos.last = event.seq
        return event.terminal

    async def replay(until: int | None = None) -> bool:
        while True:
            page = await run_in_threadpool(store.events_after, job_id, pos.last, REPLAY_PAGE)
            for event in page:
                if until is not None and event.seq >= until:
                    return False
                if await send(event):
                    return True
            if len(page) < REPLAY_PAGE:
                return False

    if await replay():
        return "finished"
    job = await run_in_threadpool(store.get_job, job_id)
    if job is not None and is_terminal(job["status"]) and pos.last >= job["last_seq"]:
        return "finished"
    while True:
        received = await sub.queue.get()
        if isinstance(received, Notice):  # notices go to the all-jobs stream only
            continue
        if received.seq <= pos.last:
            continue
        if received.seq > pos.last + 1 and await replay(until=received.seq):  # a gap: fill it from the store
            return "finished"
        if received.seq <= pos.last:
            continue
        if await send(received):
            return "finished"


async def _send_all(websocket: WebSocket, state: ApiState, sub: Subscription, pos: _Position) -> str:
    store = state.store
    while True:
        page = await run_in_threadpool(store.events_after_cursor, pos.last, REPLAY_PAGE)
        for event in page:
            await websocket.send_text(event.with_cursor())
            pos.last = event.cursor
        if len(page) < REPLAY_PAGE:
            break
    while True:
        received = await sub.queue.get()
        if isinstance(received, Notice):
            await websocket.send_text(received.text)
            continue
        if received.cursor <= pos.last:
            continue
        await websocket.send_text(received.with_cursor())
        pos.last = received.cursor


@router.websocket("/v1/ws/jobs/{job_id}")
async def ws_job(websocket: WebSocket, job_id: str) -> None:
    """Messages of one job: `?after_seq=N` replays what came after N (default 0), then live."""
    state = api_state(websocket)
    if not await _admit(websocket, state):
        return
    try:
        after = _query_int(websocket, "after_seq") or 0
    except ValueError as exc:
        await _deny(websocket, 422, str(exc), ApiErrorType.REQUEST_VALIDATION)
        return
    job = None if "\x00" in job_id else await run_in_threadpool(state.store.get_job, job_id)  # no id holds a NUL
    if job is None:
        await _deny(websocket, 404, f"unknown job {job_id!r}", ApiErrorType.NOT_FOUND)
        return
    await _accept(websocket)
    sub = state.hub.subscribe(job_id)  # subscribe before the replay reads the store
    pos = _Position(after)
    await _run_stream(websocket, state, sub, _send_job(websocket, state, sub, job_id, pos), pos, "after_seq")


@router.websocket("/v1/ws/jobs")
async def ws_all_jobs(websocket: WebSocket) -> None:
    """Messages of every job, each with a global `cursor`; `?after_cursor=N` replays what came after N."""
    state = api_state(websocket)
    if not await _admit(websocket, state):
        return
    try:
        after = _query_int(websocket, "after_cursor")
        if after is None:
            after = _query_int(websocket, "after_seq")  # on this stream, the position is the cursor
    except ValueError as exc:
        await _deny(websocket, 422, str(exc), ApiErrorType.REQUEST_VALIDATION)
        return
    await _accept(websocket)
    sub = state.hub.subscribe(None)
    if after is None:
        after = await run_in_threadpool(state.store.max_cursor)
    pos = _Position(after)
    await _run_stream(websocket, state, sub, _send_all(websocket, state, sub, pos), pos, "after_cursor")
