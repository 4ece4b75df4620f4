"""The engine's runtime, below :mod:`forgeflow.jobs`: how a stage call reaches a plugin, and how
a process reaches this host's engine daemon (:mod:`forgeflow.host`).

* :mod:`.runners` — the sandboxed runners (inline, process, docker) and their worker;
* :mod:`.admission` — device slots; :mod:`.batching` — concurrent calls joined into one;
* :mod:`.control` — the daemon's socket protocol, one pydantic model per body (both sides use it);
* :mod:`.client` — :class:`~forgeflow.engine.client.EngineClient`, the
  :class:`~forgeflow.engine.client.EngineRunner` for flow runs in other processes, and
  :func:`~forgeflow.engine.client.ensure_engine`, which starts the daemon (``python -m forgeflow.host``);
* :mod:`.locks` — the start and lifetime locks client and daemon share.

Plugin discovery and lifecycle live lower, in :mod:`forgeflow.plugins.registry` and
:mod:`forgeflow.plugins.lifecycle`.
"""
