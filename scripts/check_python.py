"""Fail early, with one line, on a Python the pinned environment does not support."""
import sys

if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"twinarm needs Python 3.10–3.12 (the pinned torch/verl/ray wheels); this is {sys.version.split()[0]} "
             f"at {sys.executable}. Run `make PYTHON=python3.11 ...`.")
