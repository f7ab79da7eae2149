"""Prefect tasks, one module per stage. Each wraps plain functions from the domain packages and returns a
StageOutput; the flow records it (lineage + MLflow). No science here."""
