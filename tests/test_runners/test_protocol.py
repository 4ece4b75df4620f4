"""The length-prefixed JSON framing between runner and worker."""

from __future__ import annotations

import os
import threading
import time

import pytest

from forgeflow.canonical import canonical_bytes
from forgeflow.engine.runners.protocol import (
    DeadlineExceeded,
    MessageReader,
    PeerClosed,
    ProtocolError,
    encode,
    read_message_blocking,
    write_message,
)

pytestmark = pytest.mark.fast


def test_roundtrip_and_partial_writes():
    r, w = os.pipe()
    reader = MessageReader(r)
    message = {"type": "result", "outputs": {"text": "héllo", "n": list(range(1000))}}
    data = encode(message)
    assert int.from_bytes(data[:4], "big") == len(data) - 4

    def dribble() -> None:
        for i in range(0, len(data), 7):
            os.write(w, data[i : i + 7])
            time.sleep(0.0005)

    t = threading.Thread(target=dribble)
    t.start()
    assert reader.read(time.monotonic() + 10) == message
    t.join()
    os.close(w)
    with pytest.raises(PeerClosed):
        reader.read(time.monotonic() + 1)
    reader.close()
    os.close(r)


def test_a_reader_closed_by_another_thread_reports_the_peer_gone():
    r, w = os.pipe()
    reader = MessageReader(r)
    closer = threading.Timer(0.1, reader.close)  # what killing the worker does while a call waits
    closer.start()
    started = time.monotonic()
    with pytest.raises(PeerClosed):
        reader.read(started + 5, tick=0.05, on_tick=lambda: None)
    assert time.monotonic() - started < 2
    closer.join()
    os.close(w)
    os.close(r)


def test_deadline_and_ticks():
    r, w = os.pipe()
    reader = MessageReader(r)
    ticks = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        reader.read(started + 0.3, tick=0.05, on_tick=lambda: ticks.append(1))
    assert 0.3 <= time.monotonic() - started < 0.6
    assert len(ticks) >= 3
    os.close(w)
    os.close(r)


def test_tick_exception_ends_the_wait():
    r, w = os.pipe()
    reader = MessageReader(r)

    def stop() -> None:
        raise KeyError("stop")

    with pytest.raises(KeyError):
        reader.read(time.monotonic() + 5, tick=0.01, on_tick=stop)
    os.close(w)
    os.close(r)


def test_blocking_reader_and_garbage():
    r, w = os.pipe()
    write_message(w, {"type": "call", "tool": "x"})
    assert read_message_blocking(r) == {"type": "call", "tool": "x"}
    os.write(w, (5).to_bytes(4, "big") + b"nope!")
    with pytest.raises(ProtocolError):
        read_message_blocking(r)
    os.write(w, (0xFFFFFFFF).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        read_message_blocking(r)
    os.close(w)
    assert read_message_blocking(r) is None
    os.close(r)


def test_canonical_json_is_sorted_and_compact():
    assert canonical_bytes({"b": 1, "a": [1, 2], "é": "ü"}) == '{"a":[1,2],"b":1,"é":"ü"}'.encode()
