"""What the engine's flow runs share of Prefect: the CSRF token request is left out only when the
server says it needs none."""

from __future__ import annotations

from forgeflow.host.prefect_runs import PrefectRuns, csrf_protection_off
from forgeflow.jobs.prefect_server import free_port


def test_the_runs_of_a_server_without_csrf_protection_skip_the_token_request(prefect_api_url):
    from prefect.settings import PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    assert csrf_protection_off(prefect_api_url)  # Prefect's default server
    assert not csrf_protection_off(f"http://127.0.0.1:{free_port()}/api")  # no answer: Prefect's own way
    runs = PrefectRuns()
    with runs.settings():
        assert PREFECT_CLIENT_CSRF_SUPPORT_ENABLED.value() is False
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    assert PREFECT_CLIENT_CSRF_SUPPORT_ENABLED.value() is True  # only the runs' settings change
