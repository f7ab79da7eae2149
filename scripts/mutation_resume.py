"""Mutation check of the SIGKILL-resume test: on a copy of the repository, break one part of the checkpoint restore
(infra/checkpoints.py) and run tests/test_e2e.py's SIGKILL-mid-RL test, which must then fail. A mutation that
passes ("survived") means the test cannot see that kind of resume bug.

    python scripts/mutation_resume.py [optimizer|rng ...]     # exit 0 when every mutation is caught, 1 otherwise
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/test_e2e.py::test_sigkill_mid_rl_resumes_to_the_uninterrupted_result"
# name -> (the line of infra/checkpoints.py restoring it, what replaces it)
MUTATIONS = {
    "optimizer": ('    optimizer.load_state_dict(extra["optimizer"])\n', "    pass  # mutation: optimizer state lost\n"),
    "rng": ('    torch.random.set_rng_state(extra["torch_rng"])\n', "    pass  # mutation: RNG state lost\n"),
}


def mutated_copy(name: str, root: Path) -> Path:
    copy = root / f"repo-{name}"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", ".twinarm", "__pycache__"))
    target = copy / "infra" / "checkpoints.py"
    original, replacement = MUTATIONS[name]
    text = target.read_text()
    if text.count(original) != 1:
        sys.exit(f"infra/checkpoints.py: expected the line {original.strip()!r} once; update MUTATIONS")
    target.write_text(text.replace(original, replacement))
    return copy


def run(name: str, root: Path) -> bool:
    """True when the resume test fails on the mutated copy (the mutation is caught)."""
    copy = mutated_copy(name, root)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    env.pop("TWINARM_HOME", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST], cwd=copy,
                         env=env, capture_output=True, text=True)
    caught = res.returncode == 1 and " failed" in res.stdout
    tail = "\n".join(res.stdout.strip().splitlines()[-3:])
    print(f"{name}: {'caught' if caught else 'SURVIVED'} (pytest exit {res.returncode}, "
          f"{time.monotonic() - t0:.0f} s)\n  {tail}", flush=True)
    return caught


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutations", nargs="*", default=list(MUTATIONS), help=f"any of {', '.join(MUTATIONS)}")
    args = parser.parse_args()
    if unknown := [m for m in args.mutations if m not in MUTATIONS]:
        parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(MUTATIONS)}")
    with tempfile.TemporaryDirectory(prefix="mutation-resume-") as tmp:
        results = [run(name, Path(tmp)) for name in args.mutations]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
