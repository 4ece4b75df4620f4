"""The engine: one long-lived process per host that runs every job of the host on warm, shared,
sandboxed worker pools, with admission per device and reuse of what earlier stages computed.

* :mod:`.core` — :class:`~forgeflow.engine.core.Engine`: pools, job queue, job threads;
* :mod:`.admission` — device slots;
* :mod:`.server` — its control endpoint on a Unix socket (``python -m forgeflow.engine``);
* :mod:`.client` — :class:`~forgeflow.engine.client.EngineClient`, the
  :class:`~forgeflow.engine.client.EngineRunner` for flow runs in other processes, and
  :func:`~forgeflow.engine.client.ensure_engine`.

Knows nothing of FastAPI: the API talks to it over the socket, and it sends events to the API over HTTP.
"""
