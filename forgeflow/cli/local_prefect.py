"""The Prefect server a command uses when ``PREFECT_API_URL`` names none: a running local one."""

from __future__ import annotations

import os

#: Where ``prefect server start`` listens by default (and ``forgeflow up`` puts it).
LOCAL_PREFECT_URL = "http://127.0.0.1:4200/api"


def use_local_prefect() -> None:
    """Point Prefect at a running local server (``PREFECT_API_URL`` wins) instead of an ephemeral one."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import httpx

    try:
        if httpx.get(f"{LOCAL_PREFECT_URL}/health", timeout=0.5).status_code == 200:
            os.environ["PREFECT_API_URL"] = LOCAL_PREFECT_URL
    except httpx.HTTPError:
        pass
