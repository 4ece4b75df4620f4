"""Jobs on Prefect: the pipeline flow (one task per stage), its executor, the batch flow, the job
supervisor (checkpoint, crash reconciliation) and the local Prefect server."""
