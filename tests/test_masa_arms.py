"""configs/masa.yaml's DAPO+MASA arm end to end on the tiny model: dynamic sampling chooses the groups, the meta
rollouts are generated for exactly those prompts, rewarded against their solutions and trained in the same
update, the expert buffer flushes, and overlong punishment applies; every count is recorded in the run facts."""
from __future__ import annotations

import pytest

from test_grpo import CoinGrader, _run, arm_init  # noqa: F401  (arm_init is a fixture used by name)


class ScriptedPredictions:
    """The real engine, except that meta-prediction prompts get one fixed, valid JSON prediction (pass_rate 4 of
    8, solution_length 6, notions carry); solutions are the tiny model's own."""

    TEXT = '<|meta|>plan<|/meta|>\n{"notions": ["carry"], "pass_rate": 4, "solution_length": 6}'

    def __init__(self, real):
        self.real, self.meta_calls = real, []

    def generate(self, prompts, n=1, max_new_tokens=128, **kw):
        from evals.engine import Generation

        if "Predict, do not solve" not in prompts[0]:
            return self.real.generate(prompts, n=n, max_new_tokens=max_new_tokens, **kw)
        self.meta_calls.append(prompts)
        tok = self.real.tokenizer
        ids = tuple(tok(self.TEXT, add_special_tokens=False)["input_ids"]) + (tok.eos_token_id,)
        return [[Generation(text=self.TEXT, token_ids=ids, truncated=False) for _ in range(n)] for _ in prompts]

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_dapo_masa_arm_end_to_end(arm_init, tmp_path, monkeypatch):  # noqa: F811
    import evals.engine
    import rewards.grader
    from infra.artifacts import read_parquet
    from infra.spec import load_spec, resolved_arms
    from pathlib import Path

    arm = resolved_arms(load_spec(Path(__file__).resolve().parent.parent / "configs" / "masa.yaml"))["dapo_masa"].rl
    assert arm.filter_groups.enable and arm.overlong_buffer.enable and arm.masa.enable and arm.masa.expert.enable
    real_grader, real_engine = rewards.grader.get_grader, evals.engine.HFEngine
    monkeypatch.setattr(rewards.grader, "get_grader", lambda spec: CoinGrader(real_grader(spec), wrong_odd_golds=True))
    engines = []
    monkeypatch.setattr(evals.engine, "HFEngine",
                        lambda *a, **k: engines.append(ScriptedPredictions(real_engine(*a, **k))) or engines[-1])
    # the arm's mechanisms at the tiny model's sizes: dynamic sampling, overlong buffer, meta rollouts, expert SFT
    out, _ = _run(arm_init, tmp_path, monkeypatch, steps=2, n=3, temperature=1.0, max_response_length=8,
                  filter_groups={"enable": True, "max_num_gen_batches": 6},
                  overlong_buffer={"enable": True, "len": 4},
                  masa={"enable": True, "m": 2, "max_meta_length": 32,
                        "expert": {"enable": True, "buffer_size": 2, "bc_updates": 2}})
    facts = out["facts"]
    ds, masa = facts["dynamic_sampling"], facts["masa"]
    # prompts with an odd-parity gold are all wrong (CoinGrader): dynamic sampling filters them, needs more rounds
    assert ds["enable"] is True and ds["filtered_all_wrong"] > 0 and ds["rounds"] > 2 and ds["train_groups"] == 4
    for step in (1, 2):
        trained = {r["prompt_id"] for r in read_parquet(tmp_path / "run" / "rollouts" / f"step-{step:07d}.parquet")}
        meta = read_parquet(tmp_path / "run" / "meta_rollouts" / f"step-{step:07d}.parquet")
        # the meta rollouts are for the prompts dynamic sampling kept (mixed groups), m each, all trained
        assert trained and {r["prompt_id"] for r in meta} == trained and len(meta) == 2 * len(trained)
        assert all(r["valid"] and r["trained"] for r in meta)
        # pass_rate 4 of 8 against a mixed group of 3: r_difficulty = 0.01^|0.5 − k/3| with k in {1, 2}
        assert all(r["r_difficulty"] == pytest.approx(0.01 ** (1 / 6)) for r in meta)
    assert masa["meta_rollouts"] == masa["meta_trained"] > 0 and masa["malformed"] == 0
    assert masa["expert_items"] == masa["meta_rollouts"] // 2  # one per prompt (the best of its m)
    assert masa["bc_updates"] >= 2 and len(masa["bc_loss_per_flush"]) >= 1
    assert all(loss > 0 for loss in masa["bc_loss_per_flush"])
    assert masa["gated_prompts"] == 0 and masa["decision_prompts"] == masa["meta_rollouts"] // 2  # shadow only
    assert facts["overlong_buffer"]["enable"] is True and facts["overlong_buffer"]["penalised"] > 0  # 8 > 8 − 4
    # meta rollouts were generated for the kept prompts only, never for the filtered ones
    assert sum(len(calls) for e in engines for calls in e.meta_calls) == masa["meta_rollouts"] // 2 == 4
    print(f"dapo_masa facts: dynamic_sampling {ds}, overlong {facts['overlong_buffer']}, masa {masa}")
