"""Reward signals by name (DESIGN §6; method cards in docs/method-cards.md).

A signal scores one GROUP (the rollouts of one prompt) and returns one `SignalResult` per rollout: a value, or
None when it cannot score that rollout (the reason is `extras["skip"]`; a None row is left out of the meta head's
centring). Notation: x = the prompt as rendered, y = p ∘ m ∘ c around the FIRST closed block m (tags included).

Belief at a context (PMI-shift, gm): with g = `\\boxed{gold}` and d = `\\boxed{decoy}` tokenised separately
(rewards.scorer.text_logprobs), B(ctx) = Σ_{t∈D} [log π(g_t | ctx, g_<t) − log π(d_t | ctx, d_<t)] over the
positions D where the gold and decoy tokens differ; not scored when their token lengths differ.

Position confound (ARITH-NOTES): o = B(x∘p) is often measured where `\\boxed{}` is the natural next text, while
after a block the model expects more steps, which pulls c toward 0. `pmishift.position: matched` measures o after
a placebo block instead, o = B(x∘p∘placebo), so o and c are both taken right after a closed block and the shift
compares the block's content with a neutral block. gm is the per-token form of that same comparison.

Scorer calls are batched per group: a signal collects every (context, target) request of the group and makes one
`target_logprobs` call. Vanilla returns before any scorer call.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from infra.spec import AsymCFParams, SignalParams
from rewards import masa as masa_fns
from rewards.scorer import Scorer, encode, text_logprobs
from meta.grammar import META_CLOSE, META_OPEN, FormatClass, find_boxes, split_first_block

PLACEBO_CONTENT = "\nLet me continue.\n"


@dataclass(frozen=True)
class Rollout:
    """One sampled response. `correct` comes from the grader; `n_tokens` is the response length in tokens
    (needed by masa). role: 'meta_prediction' rows are MASA's JSON predictions, everything else is a solution."""

    prompt: str
    response: str
    gold: str
    decoy: str | None = None
    correct: bool = False
    truncated: bool = False
    format_class: FormatClass = "none"
    n_tokens: int | None = None
    role: Literal["solution", "meta_prediction"] = "solution"


@dataclass
class SignalResult:
    value: float | None
    extras: dict[str, Any] = field(default_factory=dict)


def skip(reason: str, **extras: Any) -> SignalResult:
    return SignalResult(None, {"skip": reason, **extras})


@dataclass
class SignalContext:
    """What a signal may use. regenerate(contexts) returns continuations sampled from each context with the meta
    open tag banned; grade(responses, golds) returns correct flags (the same grader as the correctness head)."""

    params: SignalParams = field(default_factory=SignalParams)
    scorer: Scorer | None = None
    tokenizer: Any = None
    regenerate: Callable[[list[str]], list[str]] | None = None
    grade: Callable[[list[str], list[str]], list[bool]] | None = None
    meta_open: str = META_OPEN
    meta_close: str = META_CLOSE
    counters: Counter = field(default_factory=Counter)

    @property
    def placebo(self) -> str:
        return self.meta_open + PLACEBO_CONTENT + self.meta_close


SignalFn = Callable[[Sequence[Rollout], SignalContext], list[SignalResult]]


@dataclass(frozen=True)
class Signal:
    name: str
    fn: SignalFn
    needs: frozenset[str]  # of: scorer, decoy, regenerate, grade


SIGNALS: dict[str, Signal] = {}


def register(name: str, needs: Sequence[str] = ()) -> Callable[[SignalFn], SignalFn]:
    def deco(fn: SignalFn) -> SignalFn:
        if name in SIGNALS:
            raise ValueError(f"signal '{name}' is already registered")
        SIGNALS[name] = Signal(name, fn, frozenset(needs))
        return fn
    return deco


def get_signal(name: str) -> Signal:
    if name not in SIGNALS:
        raise KeyError(f"unknown reward signal '{name}'; known: {', '.join(sorted(SIGNALS))}")
    return SIGNALS[name]


def score_group(name: str, group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """Run signal `name` on one group; a non-finite value becomes a skip with reason 'nan'."""
    sig = get_signal(name)
    missing = [need for need, ok in (("scorer", ctx.scorer is not None and ctx.tokenizer is not None),
                                     ("regenerate", ctx.regenerate is not None), ("grade", ctx.grade is not None))
               if need in sig.needs and not ok]
    if missing:
        raise ValueError(f"signal '{name}' needs {', '.join(missing)} in its SignalContext")
    results = sig.fn(group, ctx)
    if len(results) != len(group):
        raise RuntimeError(f"signal '{name}' returned {len(results)} results for {len(group)} rollouts")
    return [skip("nan", **r.extras) if r.value is not None and not math.isfinite(r.value) else r for r in results]


# ---------------------------------------------------------------- shared pieces

def _clip(v: float, bound: float) -> float:
    """Clip to ±bound; a non-finite input stays NaN (max/min would turn NaN or ±inf into a finite bound)."""
    return max(-bound, min(bound, v)) if math.isfinite(v) else math.nan


def _gate(r: Rollout) -> int:
    return 1 if r.correct else -1


def _gated(r: Rollout, agg: float, bound: float) -> float:
    """The research code's correctness gate: +clip(agg, 0, G) if the rollout is correct, −clip(agg, 0, G) if wrong
    (G = bound). A block that lowered the aggregate earns 0 either way; NaN stays NaN."""
    return _gate(r) * max(0.0, min(bound, agg)) + 0.0 if math.isfinite(agg) else math.nan  # + 0.0: never −0.0


def copied_share(block: str, continuation: str, tokenizer: Any, n: int) -> float:
    """Share of the block's token n-grams (its content, tags excluded) that reappear in the continuation's tokens;
    0 for a block shorter than n tokens."""
    def grams(ids: list[int]) -> list[tuple[int, ...]]:
        return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]

    mine = grams(encode(tokenizer, block))
    if not mine:
        return 0.0
    theirs = set(grams(encode(tokenizer, continuation)))
    return sum(g in theirs for g in mine) / len(mine)


def _parts(r: Rollout, ctx: SignalContext, boxed_ok: bool = False) -> tuple[str, str, str] | SignalResult:
    """(p, m, c) around the first closed block, or the skip. A block that already states a boxed answer lets the
    scorer copy it, so the log-prob signals refuse it (boxed_ok=False)."""
    parts = split_first_block(r.response, ctx.meta_open, ctx.meta_close)
    if parts is None:
        return skip("no_block")
    if not boxed_ok and _holds_box(parts[1]):
        return skip("boxed_in_block")
    return parts


def _holds_box(block: str) -> bool:
    """Any answer box in the block, complete, brace-less or cut off (`\\boxed{`, `\\boxed 5`, `\\fbox{`)."""
    boxes = find_boxes(block)
    return bool(boxes.contents) or boxes.truncated


@dataclass(frozen=True)
class _Pair:
    gold: str  # \boxed{gold}
    decoy: str  # \boxed{decoy}
    diff: tuple[int, ...]  # token positions where they differ


def _pair(ctx: SignalContext, gold: str, decoy: str | None) -> _Pair | str:
    if decoy is None or decoy == gold:
        return "no_decoy"
    g, d = "\\boxed{" + gold + "}", "\\boxed{" + decoy + "}"
    g_ids, d_ids = encode(ctx.tokenizer, g), encode(ctx.tokenizer, d)
    if len(g_ids) != len(d_ids):
        return "token_length_mismatch"
    diff = tuple(i for i, (a, b) in enumerate(zip(g_ids, d_ids)) if a != b)
    return _Pair(g, d, diff) if diff else "identical_tokens"


def _belief_terms(ctx: SignalContext, items: Sequence[tuple[str, _Pair]]) -> list[list[float]]:
    """For each (context, pair): log π(g_t|ctx, g_<t) − log π(d_t|ctx, d_<t) for t in D. B = their sum.
    One scorer call for all items."""
    contexts = [c for c, _ in items for _ in (0, 1)]
    targets = [t for _, p in items for t in (p.gold, p.decoy)]
    lps = text_logprobs(ctx.scorer, ctx.tokenizer, contexts, targets) if items else []
    return [[lps[2 * k][t] - lps[2 * k + 1][t] for t in p.diff] for k, (_, p) in enumerate(items)]


def _prepare(group: Sequence[Rollout], ctx: SignalContext, need_pair: bool
             ) -> tuple[list[SignalResult | None], dict[int, tuple[tuple[str, str, str], _Pair | None]]]:
    """Skips decided before scoring, and for the rest their (p, m, c) and gold/decoy pair."""
    out: list[SignalResult | None] = [None] * len(group)
    ready: dict[int, tuple[tuple[str, str, str], _Pair | None]] = {}
    pairs: dict[tuple[str, str | None], _Pair | str] = {}
    for i, r in enumerate(group):
        parts = _parts(r, ctx)
        if isinstance(parts, SignalResult):
            out[i] = parts
            continue
        pair = None
        if need_pair:
            if (r.gold, r.decoy) not in pairs:
                pairs[(r.gold, r.decoy)] = _pair(ctx, r.gold, r.decoy)
            pair = pairs[(r.gold, r.decoy)]
            if isinstance(pair, str):
                out[i] = skip(pair, decoy=r.decoy)
                continue
        ready[i] = (parts, pair)
    return out, ready


# ---------------------------------------------------------------- signals

@register("vanilla")
def vanilla(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """The control arm: no meta signal, and no scorer call."""
    return [skip("vanilla") for _ in group]


@register("pmishift", needs=("scorer", "decoy"))
def pmishift(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """o = B(x∘p) (matched: B(x∘p∘placebo)), c = B(x∘p∘m);
    R = s·clip(c − o, −κ, κ) + a·[o < −ε ∧ c > ε] − b·[o > ε ∧ c < −ε]."""
    p = ctx.params.pmishift
    out, ready = _prepare(group, ctx, need_pair=True)
    items = []
    for i, ((pre, block, _), pair) in ready.items():
        x = group[i].prompt + pre
        items += [(x + ctx.placebo if p.position == "matched" else x, pair), (x + block, pair)]
    terms = _belief_terms(ctx, items)
    for k, i in enumerate(ready):
        o, c = sum(terms[2 * k]), sum(terms[2 * k + 1])
        extras = {"o": o, "c": c, "shift": c - o, "decoy": group[i].decoy, "position": p.position}
        if not (math.isfinite(o) and math.isfinite(c)):
            out[i] = skip("nan", **extras)
            continue
        save, derail = o < -p.eps and c > p.eps, o > p.eps and c < -p.eps
        value = p.scale * _clip(c - o, p.kappa) + p.save_bonus * save - p.derail_penalty * derail
        out[i] = SignalResult(value, {**extras, "save": save, "derail": derail})
    return out


@register("pmi", needs=("scorer",))
def pmi(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """Per token of c: log π(c_t | x∘p∘m∘c_<t) − log π(c_t | x∘p∘c_<t) (placebo: x∘p∘placebo∘c_<t in the second
    term); aggregated by sum or mean; gated +clip(agg, 0, G) if correct, −clip(agg, 0, G) if wrong (G = clip).
    Not scored when the block holds a box or ≥ copy_share of its copy_ngram-grams reappear in c (a copy)."""
    p = ctx.params.pmi
    out, ready = _prepare(group, ctx, need_pair=False)
    jobs = []
    for i, ((pre, block, cont), _) in ready.items():
        if not cont:
            out[i] = skip("empty_continuation")
            continue
        content = block[len(ctx.meta_open):len(block) - len(ctx.meta_close)]
        share = copied_share(content, cont, ctx.tokenizer, p.copy_ngram)
        if share >= p.copy_share:
            out[i] = skip("copied_block", copied_share=share)
            continue
        x = group[i].prompt + pre
        jobs.append((i, x + block, x + ctx.placebo if p.placebo else x, cont))
    lps = text_logprobs(ctx.scorer, ctx.tokenizer, [c for _, w, wo, _ in jobs for c in (w, wo)],
                        [t for *_, t in jobs for _ in (0, 1)]) if jobs else []
    for k, (i, *_) in enumerate(jobs):
        per_token = [a - b for a, b in zip(lps[2 * k], lps[2 * k + 1])]
        agg = sum(per_token) if p.aggregate == "sum" else sum(per_token) / len(per_token)
        out[i] = SignalResult(_gated(group[i], agg, p.clip),
                              {"pmi": agg, "n_tokens": len(per_token), "gate": _gate(group[i]), "placebo": p.placebo})
    return out


@register("gm", needs=("scorer", "decoy"))
def gm(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """Difference-in-differences at x∘p∘m vs x∘p∘placebo over the differing gold/decoy tokens:
    δ_t = [gold_t(m) − gold_t(placebo)] − [decoy_t(m) − decoy_t(placebo)], clipped ±clip; agg = mean δ + min δ;
    gated +clip(agg, 0, G) if correct, −clip(agg, 0, G) if wrong (G = gate)."""
    p = ctx.params.gm
    out, ready = _prepare(group, ctx, need_pair=True)
    items = []
    for i, ((pre, block, _), pair) in ready.items():
        x = group[i].prompt + pre
        items += [(x + block, pair), (x + ctx.placebo, pair)]
    terms = _belief_terms(ctx, items)
    for k, i in enumerate(ready):
        deltas = [_clip(a - b, p.clip) for a, b in zip(terms[2 * k], terms[2 * k + 1])]
        agg = sum(deltas) / len(deltas) + min(deltas)
        out[i] = SignalResult(_gated(group[i], agg, p.gate), {"deltas": deltas, "gm": agg, "gate": _gate(group[i]),
                                                      "decoy": group[i].decoy})
    return out


def _counterfactuals(group: Sequence[Rollout], ctx: SignalContext) -> tuple[list[SignalResult | None],
                                                                              dict[int, bool]]:
    """Regenerate from x∘p with the meta token banned and grade p ∘ regenerated continuation."""
    out: list[SignalResult | None] = [None] * len(group)
    prefixes: dict[int, str] = {}
    for i, r in enumerate(group):
        parts = _parts(r, ctx, boxed_ok=True)
        if isinstance(parts, SignalResult):
            out[i] = parts
        else:
            prefixes[i] = parts[0]
    if not prefixes:
        return out, {}
    conts = ctx.regenerate([group[i].prompt + pre for i, pre in prefixes.items()])
    ctx.counters["regenerations"] += len(prefixes)
    ok = ctx.grade([pre + cont for pre, cont in zip(prefixes.values(), conts)], [group[i].gold for i in prefixes])
    return out, dict(zip(prefixes, (bool(v) for v in ok)))


@register("cf", needs=("regenerate", "grade"))
def cf(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """1[rollout correct] − 1[counterfactual without the block correct]."""
    out, cf_ok = _counterfactuals(group, ctx)
    for i, ok in cf_ok.items():
        out[i] = SignalResult(int(group[i].correct) - int(ok), {"cf_correct": ok})
    return out


def asym_cf_value(c1: float, c0: float, p: AsymCFParams) -> float:
    """α·max(0, c1 − c0) − [c0 − c1 > margin]·min(β(c0 − c1), cap) − γ·[c0 ≥ sat ∧ c1 ≥ sat]."""
    return (p.alpha * max(0.0, c1 - c0) - (c0 - c1 > p.margin) * min(p.beta * (c0 - c1), p.cap)
            - p.gamma * (c0 >= p.saturated and c1 >= p.saturated))


@register("asym_cf", needs=("regenerate", "grade"))
def asym_cf(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """c1 = accuracy of the group's rollouts with a block, c0 = accuracy of their counterfactuals; the group value
    goes to the rollouts with a block and 0 to those without (a group-constant value would centre away)."""
    out, cf_ok = _counterfactuals(group, ctx)
    if not cf_ok:
        return [r or skip("no_block") for r in out]
    c1 = sum(group[i].correct for i in cf_ok) / len(cf_ok)
    c0 = sum(cf_ok.values()) / len(cf_ok)
    value = asym_cf_value(c1, c0, ctx.params.asym_cf)
    facts = {"c1": c1, "c0": c0, "n_meta": len(cf_ok)}
    return [SignalResult(value, {**facts, "cf_correct": cf_ok[i]}) if i in cf_ok
            else SignalResult(0.0, {**facts, "baseline": True}) for i in range(len(group))]


@register("masa")
def masa(group: Sequence[Rollout], ctx: SignalContext) -> list[SignalResult]:
    """A MASA group holds the prompt's solution rollouts (role 'solution', graded) and its meta-prediction rollouts
    (role 'meta_prediction', JSON). Predictions are scored against the solutions' true statistics; an unparsable
    prediction scores 0 (the floor of every component); solution rows carry no meta value."""
    sols = [r for r in group if r.role == "solution"]
    if any(r.n_tokens is None for r in sols):
        raise ValueError("masa needs Rollout.n_tokens on every solution rollout")
    out = []
    for r in group:
        if r.role == "solution":
            out.append(skip("solution_rollout"))
        elif not sols:
            out.append(skip("no_solutions"))
        elif (pred := masa_fns.parse_prediction(r.response)) is None:
            out.append(SignalResult(0.0, {"invalid_prediction": True}))
        else:
            parts = masa_fns.meta_reward(pred, sols[0].prompt, [s.response for s in sols], [s.correct for s in sols],
                                         [s.n_tokens for s in sols], ctx.params.masa.difficulty_base)
            out.append(SignalResult(parts.pop("reward"), {**parts, "pass_rate_pred": pred.pass_rate,
                                                          "length_pred": pred.solution_length}))
    return out
