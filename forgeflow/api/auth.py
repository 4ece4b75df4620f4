"""Bearer-token authentication of REST and WebSocket calls, and the bind-address rule.

* Bound to loopback with no ``api_token``: open (a single-user local service).
* ``api_token`` set, or bound to anything but loopback: every REST and WebSocket call needs
  ``Authorization: Bearer <token>`` (WebSockets may pass ``?token=`` instead); a non-loopback bind
  without a token refuses to start. ``/healthz`` and the OpenAPI docs stay open (they reveal no data).
* The internal ingest endpoint always needs a token: the ingest token (``ingest_token``, or one the
  service generates once and keeps in its store) or the API token.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import HTTPConnection

from forgeflow.api.errors import ApiError


class InsecureBind(SystemExit):
    """A non-loopback bind without an API token (a SystemExit: the command stops with the message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "insecure bind"


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise InsecureBind(
            f"refusing to listen on {host!r} without an API token: set FORGEFLOW_API_TOKEN "
            "(every REST and WebSocket call must then send 'Authorization: Bearer <token>'), "
            "or bind to 127.0.0.1"
        )


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def _matches(given: str | None, *expected: str | None) -> bool:
    if not given:
        return False
    return any(e is not None and hmac.compare_digest(given.encode(), e.encode()) for e in expected)


class Authenticator:
    def __init__(self, api_token: str | None, ingest_token: str) -> None:
        self.api_token = api_token or None
        self.ingest_token = ingest_token

    @property
    def required(self) -> bool:
        return self.api_token is not None

    def check_http(self, conn: HTTPConnection) -> None:
        if not self.required:
            return
        token = _bearer(conn)
        if token is None:
            raise _unauthorized("missing 'Authorization: Bearer <token>' header")
        if not _matches(token, self.api_token):
            raise _unauthorized("invalid API token")

    def ws_allowed(self, conn: HTTPConnection) -> bool:
        if not self.required:
            return True
        return _matches(_bearer(conn) or conn.query_params.get("token"), self.api_token)

    def check_ingest(self, conn: HTTPConnection) -> None:
        token = _bearer(conn)
        if token is None:
            raise _unauthorized("the ingest endpoint needs 'Authorization: Bearer <ingest token>'")
        if not _matches(token, self.ingest_token, self.api_token):
            raise _unauthorized("invalid ingest token")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "Unauthorized", headers={"WWW-Authenticate": "Bearer"})
