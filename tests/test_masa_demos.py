"""MASA meta-prediction demonstrations in the SFT data (sft/masa_demos.py, worlds.arith's demonstration writer,
the `sft.meta_predictions` key): values worked out by hand, the rows the SFT stage gets, the spec's refusals and
mechanism, and that a tiny model SFT'd on the demonstrations writes predictions rewards.masa parses."""
from __future__ import annotations

import json

import pytest

from infra.errors import DataError
from infra.spec import SFTSpec, mechanism_of
from rewards.masa import PASS_MAX, MetaPrediction, meta_prompt, parse_prediction
from sft.masa_demos import with_meta_predictions
from worlds import arith


def _problem(expr: str, prompt: str | None = None) -> arith.Problem:
    return arith.Problem("paren", 1, prompt or f"Compute {expr}.", expr, tuple(arith.solve(arith.parse(expr))))


@pytest.mark.parametrize("expr,risks,rate", [
    # 2-5=-3 (signs: 1), 3*-3=-9 (1), 7--9=16 (1): 8 × 0.95³ = 6.86 → 7
    ("7-3*(2-5)", [1, 1, 1], 7),
    # 2+3=5, 5*4=20: plain facts only (0, 0; 20 is the value of a single-digit product): 8 × 0.99² = 7.84 → 8
    ("(2+3)*4", [0, 0], 8),
    # 47+38=85 (two two-digit numbers: 3), 85-29=56 (3), 56+17=73 (3): 8 × 0.7³ = 2.74 → 3
    ("47+38-29+17", [3, 3, 3], 3),
])
def test_pass_rate_proxy_by_step_risk(expr, risks, rate):
    problem = _problem(expr)
    assert [arith.risk(s) for s in problem.steps] == risks
    assert arith.pass_rate_proxy(problem, PASS_MAX) == rate


def test_demo_of_a_known_problem_parses_to_the_worlds_own_values():
    problem = _problem("7-3*(2-5)")
    text = arith.meta_prediction_demo(problem, 31, PASS_MAX)
    # solution notions {subtraction, multiplication, negative, two-digit, carry, brackets} minus those the
    # problem shows {subtraction, multiplication, brackets}
    assert text == ('<|meta|>3 steps, risks 1 1 1<|/meta|>\n'
                    '{"notions": ["carry", "negative", "two-digit"], "pass_rate": 7, "solution_length": 31}')
    assert parse_prediction(text) == MetaPrediction(("carry", "negative", "two-digit"), 7, 31)


def test_problem_of_reads_arith_prompts_only():
    assert arith.problem_of("Compute 7-3*(2-5).").expr == "7-3*(2-5)"
    assert arith.problem_of("Is 44-7=36?") is None  # a check drill asks no problem
    assert arith.problem_of("What is the capital of France?") is None
    assert arith.problem_of("Compute 9/2.") is None  # not exact: no worked solution


def _rows():
    from infra.spec import ArithWorldSpec

    world = arith.generate_world(ArithWorldSpec(n_base=10, n_sft1=30, n_sft2=10, n_rl=1, n_val_per_domain=1,
                                                n_heldout=1))
    drill = {**world["sft1"][0], "id": "drill-0", "domain": arith.CHECK_DOMAIN,
             "messages": [{"role": "user", "content": "Is 44-7=36?"},
                          {"role": "assistant", "content": "check 44-7: no\n\\boxed{37}"}]}
    other = {**world["sft1"][1], "id": "other-0", "source": "gsm8k"}
    return world["sft1"] + world["sft2"] + [drill, other]


class CharTokenizer:
    """One token per character: lengths are len(text)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(range(len(t))) for t in texts]}


def test_with_meta_predictions_inserts_seeded_demonstrations_after_their_rows():
    rows = _rows()
    out, facts = with_meta_predictions(rows, 0.5, seed=3, tokenizer=CharTokenizer())
    assert facts["meta_prediction_candidates"] == 40  # the drill and the other world's row are no candidates
    assert facts["meta_prediction_rows"] == 20 == len(out) - len(rows)
    assert sum(facts["meta_prediction_pass_rates"].values()) == 20
    assert [r for r in out if r["kind"] != "meta_prediction"] == rows  # originals kept, in order
    for i, row in enumerate(out):
        if row["kind"] != "meta_prediction":
            continue
        src = out[i - 1]
        assert row["id"] == f"{src['id']}:meta-prediction" and row["wrong_prefix"] is None
        problem = arith.problem_of(src["messages"][0]["content"])
        assert row["messages"][0]["content"] == meta_prompt(problem.prompt, list(arith.NOTIONS))
        pred = parse_prediction(row["messages"][1]["content"])
        assert pred.solution_length == len(src["messages"][1]["content"]) + 1  # + the end-of-turn token
        assert pred.pass_rate == arith.pass_rate_proxy(problem, PASS_MAX)
        assert set(pred.notions) == arith.notions(problem) - arith.problem_notions(problem.expr)
    again, _ = with_meta_predictions(rows, 0.5, seed=3, tokenizer=CharTokenizer())
    other, _ = with_meta_predictions(rows, 0.5, seed=4, tokenizer=CharTokenizer())
    ids = [[r["id"] for r in x] for x in (out, again, other)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_with_meta_predictions_off_and_refused():
    rows = _rows()
    out, facts = with_meta_predictions(rows, 0.0, seed=0, tokenizer=CharTokenizer())
    assert out is rows and facts["meta_prediction_rows"] == 0
    foreign = [r for r in rows if r["source"] != arith.SOURCE]
    with pytest.raises(DataError, match=r"sft.meta_predictions 0.5: none of the 1 SFT rows"):
        with_meta_predictions(foreign, 0.5, seed=0, tokenizer=CharTokenizer())


def test_a_share_that_rounds_to_no_demonstration_is_refused():
    # 40 demonstrable rows: 0.01 × 40 = 0.4 rounds to 0 (was: no demonstration, facts meta_prediction_rows 0);
    # 0.0125 × 40 = 0.5 rounds to 0 too (half to even), 0.02 × 40 = 0.8 to one
    rows = _rows()
    for share in (0.01, 0.0125):
        with pytest.raises(DataError, match=rf"sft.meta_predictions {share}: round\({share} × 40 demonstrable SFT "
                                            r"rows\) = 0 demonstrations .*set it to at least 1/40 = 0.025, or 0"):
            with_meta_predictions(rows, share, seed=0, tokenizer=CharTokenizer())
    out, facts = with_meta_predictions(rows, 0.02, seed=0, tokenizer=CharTokenizer())
    assert facts["meta_prediction_rows"] == 1 and len(out) == len(rows) + 1


def test_spec_key_refusal_and_mechanism():
    assert SFTSpec(meta_predictions=0.3).meta_predictions == 0.3
    with pytest.raises(ValueError, match="meta_predictions demonstrations think in a meta block"):
        SFTSpec(strip_meta=True, meta_predictions=0.3)
    with pytest.raises(ValueError):
        SFTSpec(meta_predictions=1.5)
    assert mechanism_of("sft.meta_predictions") == "masa_prediction_sft"


def test_masa_spec_gives_every_arm_the_same_demonstrations():
    """configs/masa.yaml sets the demonstrations in base: the GRPO control's SFT is the MASA arms' SFT."""
    from pathlib import Path

    from infra.spec import load_spec, resolved_arms

    arms = resolved_arms(load_spec(Path(__file__).resolve().parent.parent / "configs" / "masa.yaml"))
    assert {a: cfg.sft.meta_predictions for a, cfg in arms.items()} == dict.fromkeys(arms, 0.3)
    assert len({json.dumps(cfg.sft.model_dump(), sort_keys=True) for cfg in arms.values()}) == 1


def test_a_tiny_model_sft_on_the_demonstrations_writes_parseable_predictions(tmp_path):
    """The demonstrations are learnable as written (template, meta block, JSON): a fresh 2-layer toy model trained
    200 steps on them alone answers the template with predictions rewards.masa.parse_prediction accepts
    (0/16 at 120 steps, 15/16 at 150: learning the JSON keys is a step change, hence the margin; before
    demonstrations existed, 128/128 predictions of the demo-sized model were malformed)."""
    from infra.spec import ArithWorldSpec, ComputeSpec, ToyModelSpec
    from evals.engine import HFEngine, render_prompt
    from sft.train import TrainConfig, train_lm
    from worlds.model import set_threads, toy_model
    from worlds.tokenizer import train_tokenizer

    set_threads(1)
    world = arith.generate_world(ArithWorldSpec(n_base=200, n_sft1=120, n_sft2=60, n_rl=8, n_val_per_domain=1,
                                                n_heldout=9))
    tok = train_tokenizer(arith.world_texts(world), vocab_size=400)
    model = toy_model(ToyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                   max_position=512), tok, seed=0)
    rows, _ = with_meta_predictions(world["sft1"] + world["sft2"], 1.0, 0, tok)
    demos = [r for r in rows if r["kind"] == "meta_prediction"]
    train_lm(model, tok, demos, TrainConfig(lr=3e-3, batch_size=16, max_steps=200, warmup_steps=5, max_length=512),
             tmp_path, 0, ComputeSpec(device="cpu", precision="fp32"))
    engine = HFEngine(model, tok, "cpu", "fp32")
    prompts = [render_prompt(tok, meta_prompt(r["prompt"], list(arith.NOTIONS))) for r in world["rl"][:4]]
    preds = [parse_prediction(g.text) for gs in engine.generate(prompts, n=4, temperature=0.7, max_new_tokens=128,
                                                                 seed=1) for g in gs]
    valid = [p for p in preds if p is not None]
    print(f"well-formed {len(valid)}/{len(preds)}")
    assert len(valid) >= 4  # a quarter at least: well-formed share > 0 with margin
