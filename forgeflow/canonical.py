"""The one canonical JSON text of ForgeFlow: sorted keys, no spaces, UTF-8 kept.

Equal values give equal bytes, so it serves request hashes (idempotent job ids), cache keys, result
sizes and the runner↔worker wire format alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def canonical_json(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """``value`` as canonical JSON text; ``default`` converts what JSON cannot hold (as in :func:`json.dumps`)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


def canonical_bytes(value: Any) -> bytes:
    """:func:`canonical_json` encoded as UTF-8."""
    return canonical_json(value).encode()
