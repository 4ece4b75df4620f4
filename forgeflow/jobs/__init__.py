"""Jobs on Prefect: the pipeline flow (one task per stage), its executor, the batch flow, where a
job runs (placement), the launcher that starts and watches jobs (against a store protocol),
checkpoints, crash reconciliation and the local Prefect server."""
