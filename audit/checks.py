"""The checks of the matched-ness ledger (DESIGN §9), one function each, in ledger order (CHECKS).

A check reads one ablation flow run from lineage (Scope), and returns ✓ verified, ✗ violated or ☐ open with the
SQL it ran and the values it saw. A check that lacks what it needs is ☐ and says what is missing: never ✓ by
default. Where lineage only points at data (twin datasets, held-out suites, training sets), the check reads the
files behind the artifact uris, so data changed after its stage recorded a verdict is judged as it is now.
"""
from __future__ import annotations

import json
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import combinations, product
from typing import Any, Callable, Literal

from infra.artifacts import read_parquet, uri_path
from infra.errors import TwinarmError
from infra.lineage import Lineage, sql_literal
from infra.roles import CheckpointRole, SuiteRole
from infra.spec import AblationSpec, config_diff, contrast_mechanisms, declared_keys, load_spec, mechanisms_of

Status = Literal["✓", "✗", "☐"]
PASS: Status = "✓"
FAIL: Status = "✗"
OPEN: Status = "☐"

GRADER_IDENTITY = ("grader_version", "config", "call_path")  # not the counters: they differ by design
LISTED = 8  # items named in a summary before "and N more"
MAX_PRODUCER_PAIRS = 16  # producer pairs tried per artifact pair (equal content written by several runs/roles)


@dataclass(frozen=True)
class Evidence:
    query: str  # SQL over the lineage DuckDB, runnable as is with `twinarm lineage`
    values: Any  # the rows it returned (JSON columns decoded)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    summary: str
    evidence: list[Evidence] = field(default_factory=list)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _short(value: Any, width: int = 60) -> str:
    text = _canon(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _listed(items: list[str]) -> str:
    more = len(items) - LISTED
    return "; ".join(items[:LISTED]) + (f"; and {more} more" if more > 0 else "")


def sql_in(values: tuple[str, ...]) -> str:
    """The body of a SQL IN list of string literals (NULL for an empty list, which matches nothing)."""
    return ", ".join(map(sql_literal, values)) or "NULL"


def label(arm: str, seed: int | None) -> str:
    return arm if seed is None else f"{arm}/seed{seed}"


@dataclass
class Scope:
    """The flow run under audit: its ablation, its flow run id and the arms it resolved (in order)."""

    lineage: Lineage
    ablation: str
    flow_run_id: str | None
    arms: list[str]

    def on(self, alias: str = "r") -> str:
        """SQL condition: a runs row (under alias) belongs to this flow run."""
        flow = f"{alias}.flow_run_id IS NULL" if self.flow_run_id is None else \
            f"{alias}.flow_run_id = {sql_literal(self.flow_run_id)}"
        return f"{alias}.ablation = {sql_literal(self.ablation)} AND {flow}"

    def ask(self, sql: str) -> Evidence:
        rows = self.lineage.rows(sql)
        return Evidence(sql, [{k: json.loads(v) if k.endswith("_json") and isinstance(v, str) else v
                               for k, v in row.items()} for row in rows])

    def facts(self, stages: tuple[str, ...], names: tuple[str, ...]) -> Evidence:
        """Facts of the flow's completed runs of some stages, one row per run and fact."""
        return self.ask(
            "SELECT r.stage, r.arm, r.seed, f.name, f.value_json FROM runs r JOIN facts f ON f.run_id = r.run_id "
            f"WHERE {self.on()} AND r.status = 'completed' AND r.stage IN ({sql_in(stages)}) "
            f"AND f.name IN ({sql_in(names)}) ORDER BY r.stage, r.arm, r.seed, f.name")

    @cached_property
    def declared(self) -> dict[str, dict[str, Any]]:
        """Each stage's declaration as its completed runs recorded it (the run fact `stage`, written from
        tasks.common.Stage.declaration): {stage: {per_arm, trains, inputs, outputs, config_keys}}."""
        ev = self.ask("SELECT DISTINCT r.stage, f.value_json FROM runs r JOIN facts f ON f.run_id = r.run_id "
                      f"WHERE {self.on()} AND r.status = 'completed' AND f.name = 'stage' ORDER BY r.stage")
        return {row["stage"]: row["value_json"] for row in ev.values}

    def stages(self, flag: str) -> tuple[str, ...]:
        """The stages whose declaration sets `flag` (per_arm, trains), sorted."""
        return tuple(sorted(s for s, d in self.declared.items() if d.get(flag)))

    @cached_property
    def spec(self) -> tuple[AblationSpec | None, str, Evidence]:
        """The spec the flow resolved its arms from (its stored copy), or None and why not."""
        ev = self.ask("SELECT DISTINCT a.artifact_id, a.uri FROM runs r JOIN edges e ON e.run_id = r.run_id "
                      "AND e.direction = 'in' AND e.role = 'spec' JOIN artifacts a ON a.artifact_id = e.artifact_id "
                      f"WHERE {self.on()} AND r.stage = 'resolve'")
        if len(ev.values) != 1:
            return None, f"expected one spec artifact among the resolve runs' inputs, found {len(ev.values)}", ev
        try:
            return load_spec(uri_path(ev.values[0]["uri"])), "", ev
        except (TwinarmError, ValueError) as exc:
            return None, f"cannot load the stored spec: {exc}", ev

    @cached_property
    def config_diff(self) -> tuple[list[dict[str, Any]], Evidence]:
        """The first law's table: every resolved-config key whose value differs between the flow's arms, with
        each arm's value, the arms whose overrides declare it, and its mechanism."""
        ev = self.ask(
            "WITH c AS (SELECT c.arm, c.key, c.value_json FROM run_config c JOIN runs r ON r.run_id = c.run_id "
            f"WHERE {self.on()} AND r.stage = 'resolve' AND r.status = 'completed'), "
            "n AS (SELECT count(DISTINCT arm) AS arms FROM c) "
            "SELECT key, arm, value_json FROM c WHERE key IN (SELECT key FROM c GROUP BY key "
            "HAVING count(DISTINCT value_json::VARCHAR) > 1 OR count(*) < (SELECT arms FROM n)) ORDER BY key, arm")
        spec = self.spec[0]
        values: dict[str, dict[str, Any]] = defaultdict(dict)
        for row in ev.values:
            values[row["key"]][row["arm"]] = row["value_json"]
        table = [{"key": key, **{arm: values[key].get(arm) for arm in self.arms},
                  "declared_by": [] if spec is None else [a for a in self.arms if a in spec.arms and
                                                          _declares(spec.arms[a].overrides, key)],
                  "mechanism": ", ".join(mechanisms_of(key, tuple(v for v in values[key].values() if v is not None)))}
                 for key in sorted(values)]
        return table, ev


def _declares(overrides: dict[str, Any], key: str) -> bool:
    """An override names a leaf key when it is the key, a section above it, or (a section set to null) below it."""
    return any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overrides)


def _by_run(ev: Evidence) -> dict[tuple[str, str, int | None], dict[str, Any]]:
    """(stage, arm, seed) -> {fact name: value} from a Scope.facts evidence."""
    out: dict[tuple[str, str, int | None], dict[str, Any]] = defaultdict(dict)
    for row in ev.values:
        out[row["stage"], row["arm"], row["seed"]][row["name"]] = row["value_json"]
    return out


def _per_arm(scope: Scope, ev: Evidence, stage: str, names: tuple[str, ...]
             ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The stage's facts per arm/seed label, and what is missing: an arm without a completed run of the stage,
    or a run without one of the facts (null counts as missing)."""
    runs = {label(arm, seed): facts for (st, arm, seed), facts in _by_run(ev).items() if st == stage}
    missing = [f"{arm}: no completed {stage} run with facts" for arm in scope.arms
               if not any(key.split("/")[0] == arm for key in runs)]
    missing += [f"{key}: {stage} fact {name}" for key, facts in runs.items() for name in names
                if facts.get(name) is None]
    return runs, missing


def _differences(values: dict[str, Any], per_step: bool = False) -> str:
    """How values that should be equal differ: each value with the labels that have it, or for per-step lists
    the first step where they differ."""
    lists = [v for v in values.values() if isinstance(v, list)]
    if per_step and len(lists) == len(values):
        first = next((i for i in range(max(map(len, lists))) if len({_canon(v[i:i + 1]) for v in lists}) > 1), None)
        if first is not None:
            at = [f"{k}={_short(v[first]) if first < len(v) else 'no step'}" for k, v in values.items()]
            return f"from step {first + 1} ({' vs '.join(at)})"
    groups: dict[str, tuple[Any, list[str]]] = {}
    for key, value in values.items():
        groups.setdefault(_canon(value), (value, []))[1].append(key)
    return " vs ".join(f"{', '.join(keys)}={_short(value)}" for value, keys in groups.values())


def _open(name: str, missing: list[str], evidence: list[Evidence]) -> Check:
    return Check(name, OPEN, "missing: " + _listed(missing), evidence)


def _too_few_arms(scope: Scope, name: str) -> Check | None:
    if len(scope.arms) < 2:
        return Check(name, OPEN, f"the flow run resolved {len(scope.arms)} arm(s) ({', '.join(scope.arms)}): "
                                 "nothing to compare", [])
    return None


# ---------------------------------------------------------------- the checks

# ---------------------------------------------------------------- the second law

ARM_PLACEHOLDER = "{arm}"


def role_key(role: str, arm: str) -> str:
    """A role as compared across arms: a checkpoint role of `arm` names {arm} instead, so arm A's
    `checkpoint:A:0:6` is compared with arm B's `checkpoint:B:0:6` (seed and step stay: like with like)."""
    ref = CheckpointRole.parse(role)
    return str(CheckpointRole(ARM_PLACEHOLDER, ref.seed, ref.step)) if ref and ref.arm == arm else role


def _bound_arm(role: str, arms: list[str]) -> str | None:
    """The arm a role names (a checkpoint of that arm), or None for a role every arm shares (val, prompts...)."""
    ref = CheckpointRole.parse(role)
    return ref.arm if ref and ref.arm in arms else None


def _bound_seed(role: str, arm: str) -> int | None:
    """The seed a checkpoint role of `arm` names, else None."""
    ref = CheckpointRole.parse(role)
    return ref.seed if ref and ref.arm == arm else None


@dataclass(frozen=True)
class Producer:
    """A completed run that wrote an artifact, with what the second law compares of it."""

    run_id: str
    stage: str
    arm: str
    seed: int | None
    in_flow: bool
    code_version: str
    config: dict[str, Any]
    role: str  # the output role the artifact has in this run


@dataclass(frozen=True)
class Divergence:
    """Where two artifacts that should be one first differ without a declared explanation."""

    a: str
    b: str
    why: str
    path: tuple[str, ...] = ()  # the input roles walked up from the compared inputs to a and b


class SecondLaw:
    """The second law (DESIGN §9) over one flow run. Every input edge of every stage run that serves an arm is
    compared with the same role's input in every other arm (roles that name an arm compared with the arm
    replaced, per seed). Two different artifacts are explained only when lineage derives them from a declared
    difference, walking up from the two artifacts in step:
      - the same run made them as the twin sides of one source (`<source>_meta` / `<source>_nometa`), chosen by
        sft.strip_meta, which differs between the arms and is declared by one of them, and the two files are
        row-for-row twins (sft.twins.pairing_problem);
      - two runs of the same stage made them under the same output role, their configs differ only in keys the
        two arms declare (infra.spec.declared_keys; never in `seed`), and each differing input of theirs is in
        turn explained; identical configs and inputs with different outputs are not explained.
    Anything else is a divergence: the first (closest to the compared inputs) pair of ancestors that differ
    for another reason, such as an artifact no run made, outputs of different stages or roles, or an undeclared
    config key."""

    def __init__(self, scope: Scope):
        self.scope = scope
        ablation = sql_literal(scope.ablation)
        self.inputs = scope.ask(
            "SELECT r.run_id, r.stage, r.arm, r.seed, e.role, e.artifact_id, r.started_at FROM runs r JOIN edges e "
            f"ON e.run_id = r.run_id AND e.direction = 'in' WHERE {scope.on()} AND r.status = 'completed' "
            "AND r.stage <> 'resolve' ORDER BY r.started_at, r.stage, r.arm, r.seed, e.role")
        self.producers_ev = scope.ask(
            "SELECT e.artifact_id, e.role, r.run_id, r.stage, r.arm, r.seed, r.flow_run_id, r.code_version, "
            "r.config_json FROM edges e JOIN runs r ON r.run_id = e.run_id AND e.direction = 'out' "
            f"WHERE r.ablation = {ablation} AND r.status = 'completed' ORDER BY e.artifact_id, r.run_id")
        self.parents_ev = scope.ask(
            "SELECT e.run_id, e.role, e.artifact_id FROM edges e JOIN runs r ON r.run_id = e.run_id "
            f"AND e.direction = 'in' WHERE r.ablation = {ablation} AND r.status = 'completed' "
            "ORDER BY e.run_id, e.role")
        self.evidence = [self.inputs, self.producers_ev, self.parents_ev]
        self.producers: dict[str, list[Producer]] = defaultdict(list)
        for row in self.producers_ev.values:
            self.producers[row["artifact_id"]].append(Producer(
                row["run_id"], row["stage"], row["arm"], row["seed"], row["flow_run_id"] == scope.flow_run_id,
                row["code_version"], row["config_json"], row["role"]))
        self.run_inputs: dict[str, dict[str, str]] = defaultdict(dict)
        for row in self.parents_ev.values:
            self.run_inputs[row["run_id"]][row["role"]] = row["artifact_id"]
        self.spec = scope.spec[0]
        self.config_rows = {row["key"]: row for row in scope.config_diff[0]}
        self.explained: Counter[str] = Counter()  # declared differences that explained an input difference
        self.missing: list[str] = []
        self._memo: dict[tuple, Divergence | None] = {}
        self._twins: dict[tuple[str, str], str | None] = {}

    # ------------------------------------------------------------ what each arm read

    def views(self) -> dict[tuple[str, int | None], dict[str, dict[str, set[str]]]]:
        """(stage, seed) -> arm -> role key -> artifact ids the arm's runs of that stage read under it. The seed is
        the run's, or for a shared run (held-out) the one its arm-bound role names (None for shared inputs)."""
        arms = self.scope.arms
        out: dict[tuple[str, int | None], dict[str, dict[str, set[str]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(set)))
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.inputs.values:
            by_run[row["run_id"]].append(row)
        for rows in by_run.values():
            run = rows[0]
            members = arms if run["arm"] == "*" else [a for a in run["arm"].split("+") if a in arms]
            bound = {_bound_arm(r["role"], arms) for r in rows} - {None}
            for arm in members:
                if bound and arm not in bound:
                    continue  # a shared run that read other arms' checkpoints, none of this arm's
                for r in rows:
                    if _bound_arm(r["role"], arms) in (None, arm):  # seeds compared like with like
                        seed = run["seed"] if run["seed"] is not None else _bound_seed(r["role"], arm)
                        out[run["stage"], seed][arm][role_key(r["role"], arm)].add(r["artifact_id"])
        return out

    # ------------------------------------------------------------ explaining a difference

    def _producers(self, artifact: str, arm: str) -> list[Producer]:
        """The runs that wrote an artifact (equal content can come from several), this flow's and the arm's first."""
        return sorted(self.producers.get(artifact, []), key=lambda p: (
            not p.in_flow, p.arm not in ("*", arm) and arm not in p.arm.split("+"), p.run_id))

    def _declared(self, arm_a: str, arm_b: str) -> set[str] | None:
        if self.spec is None:
            return None
        return declared_keys(self.spec, arm_a) | declared_keys(self.spec, arm_b)

    def _twin_sides(self, a: str, b: str, pa: Producer, pb: Producer, arm_a: str, arm_b: str) -> str | None:
        """None when a and b are the two twin sides the arms' sft.strip_meta chose, else why not."""
        from sft.twins import pairing_problem, twin_side

        row = self.config_rows.get("sft.strip_meta")
        if row is None or _canon(row.get(arm_a)) == _canon(row.get(arm_b)):
            return "sft.strip_meta is the same in both arms"
        if not {arm_a, arm_b} & set(row["declared_by"]):
            return "sft.strip_meta differs but neither arm declares it"
        source_a, _, side_a = pa.role.rpartition("_")
        source_b, _, side_b = pb.role.rpartition("_")
        if (source_a != source_b or side_a != twin_side(bool(row[arm_a]))
                or side_b != twin_side(bool(row[arm_b]))):
            return (f"outputs `{pa.role}` and `{pb.role}` are not the {twin_side(bool(row[arm_a]))}/"
                    f"{twin_side(bool(row[arm_b]))} twin sides sft.strip_meta chooses")
        key = (a, b) if side_a == "meta" else (b, a)
        if key not in self._twins:
            uris = {r["artifact_id"]: r["uri"] for r in self.scope.ask(
                "SELECT artifact_id, uri FROM artifacts WHERE artifact_id IN "
                f"({', '.join(map(sql_literal, key))})").values}
            try:
                self._twins[key] = pairing_problem(read_parquet(uri_path(uris[key[0]])),
                                                   read_parquet(uri_path(uris[key[1]])))
            except (OSError, ValueError, KeyError, TwinarmError) as exc:
                self.missing.append(f"cannot read the twin files {key[0]}, {key[1]} ({exc})")
                self._twins[key] = None
        if problem := self._twins[key]:
            return f"the twin sides are not row-for-row twins: {problem}"
        self.explained[f"twin side of {source_a} (sft.strip_meta)"] += 1
        return None

    def explain(self, a: str, b: str, arm_a: str, arm_b: str) -> Divergence | None:
        """None when artifacts a (read by arm_a) and b (read by arm_b) are equal or lineage explains their
        difference; else the first divergence walking up from them (memoised per pair)."""
        if a == b:
            return None
        key = (a, b, arm_a, arm_b)
        if key not in self._memo:
            self._memo[key] = Divergence(a, b, "lineage cycle")  # never read back unless lineage has a cycle
            self._memo[key] = self._explain(a, b, arm_a, arm_b)
        return self._memo[key]

    def _explain(self, a: str, b: str, arm_a: str, arm_b: str) -> Divergence | None:
        ca, cb = self._producers(a, arm_a), self._producers(b, arm_b)
        if not ca or not cb:
            nobody = [f"{arm}'s {x}" for arm, x, c in ((arm_a, a, ca), (arm_b, b, cb)) if not c]
            return Divergence(a, b, f"{' and '.join(nobody)} was made by no run in lineage")
        # equal content can be written by several runs, or by one run under several roles (a checkpoint that did
        # not change between saves): any pair may explain it; the likeliest pair (same stage, same role) speaks
        # for the difference when none does
        pairs = sorted(product(ca, cb), key=lambda p: (p[0].stage != p[1].stage,
                                                       role_key(p[0].role, arm_a) != role_key(p[1].role, arm_b),
                                                       not (p[0].in_flow and p[1].in_flow)))
        first = None
        for pa, pb in pairs[:MAX_PRODUCER_PAIRS]:
            found = self._explain_by(a, b, pa, pb, arm_a, arm_b)
            if found is None:
                return None
            first = first or found
        return first

    def _explain_by(self, a: str, b: str, pa: Producer, pb: Producer, arm_a: str, arm_b: str) -> Divergence | None:
        from sft.twins import twin_side

        if pa.stage != pb.stage:
            return Divergence(a, b, f"made by different stages ({pa.stage} vs {pb.stage})")
        if pa.run_id == pb.run_id:
            if pa.role.rpartition("_")[2] in (twin_side(True), twin_side(False)):
                why = self._twin_sides(a, b, pa, pb, arm_a, arm_b)
                return None if why is None else Divergence(a, b, f"{pa.stage} run {pa.run_id}: {why}")
            return Divergence(a, b, f"outputs `{pa.role}` and `{pb.role}` of one {pa.stage} run {pa.run_id}")
        if role_key(pa.role, arm_a) != role_key(pb.role, arm_b):
            return Divergence(a, b, f"outputs `{pa.role}` vs `{pb.role}` of two {pa.stage} runs")
        declared = self._declared(arm_a, arm_b)
        if declared is None:
            self.missing.append("declared overrides unknown (no stored spec)")
            return None
        diff = config_diff(pa.config, pb.config)
        undeclared = sorted(k for k in diff if k == "seed" or k not in declared)
        runs = f"{pa.stage} runs {pa.run_id} ({label(pa.arm, pa.seed)}) and {pb.run_id} ({label(pb.arm, pb.seed)})"
        if undeclared:
            return Divergence(a, b, f"{runs} differ in undeclared config "
                                    + ", ".join(f"{k} ({_short(diff[k][0], 30)} vs {_short(diff[k][1], 30)})"
                                                for k in undeclared[:4]))
        ins_a = {role_key(r, arm_a): x for r, x in self.run_inputs[pa.run_id].items()
                 if _bound_arm(r, self.scope.arms) in (None, arm_a)}
        ins_b = {role_key(r, arm_b): x for r, x in self.run_inputs[pb.run_id].items()
                 if _bound_arm(r, self.scope.arms) in (None, arm_b)}
        if set(ins_a) != set(ins_b):
            return Divergence(a, b, f"{runs} read different input roles: "
                                    f"{sorted(set(ins_a) ^ set(ins_b))}")
        for role in sorted(ins_a):
            if (deeper := self.explain(ins_a[role], ins_b[role], arm_a, arm_b)) is not None:
                return replace(deeper, path=(f"{pa.stage} `{role}`", *deeper.path))
        if not diff and all(ins_a[r] == ins_b[r] for r in ins_a):
            code = "" if pa.code_version == pb.code_version else f", code {pa.code_version} vs {pb.code_version}"
            return Divergence(a, b, f"{runs} have the same config and inputs but different outputs{code}")
        for k in diff:
            self.explained[k] += 1
        return None

    # ------------------------------------------------------------ the check

    def run(self) -> Check:
        """Compare every (stage, seed) view of every pair of arms role by role; each divergence named once."""
        name = "second law: inputs differ only where lineage explains"
        if early := _too_few_arms(self.scope, name):
            return Check(early.name, early.status, early.summary, self.evidence)
        arms = self.scope.arms
        views = self.views()
        for stage in sorted({st for st, _ in views}):
            self.missing += [f"{arm}: no completed {stage} run read by it" for arm in arms
                             if not any(st == stage and arm in per for (st, _), per in views.items())]
        problems: list[str] = []
        compared = identical = 0
        reported: set[tuple[str, str]] = set()  # a divergence is named once, at the first input it reaches
        for (stage, seed), per in views.items():  # in the order the stages ran: divergences named where first read
            where = stage + (f"/seed{seed}" if seed is not None else "")
            for arm_a, arm_b in combinations([a for a in arms if a in per], 2):  # seeds one arm lacks: seeds check
                va, vb = per[arm_a], per[arm_b]
                for role in sorted(set(va) | set(vb)):
                    if role not in va or role not in vb:
                        has, lacks = (arm_a, arm_b) if role in va else (arm_b, arm_a)
                        problems.append(f"{where} `{role}`: read by {has}, not by {lacks}")
                        continue
                    compared += 1
                    identical += va[role] == vb[role]
                    for a in sorted(va[role] - vb[role]):
                        for b in sorted(vb[role] - va[role]):
                            d = self.explain(a, b, arm_a, arm_b)
                            if d is None or (d.a, d.b) in reported:
                                continue
                            reported.add((d.a, d.b))
                            at = (" they diverge here:" if (d.a, d.b) == (a, b)
                                  else f" first divergence at ancestors {d.a} vs {d.b} (via "
                                       f"{' → '.join(d.path)}):")
                            problems.append(f"{where} `{role}`: {arm_a} reads {a}, {arm_b} reads {b};{at} {d.why}")
        if problems:
            return Check(name, FAIL, "unexplained input differences: " + _listed(problems), self.evidence)
        if self.missing or not compared:
            return _open(name, list(dict.fromkeys(self.missing)) or ["no per-arm stage inputs to compare"],
                         self.evidence)
        because = ", ".join(f"{k} ({n})" for k, n in sorted(self.explained.items())) or "nothing"
        stages = ", ".join(sorted({st for st, _ in views}))
        return Check(name, PASS, f"{compared} input roles of {stages} compared across {', '.join(arms)} (per seed, "
                                 f"checkpoint roles with the arm replaced): {identical} identical, "
                                 f"{compared - identical} differ only through declared differences: {because}",
                     self.evidence)


def second_law(scope: Scope) -> Check:
    """The second law as one ledger check (see SecondLaw): ✓ when every input difference between arms is explained
    by lineage, ✗ naming each unexplained one, ☐ when an arm lacks a stage run or the stored spec is unreadable."""
    return SecondLaw(scope).run()


def same_grader(scope: Scope) -> Check:
    name = "same grader"
    ev = scope.facts(("rl", "sweep", "heldout"), ("grader",))
    runs = _by_run(ev)
    identity = {f"{stage} {label(arm, seed)}": {k: facts["grader"].get(k) for k in GRADER_IDENTITY}
                for (stage, arm, seed), facts in runs.items()}
    missing = [f"{arm}: rl grader" for arm in scope.arms if not any(s == "rl" and a == arm for s, a, _ in runs)]
    if any(s == "sweep" for s, _, _ in runs):  # sweeps are optional (eval.sweep); when run, every arm needs one
        missing += [f"{arm}: sweep grader" for arm in scope.arms if not any(s == "sweep" and a == arm
                                                                            for s, a, _ in runs)]
    if not any(s == "heldout" for s, _, _ in runs):
        missing.append("held-out grader (no completed held-out run with the fact)")
    common = Counter(_canon(v) for v in identity.values()).most_common(1)
    odd = {k: v for k, v in identity.items() if common and _canon(v) != common[0][0]}
    if odd:
        reference = json.loads(common[0][0])
        fields = sorted({f for v in odd.values() for f in GRADER_IDENTITY if _canon(v[f]) != _canon(reference[f])})
        return Check(name, FAIL, f"grader {', '.join(fields)} differs: " + _listed(
            [f"{k} {f}={_short(v[f], 80)}" for k, v in odd.items() for f in fields]) +
            f" (the other stages: {', '.join(f'{f}={_short(reference[f], 80)}' for f in fields)})", [ev])
    if missing:
        return _open(name, missing, [ev])
    ref = json.loads(common[0][0])
    return Check(name, PASS, f"{len(identity)} grading stages ({', '.join(identity)}) share grader version "
                             f"{ref['grader_version']} and call path {ref['call_path']}", [ev])


def first_law(scope: Scope) -> Check:
    name = "first law: configs differ only in declared keys"
    if early := _too_few_arms(scope, name):
        return early
    spec, why, spec_ev = scope.spec
    table, ev = scope.config_diff
    if spec is None:
        return Check(name, OPEN, f"declared overrides unknown: {why}", [spec_ev, ev])
    confounds = [f"{row['key']} ({a}={_short(row[a])}, {b}={_short(row[b])})" for a, b in combinations(scope.arms, 2)
                 for row in table if _canon(row[a]) != _canon(row[b]) and not {a, b} & set(row["declared_by"])]
    if confounds:
        return Check(name, FAIL, "undeclared differences (confounds): " + _listed(confounds), [spec_ev, ev])
    return Check(name, PASS, f"resolved configs of {', '.join(scope.arms)} differ only in declared keys: "
                             + (", ".join(row["key"] for row in table) or "none"), [spec_ev, ev])


def package_effect_lines(spec: AblationSpec, table: list[dict[str, Any]], arms: list[str]
                         ) -> dict[str, tuple[list[str], list[str]]]:
    """Per contrast between `arms`: (the mechanisms its arms' resolved configs differ in, the problems with its
    declared `mechanisms`) from infra.spec.contrast_mechanisms on `table` (the first law's rows). Only declared keys
    count: an undeclared difference is the first law's finding."""
    out = {}
    for c_name, c in spec.contrasts.items():
        if c.treatment not in arms or c.control not in arms:
            continue
        diff = {row["key"]: (row[c.treatment], row[c.control]) for row in table
                if _canon(row[c.treatment]) != _canon(row[c.control])
                and {c.treatment, c.control} & set(row["declared_by"])}
        out[c_name] = contrast_mechanisms(c_name, c, diff)
    return out


def package_effect_text(mechanisms: list[str]) -> str:
    """The mechanisms a contrast changes as the ledger words them."""
    return (", ".join(mechanisms) or "no mechanism") + (" (declared package effect)" if len(mechanisms) > 1 else "")


def package_effects(scope: Scope) -> Check:
    name = "package effects named"
    spec, why, spec_ev = scope.spec
    table, ev = scope.config_diff
    if spec is None:
        return Check(name, OPEN, f"contrasts unknown: {why}", [spec_ev])
    lines = package_effect_lines(spec, table, scope.arms)
    if not lines:
        return Check(name, OPEN, "no contrast between the flow's arms is declared, so no effect can be named",
                     [spec_ev, ev])
    if problems := [p for _, found in lines.values() for p in found]:
        return Check(name, FAIL, _listed(problems), [spec_ev, ev])
    return Check(name, PASS, "; ".join(f"contrast {n} ({spec.contrasts[n].treatment} − {spec.contrasts[n].control}): "
                                       f"{package_effect_text(mechanisms)}" for n, (mechanisms, _) in lines.items()),
                 [spec_ev, ev])


def _equal_facts(scope: Scope, name: str, stage_facts: tuple[tuple[str, str], ...], what: str) -> Check:
    """✓ when each (stage, fact) has one value across every arm's runs of the stage."""
    if early := _too_few_arms(scope, name):
        return early
    ev = scope.facts(tuple(dict.fromkeys(s for s, _ in stage_facts)), tuple(dict.fromkeys(f for _, f in stage_facts)))
    unequal, missing, seen = [], [], []
    for stage, fact in stage_facts:
        runs, lacking = _per_arm(scope, ev, stage, (fact,))
        missing += lacking
        values = {key: facts[fact] for key, facts in runs.items() if facts.get(fact) is not None}
        if len({_canon(v) for v in values.values()}) > 1:
            unequal.append(f"{stage} {fact} differs {_differences(values, fact.endswith('_per_step'))}")
        elif values:
            seen.append(f"{stage} {fact}={_short(next(iter(values.values())))}")
    if unequal:
        return Check(name, FAIL, _listed(unequal), [ev])
    if missing:
        return _open(name, missing, [ev])
    return Check(name, PASS, f"{what} equal across {', '.join(scope.arms)}: " + "; ".join(seen), [ev])


def advantage_normalisation(scope: Scope) -> Check:
    return _equal_facts(scope, "advantage normalisation applied alike", (("rl", "adv_norm_std_applied"),),
                        "advantage normalisation actually applied")


def schedules(scope: Scope) -> Check:
    return _equal_facts(scope, "save_freq and LR schedule per step",
                        (("sft", "lr_per_step"), ("rl", "lr_per_step"), ("rl", "save_freq")),
                        "LR per step and save_freq")


def corpus_sizes(scope: Scope) -> Check:
    return _equal_facts(scope, "corpus sizes equal", (("sft", "rows_seen"), ("rl", "rows_seen")),
                        "rows seen")


def control_zero_scorer_calls(scope: Scope) -> Check:
    from rewards.signals import get_signal

    name = "control arm made zero scorer calls"
    ev = scope.facts(("rl",), ("reward", "scorer_calls", "scorer_forwards"))
    runs, missing = _per_arm(scope, ev, "rl", ("reward",))
    free, calls = [], []
    for key, facts in runs.items():
        try:
            needs_scorer = "scorer" in get_signal(facts.get("reward", "")).needs
        except KeyError:
            missing.append(f"{key}: reward {facts.get('reward')!r} is not in the signal registry")
            continue
        if needs_scorer:
            continue
        counts = {f: facts.get(f) for f in ("scorer_calls", "scorer_forwards")}
        missing += [f"{key}: rl fact {f}" for f, v in counts.items() if v is None]
        free.append(f"{key} ({facts['reward']}): {counts['scorer_calls']} calls, {counts['scorer_forwards']} forwards")
        if any(v for v in counts.values()):
            calls.append(free[-1])
    if calls:
        return Check(name, FAIL, "a scorer-free reward used the scorer: " + _listed(calls), [ev])
    if missing:
        return _open(name, missing, [ev])
    if not free:
        return Check(name, OPEN, "no arm's reward is scorer-free: there is no control arm to check", [ev])
    return Check(name, PASS, _listed(free), [ev])


def control_zero_meta_rollouts(scope: Scope) -> Check:
    """An arm with MASA off (rl.masa.enable false, the run fact masa.enable) generated no meta-prediction
    rollout: the matched GRPO/DAPO control runs the identical code path with the MASA heads off."""
    name = "MASA-off arms made zero meta rollouts"
    ev = scope.facts(("rl",), ("masa",))
    runs, missing = _per_arm(scope, ev, "rl", ("masa",))
    off, made = [], []
    for key, facts in runs.items():
        masa = facts.get("masa")
        if masa is None:  # _per_arm listed it as missing
            continue
        if not isinstance(masa, dict) or "enable" not in masa or masa.get("meta_rollouts") is None:
            missing.append(f"{key}: rl fact masa.enable / masa.meta_rollouts")
            continue
        if masa["enable"]:
            continue
        off.append(f"{key}: {masa['meta_rollouts']} meta rollouts")
        if masa["meta_rollouts"]:
            made.append(off[-1])
    if made:
        return Check(name, FAIL, "an arm with MASA off generated meta-prediction rollouts: " + _listed(made), [ev])
    if missing:
        return _open(name, missing, [ev])
    if not off:
        return Check(name, OPEN, "every arm runs MASA: there is no MASA-off control to check", [ev])
    return Check(name, PASS, _listed(off), [ev])


def sft_twins(scope: Scope) -> Check:
    """The twins stage's own verdict (token-level masks) and a re-verification of the files the arms' SFT read."""
    from meta.grammar import META_CLOSE, META_OPEN
    from sft.twins import verify_twins

    name = "SFT twins 1:1"
    reports = scope.ask("SELECT r.run_id, r.config_json, f.name, f.value_json FROM runs r JOIN facts f "
                        f"ON f.run_id = r.run_id WHERE {scope.on()} AND r.stage = 'twins' AND r.status = 'completed' "
                        "AND f.name LIKE '%_report' ORDER BY f.name")
    inputs = scope.ask(
        "SELECT r.arm, r.seed, e.role, e.artifact_id, a.uri, list(DISTINCT t.role ORDER BY t.role) AS twin_roles "
        "FROM runs r JOIN edges e ON e.run_id = r.run_id AND e.direction = 'in' AND e.role IN ('sft1', 'sft2') "
        "JOIN artifacts a ON a.artifact_id = e.artifact_id "
        "LEFT JOIN (SELECT o.artifact_id, o.role FROM runs tr JOIN edges o ON o.run_id = tr.run_id "
        f"AND o.direction = 'out' WHERE {scope.on('tr')} AND tr.stage = 'twins') t ON t.artifact_id = e.artifact_id "
        f"WHERE {scope.on()} AND r.stage = 'sft' AND r.status = 'completed' "
        "GROUP BY ALL ORDER BY e.role, r.arm, r.seed")
    evidence = [reports, inputs]
    problems, missing, verified = [], [], []
    for row in reports.values:
        report = row["value_json"]
        failed = [c for c, ok in report.get("checks", {}).items() if not ok]
        if not report.get("passed") or failed:
            problems.append(f"twins stage {row['name']} failed {', '.join(failed) or 'its verification'}")
    if not reports.values:
        missing.append("twins stage reports (no completed twins run with *_report facts)")
    missing += [f"{arm}: no completed sft run" for arm in scope.arms if not any(r["arm"] == arm for r in inputs.values)]
    config = reports.values[0]["config_json"] if reports.values else {}
    tags = {"open_tag": config.get("model.meta_open", META_OPEN),
            "close_tag": config.get("model.meta_close", META_CLOSE)}
    by_role: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in inputs.values:
        by_role[row["role"]].append(row)
    for role, rows in sorted(by_role.items()):
        runs = {label(r["arm"], r["seed"]) for r in rows}
        absent = sorted({label(a, s) for a, s in {(r["arm"], r["seed"]) for r in inputs.values}} - runs)
        if absent:
            problems.append(f"{role}: read by {', '.join(sorted(runs))} but not by {', '.join(absent)}")
        untwinned = [label(r["arm"], r["seed"]) for r in rows if not [t for t in r["twin_roles"] if t]]
        if untwinned:
            problems.append(f"{role}: {', '.join(untwinned)} trained on data that is no output of the twins stage")
            continue
        if len({r["artifact_id"] for r in rows}) == 1:
            verified.append(f"{role}: every arm read the same file")
            continue
        sides = {side: {r["artifact_id"]: r["uri"] for r in rows if f"{role}_{side}" in r["twin_roles"]}
                 for side in ("meta", "nometa")}
        if any(len(files) != 1 for files in sides.values()):
            problems.append(f"{role}: expected one meta and one no-meta file, the arms read "
                            f"{ {side: sorted(files) for side, files in sides.items()} }")
            continue
        (meta_uri,), (nometa_uri,) = sides["meta"].values(), sides["nometa"].values()
        try:
            report = verify_twins(read_parquet(uri_path(meta_uri)), read_parquet(uri_path(nometa_uri)), **tags)
        except (OSError, ValueError, TwinarmError) as exc:
            missing.append(f"{role}: cannot re-verify the twin files ({exc})")
            continue
        problems += [f"{role} {c.name} fails on the files trained on ({c.failing} rows: {', '.join(c.rows[:5])})"
                     for c in report.failed()]
        verified.append(f"{role}: {report.stats['rows']} rows re-verified")
    if problems:
        return Check(name, FAIL, _listed(problems), evidence)
    if missing:
        return _open(name, missing, evidence)
    levels = ", ".join(sorted({str(r["value_json"].get("mask_level")) for r in reports.values}))
    return Check(name, PASS, f"twins reports passed (masks compared on {levels}); " + "; ".join(verified), evidence)


def regrade_flips(scope: Scope) -> Check:
    name = "meta-strip regrade flips 0"
    ev = scope.facts(("heldout",), ("regrade_flips", "regrade_flip_examples", "samples"))
    runs = _by_run(ev)
    if not runs or any(facts.get("regrade_flips") is None for facts in runs.values()):
        return Check(name, OPEN, "missing: heldout fact regrade_flips (no completed held-out run records it)", [ev])
    flips = sum(facts["regrade_flips"] for facts in runs.values())
    samples = sum(sum((facts.get("samples") or {}).values()) for facts in runs.values())
    if flips:
        examples = [f"{e['arm']}@{e['step']} {e['suite']}:{e['problem_id']}#{e['sample']}"
                    for facts in runs.values() for e in facts.get("regrade_flip_examples") or []]
        return Check(name, FAIL, f"{flips} graded samples change correctness when the meta blocks are stripped"
                                 + (f", e.g. {_listed(examples)}" if examples else ""), [ev])
    return Check(name, PASS, f"0 of {samples} held-out samples change correctness when meta is stripped", [ev])


def _problem_text(row: dict[str, Any]) -> str | None:
    """The problem a row poses: a prompt row's prompt, or a chat row's user turns."""
    if row.get("prompt"):
        return row["prompt"]
    users = [m["content"] for m in row.get("messages") or [] if m.get("role") == "user"]
    return "\n".join(users) or None


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def heldout_disjoint(scope: Scope) -> Check:
    name = "held-out disjoint from training"
    suites = scope.ask("SELECT DISTINCT e.role, a.artifact_id, a.uri FROM runs r JOIN edges e ON e.run_id = r.run_id "
                       "AND e.direction = 'in' JOIN artifacts a ON a.artifact_id = e.artifact_id "
                       f"WHERE {scope.on()} AND r.stage = 'heldout' AND r.status = 'completed' "
                       f"AND {SuiteRole.sql_like('e.role')} ORDER BY e.role")
    # every dataset a training stage read, except the val set (read for validation only)
    training = scope.ask(
        "SELECT DISTINCT e.role, a.artifact_id, a.uri FROM runs r JOIN edges e ON e.run_id = r.run_id "
        "AND e.direction = 'in' JOIN artifacts a ON a.artifact_id = e.artifact_id "
        f"WHERE {scope.on()} AND r.status = 'completed' AND r.stage IN ({sql_in(scope.stages('trains'))}) "
        "AND a.kind = 'dataset' AND e.role <> 'val' ORDER BY e.role")
    evidence = [suites, training]
    if not suites.values or not training.values:
        return Check(name, OPEN, "missing: " + ("held-out suite inputs" if not suites.values else
                                                "training datasets") + " in this flow run", evidence)
    seen: dict[str, str] = {}  # normalised problem -> "role:id" of its first training row
    try:
        for art in {r["artifact_id"]: r for r in training.values}.values():
            for row in read_parquet(uri_path(art["uri"])):
                if (text := _problem_text(row)) is not None:
                    seen.setdefault(_normal(text), f"{art['role']}:{row.get('id')}")
        overlap, checked = [], 0
        for art in suites.values:
            for row in read_parquet(uri_path(art["uri"])):
                checked += 1
                if (hit := seen.get(_normal(row.get("prompt") or ""))) is not None:
                    overlap.append(f"{SuiteRole.parse(art['role']).name}:{row.get('id')} (in {hit})")
    except (OSError, ValueError) as exc:
        return Check(name, OPEN, f"cannot read a dataset file: {exc}", evidence)
    if overlap:
        return Check(name, FAIL, f"{len(overlap)} held-out problem(s) appear in training data: " + _listed(overlap),
                     evidence)
    roles = ", ".join(sorted({r["role"] for r in training.values}))
    return Check(name, PASS, f"{checked} held-out problems share no normalised problem text with the {len(seen)} "
                             f"distinct training problems ({roles})", evidence)


def seeds_per_arm(scope: Scope) -> Check:
    """✓ only when every arm ran the same seeds, at least two, in every per-seed stage (sft, rl, sweep, ...); ✗
    when arms or an arm's stages ran different seeds; ☐ with one seed (arm differences cannot be told from seed
    noise) or an arm without a completed per-seed run."""
    name = "seeds per arm"
    ev = scope.ask(f"SELECT r.stage, r.arm, list(DISTINCT r.seed ORDER BY r.seed) AS seeds FROM runs r WHERE "
                   f"{scope.on()} AND r.seed IS NOT NULL AND r.status = 'completed' GROUP BY r.stage, r.arm "
                   "ORDER BY r.stage, r.arm")
    seeds = {f"{row['stage']} {row['arm']}": row["seeds"] for row in ev.values}
    missing = [f"{arm}: no completed per-seed run (rl)" for arm in scope.arms
               if not any(row["arm"] == arm and row["stage"] == "rl" for row in ev.values)]
    if len({_canon(v) for v in seeds.values()}) > 1:
        return Check(name, FAIL, "arms ran different seeds: " + _differences(seeds), [ev])
    if missing:
        return _open(name, missing, [ev])
    shared = next(iter(seeds.values()))
    stages = ", ".join(sorted({row["stage"] for row in ev.values}))
    if len(shared) < 2:
        return Check(name, OPEN, f"one seed per arm ({shared[0]}): an arm difference cannot be told from seed "
                                 "noise", [ev])
    return Check(name, PASS, f"seeds {shared} in every arm's {stages}", [ev])


def same_code_version(scope: Scope) -> Check:
    name = "same code version"
    if early := _too_few_arms(scope, name):
        return early
    arm_stages = scope.stages("per_arm")
    ev = scope.ask("SELECT r.stage, r.arm, r.seed, r.code_version FROM runs r "
                   f"WHERE {scope.on()} AND r.status = 'completed' AND r.stage IN ({sql_in(arm_stages)}) "
                   "ORDER BY r.stage, r.arm, r.seed")
    differ = []
    for stage in arm_stages:
        versions = {label(r["arm"], r["seed"]): r["code_version"] for r in ev.values if r["stage"] == stage}
        if len(set(versions.values())) > 1:
            differ.append(f"{stage}: {_differences(versions)}")
    if differ:
        return Check(name, FAIL, "arms ran different code: " + _listed(differ), [ev])
    missing = [f"{arm}: no completed sft/rl run" for arm in scope.arms
               if not any(r["arm"] == arm and r["stage"] in ("sft", "rl") for r in ev.values)]
    if missing:
        return _open(name, missing, [ev])
    versions = sorted({r["code_version"] for r in ev.values})
    return Check(name, PASS, f"each of {', '.join(arm_stages)} ran the same code in every arm: "
                             f"{', '.join(versions)}", [ev])


CHECKS: list[Callable[[Scope], Check]] = [
    second_law, same_grader, first_law, package_effects, advantage_normalisation,
    schedules, control_zero_scorer_calls, control_zero_meta_rollouts, sft_twins, corpus_sizes, regrade_flips,
    heldout_disjoint, seeds_per_arm, same_code_version,
]
