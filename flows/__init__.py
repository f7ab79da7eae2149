"""Prefect flows (thin) and the `twinarm` command line."""
