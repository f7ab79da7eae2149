"""Mutation check of the SIGKILL-resume test: on a copy of the repository, break one part of the checkpoint restore
(infra/checkpoints.py) and run tests/test_e2e.py's SIGKILL-mid-RL test, which must then fail. A mutation that
passes ("survived") means the test cannot see that kind of resume bug. The unmutated copy runs first and must pass
(otherwise a "caught" would mean nothing).

    python scripts/mutation_resume.py [optimizer|weights|step|rng ...]   # exit 0 when the unmutated test passes
                                                                         # and every mutation is caught

The test can catch these only because the CI-sized spec moves the weights at every RL step of both arms
(tests/conftest.py: non-zero GRPO advantages at some steps from world.levels [1] and a 200-step base model, and the
rl.entropy_coeff bonus at every step; tests/test_e2e.py checks train/adv_nonzero_rate and actor/param_norm_change).

`rng` is not in the default set: it is an equivalent mutant for this pipeline. No stage draws from torch's global
generator — rollouts, val and regenerations sample under `worlds.model.seeded` (seeded from (seed, step), the
caller's state restored), SFT shuffles with its own `torch.Generator`, and the toy model has no dropout — so the
restored global RNG state is never read and no output can show its loss. Run it by name to see it survive.
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
CHECKPOINTS = "infra/checkpoints.py"
# name -> (the line of infra/checkpoints.py restoring it, what replaces it)
MUTATIONS = {
    "optimizer": ('    optimizer.load_state_dict(extra["optimizer"])\n', "    pass  # mutation: optimizer state lost\n"),
    "weights": ("    missing, unexpected = model.load_state_dict(weights, strict=False)\n",
                "    missing, unexpected = [], []  # mutation: weights not restored\n"),
    "step": ('    return json.loads((Path(path) / "state.json").read_text())\n',
             '    return {**json.loads((Path(path) / "state.json").read_text()), "step": 0}  # mutation: step lost\n'),
    "rng": ('    torch.random.set_rng_state(extra["torch_rng"])\n', "    pass  # mutation: RNG state lost\n"),
}
EQUIVALENT = {"rng"}  # see the module docstring; run only when named


def mutated_copy(name: str | None, root: Path) -> Path:
    """A copy of the repository with mutation `name` applied (None: unmutated)."""
    copy = root / f"repo-{name or 'unmutated'}"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", ".twinarm", "__pycache__"))
    if name is not None:
        target = copy / CHECKPOINTS
        original, replacement = MUTATIONS[name]
        text = target.read_text()
        if text.count(original) != 1:
            sys.exit(f"{CHECKPOINTS}: expected the line {original.strip()!r} once; update MUTATIONS")
        target.write_text(text.replace(original, replacement))
    return copy


def resume_test(name: str | None, root: Path) -> int:
    """Run the SIGKILL-resume test on the copy with mutation `name` (None: unmutated); return pytest's exit code
    (0 passed, 1 failed) after printing the outcome and the last lines of pytest's report."""
    copy = mutated_copy(name, root)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    env.pop("TWINARM_HOME", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST], cwd=copy,
                         env=env, capture_output=True, text=True)
    failed = res.returncode == 1 and " failed" in res.stdout
    verdict = ("passes" if res.returncode == 0 else "FAILS") if name is None else \
        "caught" if failed else "SURVIVED"
    lines = res.stdout.strip().splitlines()
    shown = [ln for ln in lines if ln.startswith("E ")][:4] + lines[-1:]
    print(f"{name or 'unmutated'}: {verdict} (pytest exit {res.returncode}, {time.monotonic() - t0:.0f} s)\n  "
          + "\n  ".join(shown), flush=True)
    return res.returncode if res.returncode != 1 or failed else 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutations", nargs="*", default=[m for m in MUTATIONS if m not in EQUIVALENT],
                        help=f"any of {', '.join(MUTATIONS)} (default: all but {', '.join(sorted(EQUIVALENT))})")
    args = parser.parse_args()
    if unknown := [m for m in args.mutations if m not in MUTATIONS]:
        parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(MUTATIONS)}")
    with tempfile.TemporaryDirectory(prefix="mutation-resume-") as tmp:
        if resume_test(None, Path(tmp)) != 0:
            sys.exit("the unmutated resume test does not pass: a failing mutated run would show nothing")
        caught = [resume_test(name, Path(tmp)) == 1 for name in args.mutations]
    sys.exit(0 if all(caught) else 1)


if __name__ == "__main__":
    main()
