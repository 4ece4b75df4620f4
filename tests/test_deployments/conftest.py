"""The two-host fleet of test_scale_out and test_batch_fleet: host A (Prefect server, API, engine and a
worker, on PostgreSQL) is started once for both; each test joins a host B of its own and kills it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import environment, free_port
from tests.test_api.conftest import PostgresCluster, postgres_cluster  # noqa: F401  (the fixture)

#: What a fleet host's processes inherit: host A its databases and home; host B (which must know only
#: the two URLs and its token) its home alone.
FLEET_ENV = ("PREFECT_API_DATABASE_CONNECTION_URL", "FORGEFLOW_DATABASE_URL", "FORGEFLOW_HOME")


@pytest.fixture(scope="session")
def host_a(
    postgres_cluster: PostgresCluster,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Path, str]]:
    """Host A of the fleet, for the session (the tests' group keeps them on one xdist worker): its
    stack, its home, and the ingest token a joining host needs."""
    from forgeflow.cli import stack
    from forgeflow.settings import Settings

    prefect_db = postgres_cluster.new_database().replace("postgresql+psycopg://", "postgresql+asyncpg://")
    home_a = tmp_path_factory.mktemp("fleet") / "host-a"
    try:
        server_env = {
            "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db,
            "FORGEFLOW_DATABASE_URL": postgres_cluster.new_database(),
            "FORGEFLOW_HOME": str(home_a),
        }
        with environment(server_env):
            started = stack.up(
                Settings(home=home_a), prefect_port=free_port(), api_port=free_port(), workers=1, jobs_per_worker=2
            )
        token = (stack.stack_dir(Settings(home=home_a)) / "ingest-token").read_text().strip()
        yield started, home_a, token
    finally:
        stack.down(Settings(home=home_a))


@pytest.fixture
def two_hosts(host_a: tuple[Any, Path, str], tmp_path: Path) -> Iterator[tuple[Any, Path, Path]]:
    """Host A and a new host B (``forgeflow up --join``, its own FORGEFLOW_HOME, no shared folder)."""
    from forgeflow.cli import stack
    from forgeflow.settings import Settings

    started, home_a, token = host_a
    home_b = tmp_path / "host-b"
    try:
        with environment({"FORGEFLOW_HOME": str(home_b)}, unset=FLEET_ENV):
            stack.join(
                Settings(home=home_b),
                prefect_api_url=started.prefect_api_url,
                api_url=started.api_url,
                ingest_token=token,
                workers=1,
                jobs_per_worker=2,
            )
        yield started, home_a, home_b
    finally:
        stack.down(Settings(home=home_b))
