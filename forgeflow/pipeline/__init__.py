"""The pipeline domain, free of Prefect and of any transport: what a user writes (definition),
whether it can run (validation, compat), and how a run ends (outcome)."""
