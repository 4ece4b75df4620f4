"""Small helpers of the runner tests."""

from __future__ import annotations

import os
import time
from typing import Any

from forgeflow.engine.runners import ToolCall
from forgeflow.processes import pid_alive

__all__ = ["call", "group_gone", "pid_alive"]


def call(tool: str, plugin: str = "testkit", **kw: Any) -> ToolCall:
    return ToolCall(plugin=plugin, tool=tool, **kw)


def group_gone(pgid: int, within_s: float = 1.0) -> bool:
    """True when no process of group ``pgid`` is left (zombies count as gone once reaped)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
