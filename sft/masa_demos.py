"""MASA meta-prediction demonstrations in the SFT data (`sft.meta_predictions`).

MASA (arXiv 2510.03259) prompts the policy with a meta-prediction template (rewards.masa.meta_prompt) and parses a
JSON object from its answer. A hub model follows the instruction; the 1 M-parameter toy model follows nothing it
was not shown, so without demonstrations every prediction is malformed and MASA is inert. With
`sft.meta_predictions: s`, a share s of the SFT rows whose problem a world can analyse gets a second row right
after it: the template for the same problem, answered by the world (worlds.arith.meta_prediction_demo: its own
notions, the length in tokens of the solution the row teaches, and its declared pass-rate proxy).

The demonstrations are an SFT-data mechanism of their own (infra.spec mechanism `masa_prediction_sft`): an arm
pair that differs in it must declare it; configs/masa.yaml sets it for every arm, so the GRPO control starts from
the very same SFT checkpoint as the MASA arms.
"""
from __future__ import annotations

import random
from typing import Any

from infra.errors import DataError
from rewards.masa import PASS_MAX, meta_prompt


def with_meta_predictions(rows: list[dict[str, Any]], share: float, seed: int, tokenizer: Any
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows with the demonstration rows inserted, facts). The rows demonstrated are a seeded sample of round(share ×
    candidates) of the candidates (arith rows whose prompt worlds.arith.problem_of solves; check drills and other
    worlds' rows are none); each demonstration row follows its row, with id '<id>:meta-prediction', kind
    'meta_prediction', no wrong prefix and the row's other metadata. solution_length = the tokens of the row's
    assistant response plus its end-of-turn token (as rollouts count n_tokens).
    Facts: meta_prediction_rows, meta_prediction_candidates, meta_prediction_pass_rates (count per value).
    Raises DataError when share > 0 and no row can be demonstrated, or the share rounds to no row (the key would not
    act)."""
    from worlds import arith

    empty = {"meta_prediction_rows": 0, "meta_prediction_candidates": 0, "meta_prediction_pass_rates": {}}
    if share == 0:
        return rows, empty
    problems = {}
    for i, row in enumerate(rows):
        if row.get("source") == arith.SOURCE and row.get("domain") != arith.CHECK_DOMAIN:
            problem = arith.problem_of(row["messages"][-2]["content"], row.get("domain") or "", row.get("level") or 0)
            if problem is not None:
                problems[i] = problem
    if not problems:
        raise DataError(f"sft.meta_predictions {share}: none of the {len(rows)} SFT rows is a problem a world can "
                        f"write a meta-prediction demonstration for (arith rows only); set it to 0")
    k = round(share * len(problems))
    if k == 0:
        n = len(problems)
        raise DataError(f"sft.meta_predictions {share}: round({share} × {n} demonstrable SFT rows) = 0 "
                        f"demonstrations (the key would not act); set it to at least 1/{n} = {1 / n:.3g}, or 0")
    chosen = sorted(random.Random(f"masa-demos:{seed}").sample(sorted(problems), k))
    lengths = tokenizer([rows[i]["messages"][-1]["content"] for i in chosen], add_special_tokens=False)["input_ids"]
    demos: dict[int, dict[str, Any]] = {}
    rates: dict[str, int] = {}
    for i, ids in zip(chosen, lengths):
        row, problem = rows[i], problems[i]
        answer = arith.meta_prediction_demo(problem, len(ids) + 1, PASS_MAX)
        rate = str(arith.pass_rate_proxy(problem, PASS_MAX))
        rates[rate] = rates.get(rate, 0) + 1
        demos[i] = {**row, "id": f"{row['id']}:meta-prediction", "wrong_prefix": None, "kind": "meta_prediction",
                    "messages": [{"role": "user", "content": meta_prompt(problem.prompt, list(arith.NOTIONS))},
                                 {"role": "assistant", "content": answer}]}
    out = [r for i, row in enumerate(rows) for r in ((row, demos[i]) if i in demos else (row,))]
    return out, {"meta_prediction_rows": len(demos), "meta_prediction_candidates": len(problems),
                 "meta_prediction_pass_rates": dict(sorted(rates.items(), key=lambda kv: int(kv[0])))}
