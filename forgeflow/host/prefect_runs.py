"""Prefect for the daemon's flow runs: settings without the heartbeat thread, one TLS context, the
server's default result storage and whether it wants CSRF tokens asked once a minute (each saves
time or a request on every flow run)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

from forgeflow.jobs.flow_runs import prefect_tls_context

if TYPE_CHECKING:
    from collections.abc import Callable

    from prefect.context import SettingsContext, SyncClientContext
    from prefect.settings import Profile, Settings

#: How long the engine trusts the Prefect server's default result storage (see _remember_result_storage).
RESULT_STORAGE_TTL_S = 60.0
#: How long a job waits for a Prefect server too busy to create its flow run before it fails.
PREFECT_BUSY_WAIT_S = 300.0


def prefect_busy(exc: BaseException) -> bool:
    """Whether Prefect refused or never received a request, so repeating it cannot do anything twice:
    a 503/429 (its write lock, its rate limit) or a connection that was not made."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (429, 503)
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _remember_result_storage() -> None:
    """Ask the Prefect server for its default result storage once a minute, not twice per flow run.

    Prefect reads it (``GET /admin/storage``) when a flow is called and again for its result store:
    two of the nine requests of an engine's flow run, for a setting an operator changes rarely. ForgeFlow's
    flows persist no result, so a change reaches the engine's runs within the minute. Left as it is
    when this Prefect has no such function."""
    from prefect import results

    read = getattr(results, "_read_server_default_result_storage_block_id", None)
    if read is None or getattr(read, "forgeflow_cached", False):
        return
    results._read_server_default_result_storage_block_id = _CachedRead(read)


class _CachedRead:
    """Prefect's read of the server's default result storage, asked again only after
    :data:`RESULT_STORAGE_TTL_S` (see :func:`_remember_result_storage`)."""

    #: What marks Prefect's function as replaced already.
    forgeflow_cached = True

    def __init__(self, read: Callable[[], UUID | None]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._last: list[tuple[float, UUID | None]] = []

    def __call__(self) -> UUID | None:
        now = time.monotonic()
        with self._lock:
            if self._last and now - self._last[0][0] < RESULT_STORAGE_TTL_S:
                return self._last[0][1]
        value = self._read()
        with self._lock:
            self._last[:] = [(now, value)]
        return value


def csrf_protection_off(api_url: str) -> bool:
    """Whether the Prefect server at ``api_url`` says its CSRF protection is off (Prefect's default).

    Prefect's client asks a server for a CSRF token (``GET /csrf-token``) before its first change,
    and learns from the 422 that the server needs none: one of the requests of every flow run, since
    each run has a client of its own. Anything but that answer (an error, a token, no server) is
    "on", which keeps Prefect's own behaviour."""
    import httpx

    try:
        response = httpx.get(
            f"{api_url.rstrip('/')}/csrf-token",
            params={"client": str(uuid4())},
            timeout=5,
            verify=prefect_tls_context(),
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 422 and "CSRF protection is disabled" in response.text


class PrefectRuns:
    """What every flow run of the daemon shares of Prefect, made once (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefect_settings: tuple[Profile, Settings] | None = None
        #: When the server's CSRF protection was last asked, and whether it was off.
        self._csrf: tuple[float, bool] | None = None

    def settings(self) -> SettingsContext:
        """Prefect's settings for the engine's flow runs: without the heartbeat thread, whose join
        costs a sync flow run ~1 s at exit (the engine and the API's reconciliation notice a lost
        job), and without the CSRF token request when the server has no CSRF protection (asked again
        every :data:`RESULT_STORAGE_TTL_S`, so a server restarted with it is followed). Built once
        per answer: ``temporary_settings`` would rebuild the settings for every run (~0.27 s)."""
        import prefect.context
        from prefect.settings import PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

        with self._lock:
            now = time.monotonic()
            if self._csrf is None or now - self._csrf[0] >= RESULT_STORAGE_TTL_S:
                base = prefect.context.get_settings_context().settings
                off = bool(base.api.url) and csrf_protection_off(str(base.api.url))
                if self._csrf is None or off != self._csrf[1]:
                    self._prefect_settings = None
                self._csrf = (now, off)
            if self._prefect_settings is None:
                _remember_result_storage()
                current = prefect.context.get_settings_context()
                csrf = current.settings.client.csrf_support_enabled and not self._csrf[1]
                settings = current.settings.copy_with_update(
                    updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: csrf}
                )
                self._prefect_settings = (current.profile, settings)
        profile, settings = self._prefect_settings
        return prefect.context.SettingsContext(profile=profile, settings=settings)

    def client(self) -> SyncClientContext:
        """A Prefect client for one job's flow run, made with the engine's one TLS context.

        Prefect's flow engine makes a client per flow run, and each loads a TLS context from the CA
        bundle: about a tenth of the engine's CPU per small job. This client (open in the thread's
        ``SyncClientContext``, which Prefect's flow and task engines use when one is open) shares a
        context made once. It is still one client per job, with fresh connections: a client kept
        between jobs met connections the server had closed while idle (its keep-alive is shorter
        than the client's) and backed off for minutes."""
        from prefect.context import SyncClientContext

        return SyncClientContext(httpx_settings={"verify": prefect_tls_context()})
