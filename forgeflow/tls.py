"""One TLS context per process for ForgeFlow's HTTP clients.

httpx loads the CA bundle for every client it makes: tens of ms of CPU each time, and seconds on a
busy 2-core host. The engine makes clients per job (its event sender, its media sync), so they share
this context, made once with httpx's own defaults (certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""

from __future__ import annotations

import ssl
from functools import cache

import httpx

__all__ = ["tls_context"]


@cache
def tls_context() -> ssl.SSLContext:
    """The process's TLS context for verified HTTPS (what ``verify=True`` would load each time)."""
    return httpx.create_ssl_context()
