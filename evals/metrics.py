"""Held-out metrics (DESIGN §8): pure functions over per-sample rows.

A per-sample row has `arm, step, suite, problem_id, domain, sample, correct, length, n_blocks, categories,
confidence` (one row per problem x sample x arm x step); each function reads only the fields it names. Inputs
are lists of dicts (what DuckDB's `fetch_df().to_dict('records')` or pyarrow's `to_pylist()` give), outputs are
plain dicts/lists of builtins, so the tables can be written to parquet and queried through DuckDB views.

A problem is identified by (suite, problem_id). Accuracies are problem-weighted: a problem's accuracy is the
share of its samples that are correct, and a group's accuracy is the mean over its problems (= avg@k).
Bad input (missing field, duplicate sample, confidence outside [0, 1]) raises DataError naming the row.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from infra.errors import DataError
from meta.grammar import CUES, META_CLOSE, META_OPEN, strip_meta

Row = dict[str, Any]
SAMPLE_FIELDS = ("arm", "step", "suite", "problem_id", "domain", "sample", "correct", "length", "n_blocks",
                 "categories", "confidence")


# ---------------------------------------------------------------- input checks

def _order(values: Iterable[Any]) -> tuple:
    """Sort key for group keys: natural order within a column (step 20 before 100), nulls last."""
    return tuple((v is None, v) for v in values)


def _require(rows: Sequence[Row], fields: Iterable[str]) -> None:
    fields = tuple(fields)
    for i, row in enumerate(rows):
        for f in fields:
            if f not in row:
                raise DataError(f"sample row {i}: field '{f}': missing (have {sorted(row)})")


def _correct(row: Row, i: int) -> int:
    value = row["correct"]
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return int(value)
    raise DataError(f"sample row {i}: field 'correct': expected a bool or 0/1, got {value!r}")


def _categories(row: Row, i: int) -> frozenset[str]:
    value = row.get("categories")
    if value is None:
        return frozenset()
    if isinstance(value, str):  # iterating a string would count its characters
        raise DataError(f"sample row {i}: field 'categories': expected a list of category names, got a string")
    return frozenset(value)


def _confidence(row: Row, i: int) -> float | None:
    value = row.get("confidence")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise DataError(f"sample row {i}: field 'confidence': expected a value in [0, 1] or null, got {value}")
    return value


def _problems(rows: Sequence[Row], meta: bool = False) -> dict[tuple, dict[str, Any]]:
    """(arm, step, suite, problem_id) -> {domain, n, c} (+ meta: samples with a closed block, cats: samples per
    cue category); refuses duplicate samples and a problem whose domain changes between rows."""
    _require(rows, ("arm", "step", "suite", "problem_id", "domain", "sample", "correct",
                    *(("n_blocks", "categories") if meta else ())))
    seen: set[tuple] = set()
    out: dict[tuple, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        key = (row["arm"], row["step"], row["suite"], row["problem_id"])
        sample_key = key + (row["sample"],)
        if sample_key in seen:
            raise DataError(f"sample row {i}: field 'sample': duplicate sample {row['sample']} of problem "
                            f"{row['suite']}/{row['problem_id']} for arm {row['arm']} step {row['step']}")
        seen.add(sample_key)
        agg = out.setdefault(key, {"domain": row["domain"], "n": 0, "c": 0, "meta": 0, "cats": defaultdict(int)})
        if agg["domain"] != row["domain"]:
            raise DataError(f"sample row {i}: field 'domain': problem {row['suite']}/{row['problem_id']} has "
                            f"domain {agg['domain']!r} in an earlier row and {row['domain']!r} here")
        agg["n"] += 1
        agg["c"] += _correct(row, i)
        if meta:
            agg["meta"] += int(row["n_blocks"] or 0) >= 1
            for cat in _categories(row, i):
                agg["cats"][cat] += 1
    return out


# ---------------------------------------------------------------- pass@k / avg@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn
    without replacement hold at least one correct one. Computed as a product (no huge binomials)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: Sequence[bool | int]) -> float:
    """Mean accuracy over a problem's k samples."""
    if len(correct) == 0:
        raise ValueError("avg@k of no samples")
    return float(np.mean(np.asarray(correct, dtype=float)))


def aggregate(rows: Sequence[Row], by: Sequence[str] = ("suite",), ks: Sequence[int] = (1,), resamples: int = 0,
              seed: int = 0, alpha: float = 0.05) -> list[Row]:
    """avg@k and unbiased pass@k per arm x step x `by` (a subset of suite, domain; () = all problems pooled).

    One dict per group: arm, step, the `by` keys, problems, samples, k (samples per problem when equal for all
    problems of the group, else None), avg_at_k, pass_at_<k> for each k (None when some problem has fewer than k
    samples). With resamples > 0 each metric also gets <metric>_lo/_hi: the alpha/2, 1-alpha/2 percentiles of a
    bootstrap over the group's problems (one set of resampled problems for every metric of the group)."""
    unknown = set(by) - {"suite", "domain"}
    if unknown:
        raise ValueError(f"aggregate by {sorted(unknown)}: only 'suite' and 'domain' are problem attributes")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (arm, step, suite, _pid), p in _problems(rows).items():
        attrs = {"suite": suite, "domain": p["domain"]}
        groups[(arm, step) + tuple(attrs[b] for b in by)].append(p)
    out = []
    for key, problems in groups.items():
        ns = {p["n"] for p in problems}
        row: Row = {"arm": key[0], "step": key[1], **dict(zip(by, key[2:])), "problems": len(problems),
                    "samples": sum(p["n"] for p in problems), "k": ns.pop() if len(ns) == 1 else None}
        per_problem = {"avg_at_k": np.array([p["c"] / p["n"] for p in problems])}
        for k in ks:
            ok = all(p["n"] >= k for p in problems)
            per_problem[f"pass_at_{k}"] = np.array([pass_at_k(p["n"], p["c"], k) for p in problems]) if ok else None
        picks = (np.random.default_rng(seed).integers(0, len(problems), size=(resamples, len(problems)))
                 if resamples else None)
        for name, values in per_problem.items():
            row[name] = None if values is None else float(values.mean())
            if picks is not None:
                ci = None if values is None else np.quantile(values[picks].mean(axis=1), [alpha / 2, 1 - alpha / 2])
                row[f"{name}_lo"], row[f"{name}_hi"] = (None, None) if ci is None else (float(ci[0]), float(ci[1]))
        out.append(row)
    return sorted(out, key=lambda r: _order(r[f] for f in ("arm", "step", *by)))


# ---------------------------------------------------------------- difficulty quartiles

def problem_difficulty(rows: Sequence[Row]) -> list[Row]:
    """Difficulty of each problem = 1 - accuracy pooled over ALL rows given (every arm, every step), and its
    quartile 1 (easiest) .. 4 (hardest). One assignment for every arm, so quartile tables compare like with like.

    Quartiles are cut at the 25/50/75 % quantiles of the problems' difficulties: quartile = 1 + number of cuts
    the difficulty is strictly above. Ties stay together, so quartiles are only roughly equal in size when many
    problems share a difficulty (e.g. all solved)."""
    _require(rows, ("suite", "problem_id", "correct"))
    n: dict[tuple, int] = defaultdict(int)
    c: dict[tuple, int] = defaultdict(int)
    for i, row in enumerate(rows):
        key = (row["suite"], row["problem_id"])
        n[key] += 1
        c[key] += _correct(row, i)
    keys = list(n)
    if not keys:
        return []
    difficulty = np.array([1.0 - c[k] / n[k] for k in keys])
    cuts = np.quantile(difficulty, [0.25, 0.5, 0.75])
    quartile = 1 + (difficulty[:, None] > cuts[None, :]).sum(axis=1)
    return [{"suite": k[0], "problem_id": k[1], "samples": n[k], "difficulty": float(d), "quartile": int(q)}
            for k, d, q in zip(keys, difficulty, quartile)]


def quartile_table(rows: Sequence[Row]) -> list[Row]:
    """Per arm x step x difficulty quartile (pooled over all arms, see problem_difficulty): problems, accuracy,
    closed-meta emission rate (share of samples with n_blocks >= 1) and per cue category the share of samples
    whose blocks show it (cue_<category>). Rates are problem-weighted like accuracy."""
    problems = _problems(rows, meta=True)
    quartile = {(d["suite"], d["problem_id"]): d["quartile"] for d in problem_difficulty(rows)}
    categories = sorted(set(CUES).union(*(p["cats"] for p in problems.values())))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (arm, step, suite, pid), p in problems.items():
        groups[(arm, step, quartile[(suite, pid)])].append(p)
    out = []
    for (arm, step, q), group in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        row: Row = {"arm": arm, "step": step, "quartile": q, "problems": len(group),
                    "accuracy": float(np.mean([p["c"] / p["n"] for p in group])),
                    "meta_emission": float(np.mean([p["meta"] / p["n"] for p in group]))}
        for cat in categories:
            row[f"cue_{cat}"] = float(np.mean([p["cats"][cat] / p["n"] for p in group]))
        out.append(row)
    return out


# ---------------------------------------------------------------- calibration

def ece_brier(confidence: Sequence[float], correct: Sequence[bool | int], bins: int = 15) -> Row:
    """Expected calibration error over `bins` equal-width bins ([i/B, (i+1)/B), the last one closed) and the
    Brier score, for samples that stated a confidence. ECE = sum_b |b|/N * |accuracy(b) - mean confidence(b)|."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence and correct differ in length ({conf.size} vs {hit.size})")
    if conf.size == 0:
        return {"n": 0, "ece": None, "brier": None, "bins": []}
    index = np.minimum((conf * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        acc, mean_conf = float(hit[mask].mean()), float(conf[mask].mean())
        ece += mask.sum() / conf.size * abs(acc - mean_conf)
        table.append({"bin": b, "lo": b / bins, "hi": (b + 1) / bins, "n": int(mask.sum()), "accuracy": acc,
                      "confidence": mean_conf})
    return {"n": int(conf.size), "ece": float(ece), "brier": float(np.mean((conf - hit) ** 2)), "bins": table}


def calibration(rows: Sequence[Row], bins: int = 15, by: Sequence[str] = ("arm", "step")) -> list[Row]:
    """ece_brier per group over the rows with a stated confidence, plus coverage = stated / all samples."""
    _require(rows, ("correct", *by))
    groups: dict[tuple, list[tuple[float | None, int]]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[tuple(row[b] for b in by)].append((_confidence(row, i), _correct(row, i)))
    out = []
    for key, items in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        stated = [(conf, hit) for conf, hit in items if conf is not None]
        result = ece_brier([s[0] for s in stated], [s[1] for s in stated], bins)
        out.append({**dict(zip(by, key)), "samples": len(items), "stated": len(stated),
                    "coverage": len(stated) / len(items), "ece": result["ece"], "brier": result["brier"],
                    "bins": result["bins"]})
    return out


# ---------------------------------------------------------------- paired bootstrap

def _distinct(treatment: str, control: str) -> None:
    if treatment == control:
        raise DataError(f"the comparison compares an arm with itself ('{treatment}')")


def _arm_accuracy(rows: Sequence[Row], arm: str) -> dict[tuple, float]:
    """(suite, problem_id) -> accuracy of one arm; the arm must appear at exactly one step."""
    problems = {k: p for k, p in _problems(rows).items() if k[0] == arm}
    steps = {k[1] for k in problems}
    if len(steps) > 1:
        raise DataError(f"arm '{arm}' has rows from steps {sorted(steps, key=str)}; filter to one step per arm")
    return {(k[2], k[3]): p["c"] / p["n"] for k, p in problems.items()}


def paired_bootstrap(rows: Sequence[Row], treatment: str, control: str, resamples: int = 1000, seed: int = 0,
                     alpha: float = 0.05, stratify: bool = True) -> Row:
    """Paired bootstrap of mean accuracy(treatment) - accuracy(control) over the problems both arms answered.

    Problems (not samples) are resampled with replacement, within each suite when `stratify` (suite sizes stay
    fixed, as in the held-out design). Returns delta (on the data), lo/hi (the alpha/2, 1-alpha/2 percentiles),
    p_le_0 (share of resamples with delta <= 0: a one-sided p-value-like number for 'treatment is better'), and
    the problem counts, including those only one arm has (left out of the comparison, reported)."""
    _distinct(treatment, control)
    acc_t, acc_c = _arm_accuracy(rows, treatment), _arm_accuracy(rows, control)
    shared = sorted(set(acc_t) & set(acc_c), key=str)
    if not shared:
        raise DataError(f"arms '{treatment}' and '{control}' share no problems")
    diff = np.array([acc_t[k] - acc_c[k] for k in shared])
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, (suite, _pid) in enumerate(shared):
        strata[suite if stratify else None].append(i)
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for idx in strata.values():
        values = diff[idx]
        totals += values[rng.integers(0, len(values), size=(resamples, len(values)))].sum(axis=1)
    deltas = totals / len(shared)
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return {"treatment": treatment, "control": control, "problems": len(shared),
            "only_treatment": len(set(acc_t) - set(acc_c)), "only_control": len(set(acc_c) - set(acc_t)),
            "delta": float(diff.mean()), "lo": float(lo), "hi": float(hi), "p_le_0": float(np.mean(deltas <= 0)),
            "resamples": resamples, "seed": seed, "stratified": stratify}


# ---------------------------------------------------------------- Simpson check

def _sign(x: float, tol: float = 1e-12) -> int:
    return 0 if abs(x) <= tol else (1 if x > 0 else -1)


def simpson(strata: Sequence[Row]) -> Row:
    """Simpson's-paradox check for one treatment/control comparison split into strata.

    Each stratum: {stratum, n_t, c_t, n_c, c_c} (samples and correct samples per arm). Computed:
      pooled       = sum c_t / sum n_t - sum c_c / sum n_c    (each arm weighted by its own stratum mix)
      delta_s      = c_t/n_t - c_c/n_c                        per stratum
      standardised = sum_s w_s delta_s, w_s = (n_t + n_c)_s / sum (n_t + n_c)   (common weights for both arms)
      shared_sign  = +1 / -1 when every stratum's delta has that strict sign, else 0
    flag is True when sign(pooled) != shared_sign != 0 (the pooled direction contradicts every stratum), or when
    sign(pooled) != sign(standardised) (the pooled number says something the like-for-like estimate does not).
    Signs are taken with a 1e-12 tolerance, so an exact 0 disagrees with a clear + or -."""
    table = []
    for s in strata:
        if min(s["n_t"], s["n_c"]) <= 0:
            raise DataError(f"stratum {s['stratum']!r}: both arms need samples (n_t={s['n_t']}, n_c={s['n_c']})")
        table.append({**s, "acc_t": s["c_t"] / s["n_t"], "acc_c": s["c_c"] / s["n_c"],
                      "delta": s["c_t"] / s["n_t"] - s["c_c"] / s["n_c"]})
    if not table:
        raise DataError("Simpson check needs at least one stratum")
    total = sum(s["n_t"] + s["n_c"] for s in table)
    for s in table:
        s["weight"] = (s["n_t"] + s["n_c"]) / total
    pooled = (sum(s["c_t"] for s in table) / sum(s["n_t"] for s in table)
              - sum(s["c_c"] for s in table) / sum(s["n_c"] for s in table))
    standardised = sum(s["weight"] * s["delta"] for s in table)
    signs = {_sign(s["delta"]) for s in table}
    shared = signs.pop() if len(signs) == 1 else 0
    reasons = []
    if shared and _sign(pooled) != shared:
        reasons.append(f"pooled difference {pooled:+.4f} contradicts the {'+' if shared > 0 else '-'} sign of "
                       f"every stratum")
    if _sign(pooled) != _sign(standardised):
        reasons.append(f"pooled difference {pooled:+.4f} and common-weight estimate {standardised:+.4f} differ "
                       f"in sign")
    return {"pooled": float(pooled), "standardised": float(standardised), "shared_sign": shared,
            "flag": bool(reasons), "reason": "; ".join(reasons), "strata": table}


def simpson_check(rows: Sequence[Row], treatment: str, control: str, stratum: str = "suite") -> Row:
    """simpson() on sample counts of two arms, stratified by a row field (suite, domain, ...)."""
    _require(rows, ("arm", "correct", stratum))
    _distinct(treatment, control)
    counts: dict[Any, dict[str, int]] = defaultdict(lambda: {"n_t": 0, "c_t": 0, "n_c": 0, "c_c": 0})
    for i, row in enumerate(rows):
        side = {treatment: "t", control: "c"}.get(row["arm"])
        if side:
            counts[row[stratum]][f"n_{side}"] += 1
            counts[row[stratum]][f"c_{side}"] += _correct(row, i)
    return {"treatment": treatment, "control": control, "by": stratum,
            **simpson([{"stratum": k, **v} for k, v in sorted(counts.items(), key=lambda kv: _order([kv[0]]))])}


def quartile_simpson(rows: Sequence[Row], treatment: str, control: str) -> Row:
    """simpson_check across difficulty quartiles. Difficulty is pooled over every row given (problem_difficulty),
    so both arms are cut at the same quartiles; pass the rows of the steps being compared."""
    quartile = {(d["suite"], d["problem_id"]): d["quartile"] for d in problem_difficulty(rows)}
    return simpson_check([{**r, "quartile": quartile[(r["suite"], r["problem_id"])]} for r in rows], treatment,
                         control, stratum="quartile")


# ---------------------------------------------------------------- meta behaviour

def meta_rates(rows: Sequence[Row]) -> list[Row]:
    """Per arm x step: share of samples with a closed meta block (meta_emission), showing each cue category
    (cue_<category>) and stating a confidence inside a block (confidence_stated)."""
    _require(rows, ("arm", "step", "n_blocks", "categories", "confidence"))
    groups: dict[tuple, list[tuple[bool, frozenset[str], bool]]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[(row["arm"], row["step"])].append((int(row["n_blocks"] or 0) >= 1, _categories(row, i),
                                                  _confidence(row, i) is not None))
    categories = sorted(set(CUES).union(*(cats for items in groups.values() for _, cats, _ in items)))
    out = []
    for (arm, step), items in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        n = len(items)
        out.append({"arm": arm, "step": step, "samples": n, "meta_emission": sum(m for m, _, _ in items) / n,
                    **{f"cue_{cat}": sum(cat in cats for _, cats, _ in items) / n for cat in categories},
                    "confidence_stated": sum(stated for *_, stated in items) / n})
    return out


# ---------------------------------------------------------------- meta-strip regrade

def regrade_stripped(rows: Sequence[Row], grade_fn: Callable[[str, str], bool], gold_key: str = "gold",
                     open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> tuple[int, list[Row]]:
    """Regrade strip_meta(response) against the gold and list the samples whose grade flips (audit: a meta
    block must never be what makes an answer right or wrong). grade_fn(response, gold) -> bool is the grader.

    Only responses that strip_meta changes are regraded: an unchanged response is the same grader input."""
    _require(rows, ("response", "correct", gold_key))
    flips = []
    for i, row in enumerate(rows):
        stripped = strip_meta(row["response"], open_tag, close_tag)
        if stripped == row["response"]:
            continue
        before, after = bool(_correct(row, i)), bool(grade_fn(stripped, row[gold_key]))
        if before != after:
            flips.append({**{f: row.get(f) for f in ("arm", "step", "suite", "problem_id", "sample")},
                          "correct": before, "correct_stripped": after})
    return len(flips), flips
