"""Held-out metrics (DESIGN §8): pure functions over per-sample rows.

A per-sample row has `arm, step, suite, problem_id, domain, sample, correct, length, n_blocks, categories,
confidence` and optionally `seed` (one row per problem x sample x arm x seed x step); each function reads only the
fields it names. The samples of several seeds of an arm count as more samples of its problems, except where a
function keeps seeds apart (paired_grid, paired_bootstrap: the CI then covers seeds and problems). Inputs
are lists of dicts (what DuckDB's `fetch_df().to_dict('records')` or pyarrow's `to_pylist()` give), outputs are
plain dicts/lists of builtins, so the tables can be written to parquet and queried through DuckDB views.

A problem is identified by (suite, problem_id). Accuracies are problem-weighted: a problem's accuracy is the
share of its samples that are correct, and a group's accuracy is the mean over its problems (= avg@k).
Bad input (missing field, duplicate sample, confidence outside [0, 1]) raises DataError naming the row.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from statistics import NormalDist
from collections import defaultdict
from dataclasses import dataclass
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


def _problems(rows: Sequence[Row], meta: bool = False, by_seed: bool = False) -> dict[tuple, dict[str, Any]]:
    """(arm, step, suite, problem_id) -> {domain, n, c} (+ meta: samples with a closed block, cats: samples per
    cue category). A row's sample is identified by (seed, sample), so the rows of several seeds of an arm are more
    samples of the same problem; with by_seed the key is (arm, step, seed, suite, problem_id) instead. Refuses
    duplicate samples and a problem whose domain changes between rows."""
    _require(rows, ("arm", "step", "suite", "problem_id", "domain", "sample", "correct",
                    *(("n_blocks", "categories") if meta else ())))
    seen: set[tuple] = set()
    out: dict[tuple, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        seed = row.get("seed")
        key = ((row["arm"], row["step"], seed, row["suite"], row["problem_id"]) if by_seed
               else (row["arm"], row["step"], row["suite"], row["problem_id"]))
        sample_key = (row["arm"], row["step"], row["suite"], row["problem_id"], seed, row["sample"])
        if sample_key in seen:
            raise DataError(f"sample row {i}: field 'sample': duplicate sample {row['sample']} of problem "
                            f"{row['suite']}/{row['problem_id']} for arm {row['arm']} step {row['step']}"
                            + (f" seed {seed}" if seed is not None else ""))
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

def _tie_break(suite: str, problem_id: Any) -> str:
    """A fixed, arbitrary order among problems of equal difficulty: the SHA-256 of "suite/problem_id"."""
    return hashlib.sha256(f"{suite}/{problem_id}".encode()).hexdigest()


def problem_difficulty(rows: Sequence[Row]) -> list[Row]:
    """Difficulty of each problem = 1 - accuracy pooled over ALL rows given (every arm, seed and step), and its
    equal-count quartile 1 (easiest) .. 4 (hardest). One assignment for every arm, so quartile tables compare like
    with like.

    Problems are ranked by difficulty, ties broken by _tie_break (a hash of suite/problem_id, so the order does not
    depend on row order or on problem ids being sorted), and rank r of N goes to quartile 1 + floor(4 r / N): the
    quartiles' sizes differ by at most one, and none is empty once N >= 4. Returns one dict per problem:
    suite, problem_id, samples, difficulty (in [0, 1]), quartile (1..4)."""
    _require(rows, ("suite", "problem_id", "correct"))
    n: dict[tuple, int] = defaultdict(int)
    c: dict[tuple, int] = defaultdict(int)
    for i, row in enumerate(rows):
        key = (row["suite"], row["problem_id"])
        n[key] += 1
        c[key] += _correct(row, i)
    ranked = sorted(n, key=lambda k: (1.0 - c[k] / n[k], _tie_break(*k)))
    return [{"suite": k[0], "problem_id": k[1], "samples": n[k], "difficulty": 1.0 - c[k] / n[k],
             "quartile": 1 + 4 * rank // len(ranked)} for rank, k in enumerate(ranked)]


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


# ---------------------------------------------------------------- paired differences: seeds x problems

def _distinct(treatment: str, control: str) -> None:
    if treatment == control:
        raise DataError(f"the comparison compares an arm with itself ('{treatment}')")


@dataclass(frozen=True)
class PairedGrid:
    """The per-problem differences of two arms, one row per seed: diff[s, p] = accuracy(treatment, seed s,
    problem p) - accuracy(control, seed s, problem p), on the problems every seed of both arms answered.

    seeds: the seeds both arms ran, sorted (None for rows without a seed field); problems: (suite, problem_id)
    sorted; strata: the stratum value of each problem (its suite or domain); sampling_var[s, p]: the variance of
    diff[s, p] that comes from drawing k samples per problem, s_t^2/k_t + s_c^2/k_c with the unbiased Bernoulli
    variance s^2 = k/(k-1) acc (1-acc) (0 where k = 1); samples: k, the samples per problem and seed when every
    cell has the same number, else None; only_treatment/only_control: problems the other arm lacks in some seed
    (left out, reported)."""

    treatment: str
    control: str
    seeds: list[Any]
    problems: list[tuple[str, Any]]
    strata: list[Any]
    diff: np.ndarray
    sampling_var: np.ndarray
    samples: int | None
    only_treatment: int
    only_control: int


def paired_grid(rows: Sequence[Row], treatment: str, control: str, stratum: str = "suite") -> PairedGrid:
    """Build the PairedGrid of two arms from sample rows (each arm at exactly one step; a row's `seed` field, when
    present, tells its seed). Raises DataError when an arm has no rows or rows at several steps, the arms ran
    different seeds or share no problem; ValueError when `stratum` is not suite/domain."""
    _distinct(treatment, control)
    if stratum not in ("suite", "domain"):
        raise ValueError(f"stratum {stratum!r}: only 'suite' and 'domain' are problem attributes")
    cells: dict[str, dict[tuple, dict[str, Any]]] = {treatment: {}, control: {}}
    steps: dict[str, set] = {treatment: set(), control: set()}
    for (arm, step, seed, suite, pid), p in _problems(rows, by_seed=True).items():
        if arm in cells:
            cells[arm][(seed, suite, pid)] = p
            steps[arm].add(step)
    for arm, found in steps.items():
        if len(found) > 1:
            raise DataError(f"arm '{arm}' has rows from steps {sorted(found, key=str)}; filter to one step per arm")
    if empty := [arm for arm, c in cells.items() if not c]:
        raise DataError(f"no rows of arm(s) {', '.join(empty)}: nothing to compare")
    seeds = {arm: sorted({k[0] for k in c}, key=_order_one) for arm, c in cells.items()}
    if seeds[treatment] != seeds[control]:
        raise DataError(f"arms ran different seeds ({treatment}: {seeds[treatment]}, {control}: "
                        f"{seeds[control]}); a paired comparison needs the same seeds in both arms")
    problems = {arm: {k[1:] for k in c} for arm, c in cells.items()}
    complete = {arm: {q for q in problems[arm] if all((s,) + q in cells[arm] for s in seeds[arm])}
                for arm in cells}
    shared = sorted(complete[treatment] & complete[control], key=str)
    if not shared:
        raise DataError(f"arms '{treatment}' and '{control}' share no problems")
    acc = {arm: np.array([[cells[arm][(s,) + q]["c"] / cells[arm][(s,) + q]["n"] for q in shared]
                          for s in seeds[arm]]) for arm in cells}

    n = {arm: np.array([[cells[arm][(s,) + q]["n"] for q in shared] for s in seeds[arm]], dtype=float)
         for arm in cells}

    def var_of_mean(arm: str) -> np.ndarray:  # (k/(k-1)) acc (1-acc) / k
        return np.where(n[arm] > 1, acc[arm] * (1 - acc[arm]) / np.maximum(n[arm] - 1, 1), 0.0)

    ks = {int(k) for arm in cells for k in n[arm].ravel()}

    first = {q: cells[treatment][(seeds[treatment][0],) + q]["domain"] for q in shared}
    return PairedGrid(treatment=treatment, control=control, seeds=seeds[treatment], problems=shared,
                      strata=[q[0] if stratum == "suite" else first[q] for q in shared],
                      diff=acc[treatment] - acc[control], sampling_var=var_of_mean(treatment) + var_of_mean(control),
                      samples=ks.pop() if len(ks) == 1 else None,
                      only_treatment=len(problems[treatment] - set(shared)),
                      only_control=len(problems[control] - set(shared)))


def _order_one(value: Any) -> tuple:
    return _order([value])


def paired_bootstrap(rows: Sequence[Row], treatment: str, control: str, resamples: int = 1000, seed: int = 0,
                     alpha: float = 0.05, stratum: str | None = "suite", macro: bool = False) -> Row:
    """Δ = accuracy(treatment) - accuracy(control) on shared problems, with a bootstrap CI that covers both the
    problems and the seeds (rows of one seed: the usual paired bootstrap over problems).

    Δ on the data: with macro=False (pooled) the mean of diff[s, p] over seeds and problems (each problem weighs
    the same); with macro=True the mean over strata of each stratum's pooled Δ (each stratum weighs the same; the
    research table's macro over domains). Resampling (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat.
    1(2):386-411, for two crossed random factors; the two-stage scheme of Davison & Hinkley 1997, Bootstrap Methods
    and their Application, §3.8): draw the seeds with replacement, draw the problems with replacement (within each
    stratum, so stratum sizes stay fixed, as in the held-out design), and take the Δ of the drawn seeds x problems;
    both arms get the same draws (paired). With one seed no seed draw is made, so the result equals the classic
    paired bootstrap over problems.

    Returns: delta, lo/hi (the alpha/2, 1-alpha/2 percentiles of the resampled Δ), se (their standard deviation),
    p_le_0 (share of resamples with Δ <= 0), per_seed [{seed, delta}], seeds, problems, only_treatment,
    only_control, weighting ('pooled' | 'macro over <stratum>'), resamples, seed. All Δs are fractions (0.01 = 1 pp).
    Raises DataError as paired_grid does, and when macro is asked without a stratum."""
    if macro and stratum is None:
        raise DataError("a macro average needs a stratum (suite or domain)")
    grid = paired_grid(rows, treatment, control, stratum or "suite")
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, s in enumerate(grid.strata):
        groups[s if stratum else None].append(i)
    n_seeds, n_problems = grid.diff.shape
    weights = {k: 1.0 / (len(groups) * len(idx)) if macro else 1.0 / n_problems for k, idx in groups.items()}
    rng = np.random.default_rng(seed)
    per_seed_totals = np.zeros((n_seeds, resamples))  # per seed: the weighted sum over the drawn problems
    for k, idx in groups.items():
        values = grid.diff[:, idx]
        picks = rng.integers(0, len(idx), size=(resamples, len(idx)))
        per_seed_totals += weights[k] * values[:, picks].sum(axis=2)
    if n_seeds > 1:
        seed_picks = rng.integers(0, n_seeds, size=(resamples, n_seeds))
        deltas = per_seed_totals[seed_picks, np.arange(resamples)[:, None]].mean(axis=1)
    else:
        deltas = per_seed_totals[0]
    w = np.array([weights[s if stratum else None] for s in grid.strata])
    per_seed = grid.diff @ w
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return {"treatment": treatment, "control": control, "problems": n_problems, "seeds": grid.seeds,
            "only_treatment": grid.only_treatment, "only_control": grid.only_control,
            "delta": float(per_seed.mean()), "lo": float(lo), "hi": float(hi), "se": float(deltas.std(ddof=1)),
            "p_le_0": float(np.mean(deltas <= 0)),
            "per_seed": [{"seed": s, "delta": float(d)} for s, d in zip(grid.seeds, per_seed)],
            "weighting": f"macro over {stratum}" if macro else "pooled", "resamples": resamples, "seed": seed}


def minimum_detectable_delta(grid: PairedGrid, alpha: float = 0.05, power: float = 0.8,
                             se: float | None = None) -> Row:
    """The smallest true Δ (pooled over problems) this design detects with probability `power` in a two-sided
    test at level `alpha`: MDE = (z_{1-alpha/2} + z_{power}) * SE (Bloom 1995, "Minimum detectable effects",
    Evaluation Review 19(5):547-556; 2.80 * SE at 0.05 / 80 %).

    SE comes from the measured variance of diff[s, p] in a crossed seeds x problems design (a generalizability
    D-study, Brennan 2001, Generalizability Theory, ch. 4): two-way ANOVA mean squares MS_seed, MS_problem,
    MS_resid give sigma2_seed = max(0, (MS_seed - MS_resid) / P), sigma2_problem = max(0, (MS_problem - MS_resid)
    / S), sigma2_resid = MS_resid, and Var(Δ) = sigma2_seed / S + sigma2_problem / P + sigma2_resid / (S P). The
    samples per problem enter through the residual (and, with one seed, the problem) variance; `sampling` is the
    part of it that k samples per problem explain (mean of grid.sampling_var). With one seed the seed variance is
    not estimable: Var(Δ) = var_p(diff) / P, and seed_variance_estimated is False.

    Pass `se` (e.g. paired_bootstrap's se, the spread of the very CI a reader decides by) to size the MDE by the
    test actually used: the seeds x problems bootstrap counts the residual variance in both resamplings and is
    conservative with few seeds (Owen 2007 §3), so its MDE is larger. se_components is always the D-study SE.

    Returns (fractions, 0.01 = 1 pp): mde, se (the one used), se_components, se_source ('bootstrap' when given,
    else 'components'), z (the multiplier), alpha, power, seeds S, problems P, samples (grid.samples),
    sigma2_seed and sigma2_resid (None with one seed), sigma2_problem, sampling, seed_variance_estimated.
    Raises DataError with fewer than 2 problems."""
    d = grid.diff
    n_seeds, n_problems = d.shape
    if n_problems < 2:
        raise DataError(f"a variance needs at least 2 shared problems, got {n_problems}")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    sampling = float(grid.sampling_var.mean())
    if n_seeds == 1:
        sigma2_problem = float(d[0].var(ddof=1))
        var = sigma2_problem / n_problems
        comps = {"sigma2_seed": None, "sigma2_problem": sigma2_problem, "sigma2_resid": None}
    else:
        mean = d.mean()
        seed_means, problem_means = d.mean(axis=1), d.mean(axis=0)
        ms_seed = n_problems * float(((seed_means - mean) ** 2).sum()) / (n_seeds - 1)
        ms_problem = n_seeds * float(((problem_means - mean) ** 2).sum()) / (n_problems - 1)
        resid = d - seed_means[:, None] - problem_means[None, :] + mean
        ms_resid = float((resid ** 2).sum()) / ((n_seeds - 1) * (n_problems - 1))
        comps = {"sigma2_seed": max(0.0, (ms_seed - ms_resid) / n_problems),
                 "sigma2_problem": max(0.0, (ms_problem - ms_resid) / n_seeds), "sigma2_resid": ms_resid}
        var = (comps["sigma2_seed"] / n_seeds + comps["sigma2_problem"] / n_problems
               + ms_resid / (n_seeds * n_problems))
    used = math.sqrt(var) if se is None else se
    return {"mde": z * used, "se": used, "se_components": math.sqrt(var),
            "se_source": "components" if se is None else "bootstrap", "z": z, "alpha": alpha, "power": power, "seeds": n_seeds,
            "problems": n_problems, "samples": grid.samples, **comps, "sampling": sampling, "seed_variance_estimated": n_seeds > 1}


def _check_margin(margin: Any, what: str, zero_ok: bool) -> None:
    """Raises ValueError unless `margin` is None or a real number (not a bool) in [0, 1) (zero_ok) or (0, 1): a
    difference of accuracies lies in [-1, 1], so a margin of 1 or more, or NaN, decides every comparison alike."""
    low = "≥ 0" if zero_ok else "> 0"
    if margin is None:
        return
    if isinstance(margin, (bool, np.bool_)) or not isinstance(margin, numbers.Real) or math.isnan(margin):
        raise ValueError(f"{what} must be a number {low} and < 1 (a fraction of accuracy), got {margin!r}")
    if margin < 0 or (margin == 0 and not zero_ok) or margin >= 1:
        raise ValueError(f"{what} must be {low} and < 1 (a fraction of accuracy), got {margin}")


def interval_reading(lo: float, hi: float, margin: float | None) -> str:
    """What a CI [lo, hi] of Δ says, never nothing: 'better' (lo > 0), 'worse' (hi < 0), 'equivalent' (the CI
    holds 0 and lies strictly inside (-margin, +margin): two one-sided tests, Schuirmann 1987, J. Pharmacokinet.
    Biopharm. 15(6):657-680, here on the report's (1 - alpha) interval, i.e. at level alpha/2 per side, a
    conservative TOST; Lakens 2017, Soc. Psychol. Personal. Sci. 8(4):355-362), else 'inconclusive' (also when no
    margin is declared). Raises ValueError when lo > hi, or for a margin that is not a number in (0, 1)."""
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] has lo > hi")
    _check_margin(margin, "equivalence margin", zero_ok=False)
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    if margin is not None and -margin < lo and hi < margin:
        return "equivalent"
    return "inconclusive"


# ---------------------------------------------------------------- Simpson check

def _sign(x: float, tol: float = 1e-12) -> int:
    return 0 if abs(x) <= tol else (1 if x > 0 else -1)


def simpson(strata: Sequence[Row], margin: float | None = None) -> Row:
    """Simpson check of one treatment/control comparison split into strata, under the headline's weighting.

    Each stratum: {stratum, n_t, acc_t_sum, n_c, acc_c_sum}: the problems each arm answered in the stratum and the
    sum of their per-problem accuracies (a problem with one sample contributes 0 or 1). Computed:
      headline = sum acc_t_sum / sum n_t - sum acc_c_sum / sum n_c   (each problem weighs the same: the headline Δ)
      delta_s  = acc_t_sum/n_t - acc_c_sum/n_c                        per stratum
    flag is True when some stratum's delta has the strict sign opposite to the headline's (signs with a 1e-12
    tolerance; a stratum at exactly 0 opposes nothing). With an equivalence margin (a fraction, e.g. 0.05 =
    5 pp: eval.equivalence_margin), a stratum opposes only when its delta is beyond the margin (|delta| > margin):
    a stratum within ±margin is equivalent to 0 by the verdict's own reading (TOST), so it reverses nothing.
    kind is 'reversal' when every stratum opposes it (Simpson's paradox proper, possible when the arms' problem
    mixes differ), 'disagreement' when some do (the headline averages strata that go opposite ways), else None.
    Raises DataError on an empty list or a stratum where an arm has no problem, ValueError for a margin that is
    not a number in [0, 1) (NaN would silence every stratum, ≥ 1 every possible one)."""
    _check_margin(margin, "Simpson check: margin", zero_ok=True)
    table = []
    for s in strata:
        if min(s["n_t"], s["n_c"]) <= 0:
            raise DataError(f"stratum {s['stratum']!r}: both arms need problems (n_t={s['n_t']}, n_c={s['n_c']})")
        table.append({**s, "acc_t": s["acc_t_sum"] / s["n_t"], "acc_c": s["acc_c_sum"] / s["n_c"],
                      "delta": s["acc_t_sum"] / s["n_t"] - s["acc_c_sum"] / s["n_c"]})
    if not table:
        raise DataError("Simpson check needs at least one stratum")
    headline = (sum(s["acc_t_sum"] for s in table) / sum(s["n_t"] for s in table)
                - sum(s["acc_c_sum"] for s in table) / sum(s["n_c"] for s in table))
    sign = _sign(headline)
    against = [s for s in table if sign and _sign(s["delta"]) == -sign and abs(s["delta"]) > (margin or 0)]
    kind = None if not against else "reversal" if len(against) == len(table) else "disagreement"
    reason = "" if not against else (
        f"headline Δ {headline:+.4f} has the opposite sign of "
        + ("every stratum" if kind == "reversal" else f"{len(against)} of {len(table)} strata") + " ("
        + ", ".join(f"{s['stratum']} {s['delta']:+.4f}" for s in against) + ")"
        + ("" if margin is None else f" beyond the margin ±{margin:g}"))
    return {"headline": float(headline), "flag": bool(against), "kind": kind, "reason": reason, "strata": table,
            "margin": margin}


def simpson_check(rows: Sequence[Row], treatment: str, control: str, stratum: str = "suite",
                  margin: float | None = None) -> Row:
    """simpson() of two arms (each at one step) with problems grouped by a row field (suite, domain, quartile,
    ...): per-problem accuracies, seeds pooled as samples; `margin` as in simpson(). Raises DataError when a
    problem's stratum changes between its rows, an arm is at several steps, or the arms are the same."""
    _require(rows, (stratum,))
    _distinct(treatment, control)
    where: dict[tuple, Any] = {}
    for i, row in enumerate(rows):
        key = (row["suite"], row["problem_id"])
        if where.setdefault(key, row[stratum]) != row[stratum]:
            raise DataError(f"sample row {i}: field '{stratum}': problem {key[0]}/{key[1]} is in stratum "
                            f"{where[key]!r} in an earlier row and {row[stratum]!r} here")
    counts: dict[Any, dict[str, float]] = defaultdict(lambda: {"n_t": 0, "acc_t_sum": 0.0, "n_c": 0,
                                                               "acc_c_sum": 0.0})
    steps: dict[str, set] = defaultdict(set)
    for (arm, step, suite, pid), p in _problems(rows).items():
        side = {treatment: "t", control: "c"}.get(arm)
        if side:
            steps[arm].add(step)
            counts[where[(suite, pid)]][f"n_{side}"] += 1
            counts[where[(suite, pid)]][f"acc_{side}_sum"] += p["c"] / p["n"]
    for arm, found in steps.items():
        if len(found) > 1:
            raise DataError(f"arm '{arm}' has rows from steps {sorted(found, key=str)}; filter to one step per arm")
    return {"treatment": treatment, "control": control, "by": stratum,
            **simpson([{"stratum": k, **v} for k, v in sorted(counts.items(), key=lambda kv: _order([kv[0]]))],
                      margin)}


def quartile_simpson(rows: Sequence[Row], treatment: str, control: str,
                     difficulty_rows: Sequence[Row] | None = None, margin: float | None = None) -> Row:
    """simpson_check across equal-count difficulty quartiles (`margin` as in simpson()). Pass the rows the
    headline Δ is computed on (the compared steps, the shared problems) so that the headline here is that Δ.
    Quartiles are cut by problem_difficulty on difficulty_rows (default: rows), e.g. every arm's rows, so that they
    are the quartile table's; a problem of rows missing from difficulty_rows raises DataError."""
    quartile = {(d["suite"], d["problem_id"]): d["quartile"]
                for d in problem_difficulty(rows if difficulty_rows is None else difficulty_rows)}
    absent = sorted({(r["suite"], r["problem_id"]) for r in rows} - set(quartile), key=str)
    if absent:
        raise DataError(f"difficulty rows lack {len(absent)} problem(s) of the compared rows, e.g. "
                        f"{absent[0][0]}/{absent[0][1]}")
    return simpson_check([{**r, "quartile": quartile[(r["suite"], r["problem_id"])]} for r in rows], treatment,
                         control, stratum="quartile", margin=margin)


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
