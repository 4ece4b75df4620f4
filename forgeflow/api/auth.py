"""Bearer-token authentication of REST and WebSocket calls, and the bind-address rule.

* Bound to loopback with no ``api_token``: open (a single-user local service).
* ``api_token`` set, or bound to anything but loopback: every REST and WebSocket call needs
  ``Authorization: Bearer <token>`` (WebSockets may pass ``?token=`` instead); a non-loopback bind
  without a token refuses to start. ``/healthz`` and the OpenAPI docs stay open (they reveal no data).
* The internal ingest endpoint always needs a token: the ingest token (``ingest_token``, or one the
  service generates once and keeps in its store) or the API token.

REST routes read the token through FastAPI's :data:`bearer_scheme` (``HTTPBearer``), so the OpenAPI
document declares the bearer security scheme; the answer to a missing or wrong token stays ForgeFlow's
own 401 (``{"error", "error_type": "Unauthorized"}`` with ``WWW-Authenticate: Bearer``).
"""

from __future__ import annotations

import hmac
import ipaddress

# The first API module `forgeflow serve` imports: without the api extra it stops here and says so
# (python-multipart is checked too: Starlette would only complain at the first upload).
try:
    import python_multipart  # noqa: F401
    from fastapi.security import HTTPBearer
    from fastapi.security.utils import get_authorization_scheme_param
    from starlette.requests import HTTPConnection
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        f"the ForgeFlow API needs the 'api' extra ({exc.name} is not installed): pip install 'forgeflow[api]'",
        name=exc.name,
    ) from exc

from forgeflow.api.errors import ApiError, ApiErrorType

bearer_scheme = HTTPBearer(
    auto_error=False,  # ForgeFlow answers itself, and only when the service has a token
    description="`Authorization: Bearer <FORGEFLOW_API_TOKEN>`; needed when the service has an API token "
    "(always when it listens off loopback).",
)


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
    """The token of an ``Authorization: Bearer <token>`` header, parsed as :data:`bearer_scheme` does."""
    scheme, value = get_authorization_scheme_param(conn.headers.get("authorization"))
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
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
        self.check_token(_bearer(conn))

    def check_token(self, token: str | None, *, worker: bool = False) -> None:
        """A REST call's bearer token (``None``: no usable ``Authorization: Bearer`` header). With
        ``worker``, the ingest token a worker host holds is accepted too (the media routes: its flow
        runs fetch their inputs and store their outputs through the API)."""
        if not self.required:
            return
        token = token.strip() if token else None
        if not token:
            raise _unauthorized("missing 'Authorization: Bearer <token>' header")
        accepted = (self.api_token, self.ingest_token) if worker else (self.api_token,)
        if not _matches(token, *accepted):
            raise _unauthorized("invalid API or ingest token" if worker else "invalid API token")

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
    return ApiError(401, message, ApiErrorType.UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
