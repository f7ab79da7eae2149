"""The matched-ness audit: the ledger of checks over lineage (ledger, checks) and the report built on it."""
