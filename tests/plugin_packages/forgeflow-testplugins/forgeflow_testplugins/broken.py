"""A plugin whose module cannot be imported: it must show as UNAVAILABLE, never crash discovery."""

import forgeflow_missing_dependency_for_tests  # noqa: F401  (does not exist on purpose)

plugin = None
