"""The wire protocol between a runner and its worker process.

Every message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (one object).
The parent writes requests to the worker's stdin; the worker answers on a private duplicate of its
*original* stdout file descriptor (fd 1 itself is pointed at stderr, so whatever a plugin prints,
through Python or with a raw ``os.write(1, ...)``, lands in the worker's log and never in the
protocol stream).

Messages (``type`` field):

worker → parent
    ``ready``   ``{pid, plugin, version}``: the plugin imported; the worker takes calls.
    ``unavailable`` ``{reason}``: the plugin could not load in the worker (the worker exits).
    ``progress`` ``{done, total, message}``: the running call's tool reported progress
                (``ctx.progress``, already rate-limited); any number before the call's ``result``.
    ``result``  ``{ok, outputs, error, error_type, traceback, duration_ms, result_size_bytes,
                peak_memory_mb, recycle}``: the answer to one ``call``.
parent → worker
    ``call``    ``{tool, config, inputs, memory_limit_mb, job_id, stage_index}``
    ``batch``   ``{tool, config, max_wait_ms, memory_limit_mb, items: [{inputs, job_id, stage_index,
                ...}]}``: several jobs' calls of one batchable tool at once (:mod:`.worker_batch`);
                each item's ``progress`` and ``result`` carry its ``item`` index, in any order.
    ``shutdown``: leave cleanly (closing stdin does the same).
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import time
from collections.abc import Callable, Mapping

from pydantic import JsonValue

from forgeflow.canonical import JsonObject

HEADER = struct.Struct(">I")
#: Largest message accepted (outputs travel by value; media travel by reference).
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed message."""


class PeerClosed(EOFError):
    """The peer closed its end (the worker died or exited)."""


class DeadlineExceeded(TimeoutError):
    """No complete message arrived before the deadline."""


def encode(message: Mapping[str, JsonValue]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    return HEADER.pack(len(body)) + body


def write_message(fd: int, message: Mapping[str, JsonValue]) -> None:
    """Write one framed message to a blocking file descriptor (all of it)."""
    data = memoryview(encode(message))
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _decode(body: bytes) -> JsonObject:
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict) or "type" not in message:
        raise ProtocolError("malformed message: not an object with a 'type'")
    return message


def read_message_blocking(fd: int) -> JsonObject | None:
    """Read one message from a blocking descriptor; None on a clean EOF before a header."""
    header = _read_exactly(fd, HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message length {length} is over the limit of {MAX_MESSAGE_BYTES}")
    body = _read_exactly(fd, length, allow_eof=False)
    assert body is not None
    return _decode(body)


def _read_exactly(fd: int, n: int, *, allow_eof: bool) -> bytes | None:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            if allow_eof and remaining == n:
                return None
            raise PeerClosed("peer closed the stream in the middle of a message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def text_field(message: Mapping[str, JsonValue], key: str) -> str | None:
    """``message[key]`` when it is a string, else None."""
    value = message.get(key)
    return value if isinstance(value, str) else None


def int_field(message: Mapping[str, JsonValue], key: str) -> int | None:
    """``message[key]`` when it is an integer, else None."""
    value = message.get(key)
    return value if isinstance(value, int) else None


def number_field(message: Mapping[str, JsonValue], key: str) -> float | None:
    """``message[key]`` when it is a number (an integer or a float), else None."""
    value = message.get(key)
    return value if isinstance(value, (int, float)) else None


def object_field(message: Mapping[str, JsonValue], key: str) -> JsonObject | None:
    """``message[key]`` when it is a JSON object, else None."""
    value = message.get(key)
    return value if isinstance(value, dict) else None


class MessageReader:
    """Reads framed messages from a non-blocking descriptor, waiting at most until a deadline.

    Used by the parent: ``read(deadline)`` returns the next message, raises
    :class:`DeadlineExceeded` when ``time.monotonic()`` passes ``deadline`` first, and
    :class:`PeerClosed` on EOF.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(fd, selectors.EVENT_READ)

    def close(self) -> None:
        try:
            self._selector.close()
        except Exception:  # pragma: no cover - best effort
            pass

    def _take(self) -> JsonObject | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message length {length} is over the limit of {MAX_MESSAGE_BYTES}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return _decode(body)

    def read(self, deadline: float, tick: float | None = None, on_tick: Callable[[], None] | None = None) -> JsonObject:
        """The next message. ``on_tick()`` (if given) runs about every ``tick`` seconds while waiting;
        an exception it raises ends the wait."""
        period = tick if on_tick is not None else None
        next_tick = time.monotonic() + period if period is not None else None
        while True:
            message = self._take()
            if message is not None:
                return message
            now = time.monotonic()
            if period is not None and next_tick is not None and now >= next_tick:
                if on_tick is not None:
                    on_tick()
                next_tick = now + period
            if now >= deadline:
                raise DeadlineExceeded("no message before the deadline")
            wait = deadline - now
            if next_tick is not None:
                wait = max(0.0, min(wait, next_tick - now))
            try:
                ready = self._selector.select(wait)
            except (ValueError, OSError):  # closed under us (the worker was killed: a cancel, say)
                raise PeerClosed("the worker's protocol stream was closed") from None
            if ready:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except BlockingIOError:
                    continue
                except OSError:  # the descriptor was closed under us
                    raise PeerClosed("the worker's protocol stream was closed") from None
                if not chunk:
                    raise PeerClosed("worker closed its protocol stream")
                self._buffer += chunk
