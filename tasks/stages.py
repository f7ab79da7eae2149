"""The pipeline's stages in flow order, each declared once in its own module, and the spec check that needs the
domain registries (so a bad spec is refused when it loads, before any compute)."""
from __future__ import annotations

from pathlib import Path

from infra.errors import SpecError
from infra.spec import (AblationSpec, config_diff, contrast_mechanisms, load_spec, model_problems, resolved_arms,
                        yaml_key_lines)
from tasks import base_model, data, heldout, resolve, rl, sft, sweep, twins
from tasks.common import Stage

STAGES: dict[str, Stage] = {s.name: s for s in (resolve.STAGE, data.STAGE, base_model.STAGE, twins.STAGE,
                                                   sft.STAGE, rl.STAGE, sweep.STAGE, heldout.STAGE)}

# Spec keys no stage's compute key covers, with what reads them instead. The flow: which stages run. The report
# (rebuilt from lineage at the end of every flow run, never cached): how results are summarised.
FLOW_KEYS = {"eval.sweep": "whether the checkpoint sweep stage runs",
             "seeds": "the per-arm stages run once per seed (each run's slice holds its own `seed`)",
             "executor.kind": "which executor runs the arms (the flow's preflight refuses one it cannot run)"}
REPORT_KEYS = {"eval.bootstrap_resamples": "paired bootstrap resamples of every CI",
               "eval.ece_bins": "bins of the expected calibration error",
               "eval.equivalence_margin": "the margin of the 'equivalent within ±margin' reading"}


def load_checked_spec(path: str | Path) -> AblationSpec:
    """infra.spec.load_spec, then the checks across sections and against the domain registries: every arm's model
    can hold what the arm generates (infra.spec.model_problems); every arm's `rl.reward` must be a registered reward
    signal; and every contrast's declared `mechanisms` must match what its arms' resolved configs differ in
    (infra.spec.contrast_mechanisms). Raises SpecError naming the file, line and key."""
    from rewards.signals import SIGNALS

    spec = load_spec(path)
    lines = yaml_key_lines(Path(path).read_text())
    problems = []
    arms = resolved_arms(spec)
    for arm, cfg in arms.items():
        problems += [f"{path}: arm {arm}: {p}" for p in model_problems(cfg)]
        if cfg.rl.reward not in SIGNALS:
            declared = ("arms", arm, "overrides") if "rl.reward" in spec.arms[arm].overrides else ("base", "rl",
                                                                                                    "reward")
            line = next((lines[declared[:n]] for n in range(len(declared), 0, -1) if declared[:n] in lines), None)
            problems.append(f"{path}{f':{line}' if line else ''}: arm {arm}: rl.reward '{cfg.rl.reward}' is not a "
                            f"registered reward signal (known: {', '.join(sorted(SIGNALS))})")
    for name, c in spec.contrasts.items():
        at = next((lines[k] for k in (("contrasts", name, "mechanisms"), ("contrasts", name)) if k in lines), None)
        problems += [f"{path}{f':{at}' if at else ''}: {p}" for p in
                     contrast_mechanisms(name, c, config_diff(arms[c.treatment], arms[c.control]))[1]]
    if problems:
        raise SpecError("invalid spec:\n  " + "\n  ".join(problems))
    return spec


def markdown_table() -> str:
    """The stage table of docs/architecture.md, generated from the declarations (a test keeps the doc equal)."""
    rows = ["| stage | runs | config keys (compute key) | input roles | output roles |", "|---|---|---|---|---|"]
    for s in STAGES.values():
        runs = (("per arm × seed" if "seed" in s.config_keys else "per arm") if s.per_arm else "shared") + (
            ", placed" if s.placed else "")
        rows.append(f"| {s.name} | {runs} | {', '.join(f'`{k}`' for k in s.config_keys)} | "
                    f"{', '.join(f'`{r}`' for r in s.inputs) or '—'} | {', '.join(f'`{r}`' for r in s.outputs)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
