"""MASA for the local GRPO executor: meta-prediction rollouts, expert SFT, predictive gating and early cutoff
(Meta-Awareness via Self-Alignment, arXiv 2510.03259; the authors' code: github.com/akatigre/MASA-RL,
masa_train/masa_ray_trainer.py and verl/workers/reward_manager/masa_naive.py). docs/method-cards.md has the card.

One step with rl.masa.enable (rl/grpo.py calls `MASARunner`):
1. every prompt of the step gets `m` meta-prediction rollouts of `meta_prompt` (the problem + an instruction to
   predict, after a meta block, a JSON object {notions, pass_rate 0..8, solution_length in tokens});
2. after step `efficient.start_step`, the predictions decide before solving: a gated prompt
   (rewards.masa.gate) gets no solution rollouts, an un-gated one is solved with max_new_tokens =
   rewards.masa.cutoff_length (the early cutoff is a generation limit, not a truncation after the fact);
3. each meta rollout is rewarded by rewards.masa.meta_reward against the SAME prompt's solution rollouts (as the
   pipeline graded them); a malformed prediction scores 0 and is counted; the rewards are centred (and with
   rl.adv_norm_std scaled) within the prompt's meta group by rewards.heads.centre_heads, scaled by
   meta_weight, and put on every response token; these rows join the solution rows in the same PPO update of the
   one policy. A gated prompt's meta rollouts have no truth to be scored against and are not trained on;
4. expert SFT: per prompt the best-rewarded valid prediction, its JSON replaced by the true statistics
   (rewards.masa.substitute_prediction), enters a buffer; once the buffer holds expert.buffer_size items,
   expert.bc_updates optimiser steps of beta · token-mean NLL on them, and they leave the buffer.

Measuring the efficiency decisions (gating vs the truly zero-variance prompts, cutoff vs the truly incorrect
rollouts): the decisions are evaluated wherever the truth is known, i.e. on solution rollouts sampled at full
length: every prompt of a step before the efficiency starts (shadow decisions: nothing is skipped), and after
it the `efficient.audit_prompts` first prompts of each step, sampled again in full (not trained on, time
counted apart). A gated prompt's truth is otherwise unknown, so un-gated prompts alone cannot give precision.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from infra.spec import MASAEfficientSpec, RLSpec
from rewards.masa import PASS_MAX, MetaPrediction, cutoff_length, gate, meta_prompt, meta_reward, normalise, \
    parse_prediction, substitute_prediction

if TYPE_CHECKING:
    from rewards.pipeline import Sample

AUDIT_ROUND = -1  # the audit rollouts' seed round: distinct from every training round (0, 1, …)


def notion_vocabulary(row: dict[str, Any]) -> list[str] | None:
    """The notion names the row's world defines (arith: worlds.arith.NOTIONS), or None (free-form notions)."""
    from worlds import arith

    return list(arith.NOTIONS) if row.get("source") == arith.SOURCE else None


def notion_views(row: dict[str, Any], solutions: Sequence[str]) -> tuple[str, list[str]]:
    """(problem text, solution texts) as rewards.masa.r_notion searches them. A world with notions (arith) gives
    the notion names its problem shows and each solution shows (worlds.arith.problem_notions /
    solution_notions), so 'carry' is found in a solution that carries; otherwise the raw texts (the paper)."""
    from worlds import arith

    if row.get("source") == arith.SOURCE and (expr := arith.expr_of(row["prompt"])) is not None:
        return (arith.notion_text(arith.problem_notions(expr)),
                [arith.notion_text(arith.solution_notions(s)) for s in solutions])
    return row["prompt"], list(solutions)


@dataclass(frozen=True)
class Plan:
    """MASA-efficient's decisions for a step's prompts: gated (no solution rollouts), the max new tokens of
    each prompt's solution rollouts (None = rl.max_response_length) and the hint added to its prompt (or None)."""

    gated: list[bool]
    cutoffs: list[int | None]
    hints: list[str | None]


def notion_hint(preds: Sequence[MetaPrediction | None]) -> str | None:
    """The notion hint for a prompt: the notions (normalised) that at least half of the valid predictions name,
    in order of first mention, as a sentence to append to the problem; None when there is none."""
    valid = [p for p in preds if p is not None]
    counts = Counter(n for p in valid for n in dict.fromkeys(normalise(x) for x in p.notions) if n)
    keep = [n for n, c in counts.items() if 2 * c >= len(valid)]
    return f"\n\nHint: a solution may use {', '.join(keep)}." if keep else None


def plan(preds: Sequence[Sequence[MetaPrediction | None]], efficient: MASAEfficientSpec, step: int,
         max_response_length: int) -> Plan:
    """Gate, cutoff and hint per prompt from its M predictions; none of them on steps ≤ start_step or with its
    switch off. Cutoffs never exceed max_response_length (tokens)."""
    active = step > efficient.start_step
    return Plan([active and efficient.gate and gate(p, efficient.gate_std) for p in preds],
                [cutoff_length(p, efficient.cutoff_factor, max_response_length) if active and efficient.cutoff
                 else None for p in preds],
                [notion_hint(p) if active and efficient.hints else None for p in preds])


def decision_counts(preds: Sequence[Sequence[MetaPrediction | None]], correct: Sequence[Sequence[bool]],
                    lengths: Sequence[Sequence[int]], efficient: MASAEfficientSpec, max_response_length: int
                    ) -> dict[str, int]:
    """Confusion counts of the gating and cutoff decisions against the truth, for prompts whose solution
    rollouts were sampled at full length. Gating, per prompt: positive = gate(preds) says skip; true = the
    rollouts' correctness has zero variance (rl.dapo.zero_variance, DAPO's criterion). Cutoff, per rollout:
    positive = its length exceeds cutoff_length(preds) (it would have been cut); true = it is incorrect.
    Keys gate/{tp,fp,fn,tn}, cutoff/{tp,fp,fn,tn}, decision_prompts."""
    from rl.dapo import zero_variance

    out = Counter({f"{d}/{c}": 0 for d in ("gate", "cutoff") for c in ("tp", "fp", "fn", "tn")})
    for p, ok, ns in zip(preds, correct, lengths, strict=True):
        g, truth = gate(p, efficient.gate_std), zero_variance([float(c) for c in ok])
        out[f"gate/{'t' if g == truth else 'f'}{'p' if g else 'n'}"] += 1
        cut = cutoff_length(p, efficient.cutoff_factor, max_response_length)
        for c, n in zip(ok, ns, strict=True):
            would = cut is not None and n > cut
            out[f"cutoff/{'t' if would == (not c) else 'f'}{'p' if would else 'n'}"] += 1
    out["decision_prompts"] = len(preds)
    return dict(out)


def precision_f1(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """(precision, F1); NaN where undefined (no positive decision / no positive at all)."""
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    return p, (2 * p * r / (p + r) if not math.isnan(p) and not math.isnan(r) and p + r else math.nan)


def sample_with_cutoffs(sample: Callable[..., list[list["Sample"]]], rows: list[dict[str, Any]],
                        cutoffs: Sequence[int | None], round_: int) -> list[list["Sample"]]:
    """Solution rollouts with a max_new_tokens per prompt: one `sample(rows, round, max_new_tokens=…)` call per
    distinct cutoff (None = the spec's limit), groups returned in the rows' order."""
    buckets: dict[int | None, list[int]] = defaultdict(list)
    for i, c in enumerate(cutoffs):
        buckets[c].append(i)
    out: list[list["Sample"] | None] = [None] * len(rows)
    for c, idx in buckets.items():
        for i, g in zip(idx, sample([rows[i] for i in idx], round_, max_new_tokens=c)):
            out[i] = g
    return out  # type: ignore[return-value]


def meta_scores(row: dict[str, Any], preds: Sequence[MetaPrediction | None], solutions: Sequence[str],
                correct: Sequence[bool], lengths: Sequence[int], difficulty_base: float) -> list[dict[str, float]]:
    """rewards.masa.meta_reward of each prediction against one prompt's solution rollouts (notions matched in
    `notion_views`); a malformed prediction (None) scores 0 on every component."""
    problem, texts = notion_views(row, solutions)
    zero = {"r_length": 0.0, "r_difficulty": 0.0, "r_notion": 0.0, "reward": 0.0}
    return [meta_reward(p, problem, texts, correct, lengths, difficulty_base) if p is not None else dict(zero)
            for p in preds]


def expert_prediction(pred: MetaPrediction, correct: Sequence[bool], lengths: Sequence[int]) -> MetaPrediction:
    """The prediction with the true statistics substituted: pass_rate = round(PASS_MAX × share correct),
    solution_length = round(mean length of the correct solutions) in tokens (kept as predicted when none is
    correct: there is no true correct length then); the notions are kept."""
    good = [n for n, ok in zip(lengths, correct) if ok]
    return MetaPrediction(pred.notions, float(round(PASS_MAX * sum(correct) / len(correct))),
                          float(round(sum(good) / len(good))) if good else pred.solution_length)


def behaviour_cloning(model: Any, optimizer: Any, items: list[dict[str, list[int]]], beta: float, updates: int,
                      chunk_rows: int, grad_clip: float, logprobs: Callable[[Any, list[tuple[list[int], list[int]]]],
                                                                          tuple[Any, Any]]) -> list[float]:
    """`updates` optimiser steps on beta · token-mean NLL of the expert responses given their prompts, in chunks
    of `chunk_rows` rows with gradients accumulated, clipped at `grad_clip`. `logprobs(model, [(prompt_ids,
    response_ids)])` → (log-probs, response mask), both (rows, response length): rl/grpo.py gives the policy's
    at temperature 1 (the SFT loss). Returns the loss of each step (before it)."""
    import torch

    chunks = [[(it["prompt_ids"], it["response_ids"]) for it in items[i:i + chunk_rows]]
              for i in range(0, len(items), chunk_rows)]
    total = sum(len(it["response_ids"]) for it in items)
    losses = []
    for _ in range(updates):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for chunk in chunks:
            lp, mask = logprobs(model, chunk)
            loss = -beta * (lp * mask).sum() / total
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss_sum)
    return losses


FACT_TOTALS = ("meta_rollouts", "malformed", "meta_trained", "decision_prompts", "gated_prompts",
               "skipped_rollouts", "cut_rollouts", "cut_prompts", "token_budget_saved", "audit_prompts",
               "audit_tokens", "hinted_prompts", "hints_dropped", "expert_items", "bc_updates",
               *(f"{d}/{c}" for d in ("gate", "cutoff") for c in ("tp", "fp", "fn", "tn")))


def masa_facts(rl: RLSpec, state: dict[str, Any] | None) -> dict[str, Any]:
    """The run fact `masa`: the settings and the totals over steps (zeros for an arm with MASA off: the matched
    control records zero meta rollouts)."""
    s = state or {}
    totals = s.get("totals", {})
    return {**rl.masa.model_dump(), **{k: totals.get(k, 0) for k in FACT_TOTALS},
            "bc_loss_per_flush": list(s.get("bc_loss_per_flush", [])),
            "buffer_size_per_step": list(s.get("buffer_size_per_step", [])),
            "buffer_left": len(s.get("buffer", []))}


class MASARunner:
    """MASA's part of each GRPO step (see the module docstring); its counters and expert buffer live in
    state["masa"], so they are checkpointed and resumed with the run."""

    def __init__(self, rl: RLSpec, engine: Any, tokenizer: Any, grader: Any, seed_of: Callable[..., int],
                 logprobs: Callable[[Any, list[tuple[list[int], list[int]]]], tuple[Any, Any]]) -> None:
        """seed_of(*parts): a stable generation seed (rl.grpo.derived_seed with the run's seed); logprobs: see
        `behaviour_cloning`."""
        self.rl, self.engine, self.tokenizer, self.grader = rl, engine, tokenizer, grader
        self.seed_of, self.logprobs = seed_of, logprobs
        self.s: dict[str, Any] = {}
        self._reset()

    def bind(self, state: dict[str, Any]) -> None:
        """Keep counters and the expert buffer in the run's (possibly resumed) checkpointed state."""
        self.s = state.setdefault("masa", {"totals": {}, "buffer": [], "bc_loss_per_flush": [],
                                           "buffer_size_per_step": []})

    def _reset(self) -> None:
        self.meta: dict[str, Any] = {}
        self.values: dict[str, float] = {}
        self.counts: Counter = Counter()

    def prompts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The meta-prediction prompts of rows, as rows (id, prompt) for check_prompt_lengths."""
        return [{"id": r.get("id"), "prompt": meta_prompt(r["prompt"], notion_vocabulary(r))} for r in rows]

    def _predict(self, rows: list[dict[str, Any]], step: int) -> None:
        from evals.engine import render_prompt
        from rl.schedule import hf_top_k

        t0 = time.perf_counter()
        rendered = [render_prompt(self.tokenizer, p["prompt"]) for p in self.prompts(rows)]
        gens = self.engine.generate(rendered, n=self.rl.masa.m, temperature=self.rl.temperature,
                                    top_p=self.rl.top_p, top_k=hf_top_k(self.rl),
                                    max_new_tokens=self.rl.masa.max_meta_length,
                                    seed=self.seed_of("masa-meta", step))
        self.meta = {"rows": rows, "rendered": rendered, "gens": gens,
                     "preds": [[parse_prediction(g.text) for g in gs] for gs in gens]}
        self.values["time/masa_meta_s"] = time.perf_counter() - t0

    def sample(self, rows: list[dict[str, Any]], sample: Callable[..., list[list["Sample"]]], step: int
               ) -> tuple[list[dict[str, Any]], list[list["Sample"]]]:
        """Meta rollouts for the step's prompts, then the solution rollouts of the prompts not gated, each with
        its cutoff (after start_step); the audit prompts sampled in full. Returns (rows kept, their groups)."""
        self._reset()
        self._predict(rows, step)
        eff = self.rl.masa.efficient
        p = plan(self.meta["preds"], eff, step, self.rl.max_response_length)
        keep = [i for i, g in enumerate(p.gated) if not g]
        groups = sample_with_cutoffs(sample, [self._hinted(rows[i], p.hints[i]) for i in keep],
                                     [p.cutoffs[i] for i in keep], 0) if keep else []
        n, limit = self.rl.n, self.rl.max_response_length
        cut = [c for i, c in enumerate(p.cutoffs) if not p.gated[i] and c is not None and c < limit]
        self.counts.update({
            "gated_prompts": sum(p.gated), "skipped_rollouts": n * sum(p.gated), "cut_prompts": len(cut),
            "cut_rollouts": sum(len(s.response_ids) >= p.cutoffs[i] and s.truncated
                                for i, g in zip(keep, groups) for s in g
                                if p.cutoffs[i] is not None and p.cutoffs[i] < limit),
            "token_budget_saved": n * limit * sum(p.gated) + n * sum(limit - c for c in cut)})
        active = step > eff.start_step and (eff.gate or eff.cutoff or eff.hints)
        if active and eff.audit_prompts:
            t0 = time.perf_counter()
            audit = list(range(min(eff.audit_prompts, len(rows))))
            full = sample([rows[i] for i in audit], AUDIT_ROUND)
            self.values["time/masa_audit_s"] = time.perf_counter() - t0
            self._decisions([self.meta["preds"][i] for i in audit], full)
            self.counts.update({"audit_prompts": len(audit), "audit_tokens": sum(len(s.response_ids)
                                                                                  for g in full for s in g)})
        self.meta.update(kept=keep, active=active)
        return [rows[i] for i in keep], groups

    def _hinted(self, row: dict[str, Any], hint: str | None) -> dict[str, Any]:
        """The row with the hint appended to its prompt; unchanged (and counted as hints_dropped) when the hinted
        prompt would exceed rl.max_prompt_length, which is never truncated."""
        from evals.engine import render_prompt

        if hint is None:
            return row
        text = row["prompt"] + hint
        if len(self.tokenizer(render_prompt(self.tokenizer, text), add_special_tokens=False)["input_ids"]) > \
                self.rl.max_prompt_length:
            self.counts["hints_dropped"] += 1
            return row
        self.counts["hinted_prompts"] += 1
        return {**row, "prompt": text}

    def _decisions(self, preds: list[list[MetaPrediction | None]], groups: list[list["Sample"]]) -> None:
        """Decision counts on full-length rollouts, graded with the run's grader."""
        flat = [s for g in groups for s in g]
        grades = iter(self.grader.grade([s.response for s in flat], [s.gold for s in flat]))
        correct = [[next(grades).correct for _ in g] for g in groups]
        self.counts.update(decision_counts(preds, correct, [[len(s.response_ids) for s in g] for g in groups],
                                           self.rl.masa.efficient, self.rl.max_response_length))

    def update_rows(self, rows: list[dict[str, Any]], records: list[dict[str, Any]], step: int
                    ) -> list[tuple[list[int], list[int], list[float]]]:
        """The meta rollouts' PPO rows (meta prompt ids, response ids, per-token advantage) for the step's kept
        prompts, scored against `records` (score_batch's, group g = rows[g]); expert items join the buffer.
        Meta rollouts are generated here when `sample` did not run (rows chosen by dynamic sampling)."""
        from rewards.heads import centre_heads

        if not self.meta:
            self._predict(rows, step)
            self.meta.update(kept=list(range(len(rows))), active=False)
        kept = self.meta["kept"]
        by_group: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for rec in records:
            by_group[rec["group"]].append(rec)
        values, groups, out_rows, items = [], [], [], []
        parts_all: list[dict[str, float]] = []
        for g, (row, i) in enumerate(zip(rows, kept, strict=True)):
            recs = [r for r in by_group[g] if r["role"] == "solution"]
            correct, lengths = [bool(r["correct"]) for r in recs], [int(r["n_tokens"]) for r in recs]
            preds, gens = self.meta["preds"][i], self.meta["gens"][i]
            parts = meta_scores(row, preds, [r["response"] for r in recs], correct, lengths,
                                self.rl.signal.masa.difficulty_base)
            parts_all += parts
            prompt_ids = self.tokenizer(self.meta["rendered"][i], add_special_tokens=False)["input_ids"]
            for gen, part in zip(gens, parts):
                values.append({"meta": part["reward"]})
                groups.append(g)
                out_rows.append((prompt_ids, list(gen.token_ids)))
            if self.rl.masa.expert.enable and (valid := [k for k, p in enumerate(preds) if p is not None]):
                best = max(valid, key=lambda k: parts[k]["reward"])  # ties: the first
                items.append(self._expert_item(prompt_ids, gens[best], preds[best], correct, lengths))
        if not self.meta["active"]:  # shadow decisions: every kept prompt was solved at full length this step
            self.counts.update(decision_counts([self.meta["preds"][i] for i in kept],
                                               [[bool(r["correct"]) for r in by_group[g] if r["role"] == "solution"]
                                                for g in range(len(kept))],
                                               [[int(r["n_tokens"]) for r in by_group[g] if r["role"] == "solution"]
                                                for g in range(len(kept))],
                                               self.rl.masa.efficient, self.rl.max_response_length))
        adv, _ = centre_heads(values, groups, self.rl.adv_norm_std)
        w = self.rl.masa.meta_weight
        all_preds = [p for ps in self.meta["preds"] for p in ps]
        self.counts.update({"meta_rollouts": len(all_preds), "malformed": sum(p is None for p in all_preds),
                            "meta_trained": len(out_rows), "expert_items": len(items)})
        valid_parts = [pt for pt, p in zip(parts_all, [p for i in kept for p in self.meta["preds"][i]])
                       if p is not None]
        self.values.update({
            "masa/meta_reward/mean": _mean([pt["reward"] for pt in parts_all]),
            **{f"masa/{k}/mean": _mean([pt[k] for pt in valid_parts]) for k in ("r_length", "r_difficulty",
                                                                                 "r_notion")},
            "masa/pred_pass_rate/mean": _mean([p.pass_rate / PASS_MAX for p in all_preds if p is not None]),
            "masa/pred_length/mean": _mean([p.solution_length for p in all_preds if p is not None]),
        })
        self.s["buffer"] += items
        self.meta["scored"] = {(i, k): (part, a["meta"] * w)
                               for (i, k), part, a in zip(((i, k) for i in kept for k in range(self.rl.masa.m)),
                                                          parts_all, adv)}
        return [(p, r, [a["meta"] * w] * len(r)) for (p, r), a in zip(out_rows, adv)]

    def rollout_rows(self, step: int) -> list[dict[str, Any]]:
        """This step's meta rollouts for the parquet (one row per rollout, gated prompts' included, untrained):
        the prediction as parsed (None fields when malformed), its reward parts and advantage when trained."""
        out = []
        for i, (row, gens, preds) in enumerate(zip(self.meta["rows"], self.meta["gens"], self.meta["preds"])):
            for k, (gen, pred) in enumerate(zip(gens, preds)):
                part, adv = self.meta.get("scored", {}).get((i, k), ({}, None))
                out.append({"step": step, "prompt_id": row.get("id"), "sample": k, "response": gen.text,
                            "n_tokens": len(gen.token_ids), "valid": pred is not None,
                            "notions": list(pred.notions) if pred else None,
                            "pass_rate": pred.pass_rate if pred else None,
                            "solution_length": pred.solution_length if pred else None,
                            "trained": adv is not None, "advantage": adv,
                            **{key: part.get(key) for key in ("reward", "r_length", "r_difficulty", "r_notion")}})
        return out

    def _expert_item(self, prompt_ids: list[int], gen: Any, pred: MetaPrediction, correct: list[bool],
                     lengths: list[int]) -> dict[str, list[int]]:
        from evals.engine import stop_ids

        text = substitute_prediction(gen.text, expert_prediction(pred, correct, lengths))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if gen.token_ids and gen.token_ids[-1] in stop_ids(self.tokenizer):
            ids.append(gen.token_ids[-1])  # the end-of-turn token the sampled response ended with
        return {"prompt_ids": list(prompt_ids), "response_ids": ids}

    def expert_step(self, model: Any, optimizer: Any) -> None:
        """Behaviour cloning on the first expert.buffer_size buffer items once the buffer holds that many; they
        leave the buffer (the rest waits, as in the authors' code)."""
        ex = self.rl.masa.expert
        buf = self.s["buffer"]
        if ex.enable and len(buf) >= ex.buffer_size:
            t0 = time.perf_counter()
            losses = behaviour_cloning(model, optimizer, buf[:ex.buffer_size], ex.beta, ex.bc_updates,
                                       self.rl.mini_batch_size * self.rl.n, self.rl.grad_clip, self.logprobs)
            self.s["buffer"] = buf[ex.buffer_size:]
            self.s["bc_loss_per_flush"].append(_mean(losses))
            self.counts["bc_updates"] += len(losses)
            self.values.update({"masa/expert/bc_loss": _mean(losses), "masa/expert/bc_loss_first": losses[0],
                                "masa/expert/bc_loss_last": losses[-1], "masa/expert/flush": 1.0,
                                "time/masa_bc_s": time.perf_counter() - t0})
        self.s["buffer_size_per_step"].append(len(self.s["buffer"]))

    def step_metrics(self) -> dict[str, float]:
        """This step's MASA metrics (counts, means, precision/F1 where defined); adds the counts to the totals."""
        c = self.counts
        totals = Counter(self.s["totals"])
        totals.update(c)
        self.s["totals"] = dict(totals)
        out = {**self.values, **{f"masa/{k}": float(v) for k, v in c.items()},
               "masa/malformed_rate": c["malformed"] / c["meta_rollouts"] if c["meta_rollouts"] else math.nan,
               "masa/expert/buffer": float(len(self.s["buffer"]))}
        for d in ("gate", "cutoff"):
            p, f1 = precision_f1(c[f"{d}/tp"], c[f"{d}/fp"], c[f"{d}/fn"])
            out.update({f"masa/{d}/precision": p, f"masa/{d}/f1": f1})
        self._reset()
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
