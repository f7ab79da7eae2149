"""Infrastructure: spec loading, hashing, lineage (DuckDB), tracking (MLflow), artifact store, locks.

Nothing in here knows about Prefect; flows/ and tasks/ call these plain functions.
"""
