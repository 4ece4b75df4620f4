"""Who calls: bearer tokens with names and scopes, the WebSocket bearer subprotocol, the bind-address rule.

* Bound to loopback with no token configured: open (a single-user local service, every scope).
* Tokens configured (``FORGEFLOW_API_TOKEN``, and/or the named tokens of ``FORGEFLOW_API_TOKENS_FILE``),
  or bound to anything but loopback: every REST call needs ``Authorization: Bearer <token>``; a
  WebSocket sends that header or, from a browser (which cannot set headers on a WebSocket), offers the
  subprotocols ``forgeflow.v1`` and ``forgeflow.bearer.<base64url of the token>``; the service answers
  ``forgeflow.v1`` and never echoes the secret one. A token in a URL (``?token=``) is refused, never
  read: URLs end up in access logs. A non-loopback bind without a token refuses to start.
  ``/healthz``, the OpenAPI docs and the page's shell stay open (they reveal no data).
* Scopes: ``read`` (GET and the WebSocket streams), ``run`` (submit jobs, upload media, save
  templates, cancel one's own jobs), ``admin`` (cancel others' jobs, delete templates, anything else).
  ``FORGEFLOW_API_TOKEN`` holds all three. A call outside its token's scopes is a 403 naming the scope.
* The tokens file holds only SHA-256 hashes (``forgeflow tokens add`` writes entries); it is read again
  when its modification time or size changes, so tokens are added and revoked without a restart.
* The internal ingest endpoint always needs a token: the ingest token (``ingest_token``, or one the
  service generates once and keeps in its store) or an ``admin`` token. The ingest token also opens the
  media routes (worker hosts fetch and store media through them) and the batch routes (a worker host's
  batch flow run registers and follows its batch), and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypedDict

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

log = logging.getLogger(__name__)

bearer_scheme = HTTPBearer(
    auto_error=False,  # ForgeFlow answers itself, and only when the service has a token
    description="`Authorization: Bearer <token>`; needed when the service has tokens (always when it "
    "listens off loopback). The scopes an operation needs (`read`, `run`, `admin`) are listed with it.",
)

#: The subprotocol a WebSocket client offers (and the service answers) besides its bearer one.
WS_PROTOCOL = "forgeflow.v1"
#: Prefix of the subprotocol that carries the token, base64url-encoded (no padding).
WS_BEARER_PREFIX = "forgeflow.bearer."


class Scope(StrEnum):
    READ = "read"
    RUN = "run"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)

#: The name ``FORGEFLOW_API_TOKEN`` goes by in the records of who did what.
API_TOKEN_NAME = "api-token"
INGEST_NAME = "ingest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PrincipalDict(TypedDict):
    """A principal as JSON (:class:`~forgeflow.api.models.Caller` without ``auth_required``)."""

    name: str | None
    scopes: list[Scope]


@dataclass(frozen=True)
class Principal:
    """The caller: a token's name (None on an open service) and what it may do. ``worker``: the
    ingest token of worker hosts (media routes and ingest only)."""

    name: str | None
    scopes: frozenset[Scope]
    worker: bool = False

    def may(self, scope: Scope | str) -> bool:
        return Scope(scope) in self.scopes

    def to_dict(self) -> PrincipalDict:
        return {"name": self.name, "scopes": sorted(self.scopes, key=list(Scope).index)}


OPEN = Principal(None, ALL_SCOPES)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    scopes: frozenset[Scope]
    sha256: str


class InvalidTokens(SystemExit):
    """The tokens file cannot be used (a SystemExit at start-up: the command stops with the message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "invalid tokens file"


def hash_token(token: str) -> str:
    """The SHA-256 of a token in hex: what a tokens file keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(values: Iterable[object], where: str) -> frozenset[Scope]:
    scopes = set()
    for value in values:
        try:
            scopes.add(Scope(str(value).strip()))
        except ValueError:
            raise ValueError(f"{where}: unknown scope {value!r} (use read, run, admin)") from None
    return frozenset(scopes)


def parse_token_file(path: Path) -> list[TokenEntry]:
    """The entries of a tokens file: JSON ``{"tokens": [...]}`` (or a bare list) or TOML ``[[tokens]]``,
    each ``{name, scopes, sha256}``. Raises ValueError naming the entry and what is wrong."""
    text = path.read_text(encoding="utf-8")
    try:
        data: object = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from None
    items = data.get("tokens", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'tokens' must be a list of {{name, scopes, sha256}}")
    entries: list[TokenEntry] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for number, item in enumerate(items):
        where = f"{path}: tokens[{number}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be an object with name, scopes and sha256")
        if "token" in item:
            raise ValueError(
                f"{where}: holds a plain token; keep only its hash at rest ('sha256': the output of "
                "`forgeflow tokens hash`)"
            )
        name = str(item.get("name", ""))
        if not _NAME.match(name):
            raise ValueError(f"{where}: name {name!r} must be 1-64 letters, digits or . _ @ - (starting alphanumeric)")
        digest = str(item.get("sha256", "")).strip().lower()
        if not _SHA256.match(digest):
            raise ValueError(f"{where} ({name}): sha256 must be 64 hex digits (`forgeflow tokens hash`)")
        raw_scopes = item.get("scopes")
        if not isinstance(raw_scopes, list) or not raw_scopes:
            raise ValueError(f"{where} ({name}): scopes must be a non-empty list of read, run, admin")
        scopes = parse_scopes(raw_scopes, f"{where} ({name})")
        if name in seen_names or name == API_TOKEN_NAME:
            raise ValueError(f"{where}: the name {name!r} is used twice (or is the reserved {API_TOKEN_NAME!r})")
        if digest in seen_hashes:
            raise ValueError(f"{where} ({name}): the same token hash is listed twice")
        seen_names.add(name)
        seen_hashes.add(digest)
        entries.append(TokenEntry(name, scopes, digest))
    return entries


class TokenFile:
    """A tokens file, read again whenever its modification time or size changes. A file that became
    unreadable or invalid keeps the last good entries (and logs why); a removed file has none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, TokenEntry] = {}
        self.reload(strict=True)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self, *, strict: bool = False) -> None:
        stamp = self._stat()
        if stamp is None:
            if strict:
                raise InvalidTokens(f"FORGEFLOW_API_TOKENS_FILE={self.path}: no such file")
            if self._stamp is not None:
                log.warning("tokens file %s was removed: its tokens no longer open anything", self.path)
            self._entries, self._stamp = {}, None
            return
        try:
            entries = parse_token_file(self.path)
        except (OSError, ValueError) as exc:
            if strict:
                raise InvalidTokens(f"FORGEFLOW_API_TOKENS_FILE: {exc}") from None
            log.error("tokens file not reloaded, the previous tokens stay in force: %s", exc)
            self._stamp = stamp  # say it once per change, not per request
            return
        if self._stamp is not None:
            log.info("tokens file %s reloaded: %d token(s)", self.path, len(entries))
        self._entries = {e.sha256: e for e in entries}
        self._stamp = stamp

    def entries(self) -> dict[str, TokenEntry]:
        with self._lock:
            if self._stat() != self._stamp:
                self.reload()
            return self._entries


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


def check_bind(host: str, has_tokens: bool) -> None:
    if not is_loopback(host) and not has_tokens:
        raise InsecureBind(
            f"refusing to listen on {host!r} without an API token: set FORGEFLOW_API_TOKEN or "
            "FORGEFLOW_API_TOKENS_FILE (every REST and WebSocket call must then send a bearer token), "
            "or bind to 127.0.0.1"
        )


def check_access_settings(host: str, has_tokens: bool, tokens_file: Path | None) -> None:
    """Before anything starts: the bind rule, and a tokens file that exists and parses (else a
    SystemExit naming the file and what is wrong)."""
    check_bind(host, has_tokens)
    if tokens_file is not None:
        TokenFile(tokens_file)


def _bearer(conn: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, parsed as :data:`bearer_scheme` does."""
    scheme, value = get_authorization_scheme_param(conn.headers.get("authorization"))
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    return None


def ws_subprotocols(conn: HTTPConnection) -> list[str]:
    header = conn.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in header.split(",") if p.strip()]


def ws_bearer_protocol(token: str) -> str:
    """The subprotocol that carries ``token`` (base64url: any token fits the header's character set)."""
    return WS_BEARER_PREFIX + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def _ws_token(conn: HTTPConnection) -> str | None:
    for protocol in ws_subprotocols(conn):
        if protocol.startswith(WS_BEARER_PREFIX):
            encoded = protocol[len(WS_BEARER_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() or None
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
    return None


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


class Authenticator:
    """Turns a request's credentials into a :class:`Principal` (or a 401)."""

    def __init__(self, api_token: str | None, ingest_token: str, tokens_file: Path | None = None) -> None:
        self.api_token = api_token or None
        self.ingest_token = ingest_token
        self.tokens = TokenFile(tokens_file) if tokens_file is not None else None

    @property
    def required(self) -> bool:
        return self.api_token is not None or self.tokens is not None

    def identify(self, token: str | None, *, worker: bool = False) -> Principal:
        """The principal of a bearer token (``None``: no usable ``Authorization: Bearer`` header).
        With ``worker``, the ingest token a worker host holds is accepted too."""
        if not self.required:
            return OPEN
        token = token.strip() if token else None
        if not token:
            raise unauthorized("missing 'Authorization: Bearer <token>' header")
        if _matches(token, self.api_token):
            return Principal(API_TOKEN_NAME, ALL_SCOPES)
        if self.tokens is not None:
            entry = self.tokens.entries().get(hash_token(token))
            if entry is not None:
                return Principal(entry.name, entry.scopes)
        if worker and _matches(token, self.ingest_token):
            return Principal(INGEST_NAME, frozenset(), worker=True)
        raise unauthorized("invalid API or ingest token" if worker else "invalid API token")

    def identify_ws(self, conn: HTTPConnection) -> Principal:
        how = (
            f"send 'Authorization: Bearer <token>' or offer the subprotocols '{WS_PROTOCOL}' and "
            f"'{WS_BEARER_PREFIX}<base64url of the token>'"
        )
        if "token" in conn.query_params:
            raise unauthorized(f"a token in the URL is refused (URLs are logged): {how}")
        token = _bearer(conn) or _ws_token(conn)
        if self.required and not token:
            raise unauthorized(f"missing token: {how}")
        return self.identify(token)

    def check_ingest(self, conn: HTTPConnection) -> None:
        token = _bearer(conn)
        if token is None:
            raise unauthorized("the ingest endpoint needs 'Authorization: Bearer <ingest token>'")
        if _matches(token, self.ingest_token):
            return
        try:
            principal = self.identify(token)
        except ApiError:
            raise unauthorized("invalid ingest token") from None
        if not principal.may(Scope.ADMIN):
            raise forbidden(principal, Scope.ADMIN)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, ApiErrorType.UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def forbidden(principal: Principal, scope: Scope, doing: str | None = None) -> ApiError:
    held = ", ".join(principal.to_dict()["scopes"]) or "none"
    what = doing or "this call"
    return ApiError(
        403,
        f"{what} needs the '{scope}' scope; the token {principal.name!r} has: {held}",
        ApiErrorType.FORBIDDEN,
        missing_scope=str(scope),
        headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
    )
