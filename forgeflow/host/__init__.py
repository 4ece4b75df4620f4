"""The engine daemon: one long-lived process per host that runs every job of the host on warm,
shared, sandboxed worker pools, with admission per device and reuse of what earlier stages computed.

It sits above :mod:`forgeflow.jobs` (it runs their flow) and below the API and the CLI, which talk
to it over its socket with :class:`forgeflow.engine.client.EngineClient` (never by importing this
package, but for ``forgeflow engine run``, which runs :func:`.server.main` in the foreground).

* :mod:`.core` — :class:`~forgeflow.host.core.Engine`: pools, job queue, job threads;
* :mod:`.job` — one job and the sinks its events go to;
* :mod:`.prefect_runs` — what its flow runs share of Prefect;
* :mod:`.server` — its control endpoint on a Unix socket (``python -m forgeflow.host``), speaking
  the models of :mod:`forgeflow.engine.control`.

Knows nothing of FastAPI: the API talks to it over the socket, and it sends events to the API over HTTP.
"""
