"""Prefect flow runs read and set from outside them (the API's launcher, the engine): a cheap
synchronous client, and forcing a run into Crashed or Cancelled when nobody else will."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger(__name__)


@cache
def prefect_tls_context() -> ssl.SSLContext:
    """The process's TLS context for the Prefect API, as Prefect's client would make it from its
    settings (``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``, ``PREFECT_API_SSL_CERT_FILE``, else certifi),
    made once: loading the CA bundle is tens of ms of CPU, seconds on a busy host."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


@contextmanager
def prefect_client() -> Iterator[SyncPrefectClient]:
    """A synchronous Prefect client for ``PREFECT_API_URL`` as it is now (the service may set it
    after Prefect froze its settings at import).

    Made directly, with the process's one TLS context: ``get_client`` under ``temporary_settings``
    rebuilds Prefect's settings and loads the CA bundle, ~0.1 s of CPU per client, which a launcher
    reading each job's flow run every second paid per read (0.5 ms now). Still one client per use:
    one kept between uses met connections the server had closed while idle."""
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    url = os.environ.get("PREFECT_API_URL")
    if not url:  # Prefect's own choice (its settings' URL, or an ephemeral server)
        with get_client(sync_client=True) as client:
            yield client
        return
    with SyncPrefectClient(
        url,
        auth_string=PREFECT_API_AUTH_STRING.value(),
        api_key=PREFECT_API_KEY.value(),
        httpx_settings={"verify": prefect_tls_context()},
    ) as client:
        yield client


def mark_flow_run(flow_run_id: str, status: str, message: str) -> None:
    """Force the Prefect flow run into Crashed or Cancelled (best effort: Prefect may be down)."""
    try:
        from prefect.client.schemas.objects import State
        from prefect.states import Cancelled, Crashed

        state: State[None] = Crashed(message=message) if status == "crashed" else Cancelled(message=message)
        with prefect_client() as client:
            client.set_flow_run_state(flow_run_id, state, force=True)
    except Exception as exc:  # the job's terminal message matters more than Prefect's bookkeeping
        log.warning("could not mark flow run %s %s: %s", flow_run_id, status, exc)
