"""The stage contract shared by every task, and the Session that records stages (lineage + MLflow).

Each stage is declared once, as a `Stage` in its own tasks/<stage>.py: its name, the config keys it reads, its
input and output roles, whether it runs per arm, and its body. The flow, the compute key, the lineage result views
and the audit (through the declaration recorded as the run fact `stage`) all read that one object.

A stage is called with a StageCall: the slice of the resolved config it declared, its input artifacts, the hash of
the code its body can import (infra.code.closure_hash) and the content hash of any local file its config names.
Its compute key (hash of those) names its working directory and is its Prefect cache key, so the same computation
is done once, whatever ablation or arm asks for it. Its run id adds the ablation/arm/seed, so each ablation's
lineage names its own runs. A stage writes `stage-output.json` last, atomically: present means complete, and a
rerun returns it without recomputing.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import threading
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from infra.artifacts import ArtifactStore, atomic_write_json, clean_stale_tmp, uri_path
from infra.code import REPO_ROOT, closure_hash, code_version, package_versions
from infra.errors import TwinarmError
from infra.hashing import hash_json, hash_path
from infra.home import Home, configure_environment
from infra.artifacts import Artifact
from infra.lineage import Lineage, Run, StageRecord, utcnow
from infra.locks import exclusive
from infra.progress import stage_done, stage_label
from infra.spec import AblationSpec, BaseSpec, config_hash, flatten, stage_config
from infra.tracking import Tracker

SHARED = "*"  # the arm of stages every arm shares (data, base model, twins, held-out job)

@dataclass(frozen=True)
class StageCall:
    """One call of a stage: where (home), for whom (ablation, arm, seed), what (config slice, inputs by role, code
    hash, local file hashes). `fresh` recomputes even when a completed output exists."""

    home: str
    ablation: str
    arm: str
    seed: int | None
    stage: str
    config: dict[str, Any]
    inputs: dict[str, Artifact]
    code: str
    files: dict[str, str] = field(default_factory=dict)  # local file the config names -> its content hash
    fresh: bool = False
    mlflow_run_id: str | None = None

    @property
    def key(self) -> str:
        """Compute key: what the output depends on (not which ablation or arm asked)."""
        key = {"stage": self.stage, "config": self.config, "code": self.code,
               "inputs": {role: a.artifact_id for role, a in sorted(self.inputs.items())}}
        return hash_json({**key, "files": self.files} if self.files else key)

    @property
    def run_id(self) -> str:
        """Lineage run id: hash of ablation, arm, seed and the compute key."""
        return hash_json({"ablation": self.ablation, "arm": self.arm, "seed": self.seed, "key": self.key})

    @property
    def label(self) -> str:
        """How the stage is named in the run summary and in progress lines: stage/arm[/seedN]."""
        return f"{self.stage}/{self.arm}" + (f"/seed{self.seed}" if self.seed is not None else "")

    @property
    def workdir(self) -> Path:
        """The stage's working directory, named by its compute key (shared by every arm that computes the same)."""
        return Path(self.home) / "runs" / self.stage / self.key

    def input_path(self, role: str) -> Path:
        """Local path of the input artifact of `role` (KeyError when the call has no such input)."""
        return uri_path(self.inputs[role].uri)


@dataclass
class StageOutput:
    """What a stage body returns: outputs by role, runtime facts (for the audit), metrics (key, value, step),
    a short summary for the run table, small files to attach to MLflow; times and code version are set by
    run_stage."""

    outputs: dict[str, Artifact]
    facts: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # small files to attach to the MLflow run
    code_version: str = ""
    started_at: str = ""
    ended_at: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (written as stage-output.json, the completion marker)."""
        data = dataclasses.asdict(self)
        data["metrics"] = [list(m) for m in self.metrics]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageOutput":
        """Inverse of to_json."""
        data = dict(data)
        data["outputs"] = {role: Artifact(**a) for role, a in data["outputs"].items()}
        data["metrics"] = [tuple(m) for m in data["metrics"]]
        return cls(**data)


# The stage contract records and places a body; it never changes what a body computes, so it is not part of any
# stage's code key (its imports — lineage, MLflow, Ray — would otherwise invalidate every stage).
CONTRACT_MODULE = __name__


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once in tasks/<stage>.py.

    name: the stage's name in lineage, MLflow and the flow.
    body: StageCall -> StageOutput, a plain function (it may run in a Ray worker).
    config_keys: dotted keys of the resolved arm config the body reads (a key may name a section; "seed" is the
        arm's seed). Only these reach the body, so they are exactly the config part of the compute key.
    inputs / outputs: the artifact roles it reads and writes (fnmatch patterns such as "checkpoint:*"); a call
        with another input role, or a body returning another output role, is an error.
    per_arm: runs once per arm × seed (else once per group of arms with equal config slice and inputs).
    placed: runs where the executor says (a Ray task) instead of in the flow process.
    trains: produces weights from its datasets (the audit checks those are disjoint from the held-out).
    result_view: name of the lineage view over the result table it writes under the output role `result_role`.
    files: config slice -> local files whose content the output depends on (file data sources, manifests).
    """

    name: str
    body: Callable[["StageCall"], "StageOutput"]
    config_keys: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    per_arm: bool = False
    placed: bool = False
    trains: bool = False
    result_view: str | None = None
    result_role: str | None = None
    files: Callable[[dict[str, Any]], list[Path]] | None = None

    def code(self, root: Path = REPO_ROOT) -> str:
        """Hash of every project file the body's module can import (infra.code.closure_hash)."""
        return closure_hash((self.body.__module__,), root, stop=(CONTRACT_MODULE,))

    def config(self, resolved: BaseSpec, seed: int | None = None) -> dict[str, Any]:
        """The declared slice of a resolved arm config (infra.spec.stage_config)."""
        return stage_config(resolved, self.config_keys, seed, shared=not self.per_arm)

    def file_hashes(self, config: dict[str, Any]) -> dict[str, str]:
        """{path: content hash} of the local files the config names (missing files are left to the body, which
        raises a DataError naming the key)."""
        paths = self.files(config) if self.files else []
        return {str(p): hash_path(p) for p in sorted(set(paths)) if p.exists()}

    def check_roles(self, roles: Any, declared: tuple[str, ...], what: str) -> None:
        """Raise TwinarmError naming any role not matched by the declared patterns."""
        undeclared = sorted(r for r in roles if not any(fnmatch.fnmatchcase(r, pat) for pat in declared))
        if undeclared:
            raise TwinarmError(f"stage '{self.name}': {what} role(s) {undeclared} are not declared "
                               f"(declared: {', '.join(declared)})")

    def declaration(self) -> dict[str, Any]:
        """The declaration as the run fact `stage` (what the audit reads)."""
        return {"per_arm": self.per_arm, "trains": self.trains, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "config_keys": list(self.config_keys)}

    @cached_property
    def task(self) -> Any:
        """The Prefect task that runs this stage (cached by compute key, result persisted)."""
        from prefect import task

        stage = self

        def run(call: StageCall, executor: dict[str, Any]) -> StageOutput:
            return placed(stage, call, executor) if stage.placed else run_stage(call, stage.body)

        run.__name__ = run.__qualname__ = f"stage_{self.name}"
        return task(run, name=self.name, cache_key_fn=stage_cache_key, persist_result=True)


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the compute key of the task's StageCall within its home. The home is part of it because
    a cached StageOutput names files of the home that computed it: served to another home (a result storage
    shared by mistake), it would point outside that home's lineage."""
    call = parameters["call"]
    return hash_json({"key": call.key, "home": call.home})


def load_output(call: StageCall) -> StageOutput | None:
    """The completed output of a call (its marker file), or None when it must (re)compute: no marker, `fresh`,
    or an output file deleted by hand."""
    marker = call.workdir / "stage-output.json"
    if call.fresh or not marker.exists():
        return None
    out = StageOutput.from_json(json.loads(marker.read_text()))
    if any(not uri_path(a.uri).exists() for a in out.outputs.values()):
        return None  # an output was deleted by hand: recompute
    return out


def run_stage(call: StageCall, body: Callable[[StageCall], StageOutput]) -> StageOutput:
    """Run body(call) at most once per compute key: locked, resumable, completion marker written last."""
    done = load_output(call)
    if done is not None:
        return done
    call.workdir.mkdir(parents=True, exist_ok=True)
    with exclusive(call.workdir / ".lock", f"stage '{call.stage}' ({call.key})"):
        done = load_output(call)  # another process may have finished it while we waited
        if done is not None:
            return done
        clean_stale_tmp(call.workdir)
        started = utcnow().isoformat()
        with stage_label(call.label):
            out = body(call)
        out.code_version = code_version()
        out.facts.setdefault("runtime", runtime_facts())
        out.started_at, out.ended_at = started, utcnow().isoformat()
        atomic_write_json(call.workdir / "stage-output.json", out.to_json())
    return out


RUNTIME_PACKAGES = ("torch", "transformers", "verl", "math-verify", "prefect", "mlflow", "duckdb", "ray")


def runtime_facts() -> dict[str, Any]:
    """Where and with what a stage ran (for the report's reproducibility block; never part of a cache key)."""
    import platform

    return {"host": platform.node(), "python": platform.python_version(),
            "packages": package_versions(RUNTIME_PACKAGES)}


def store(call: StageCall) -> ArtifactStore:
    """The content-addressed artifact store under the call's home."""
    return ArtifactStore(Path(call.home) / "artifacts")


def live_metrics(call: StageCall) -> Callable[[list[tuple[str, float, int]]], Any]:
    """Log (key, value, step) rows to the stage's MLflow run as they happen (deduplicated by key and step, so
    the rows a resumed stage logs again are not repeated)."""
    if not call.mlflow_run_id:
        return lambda rows: None
    from infra.tracking import Tracker

    tracker = Tracker(configure_environment())
    return lambda rows: tracker.log_metrics(call.mlflow_run_id, rows)


_inline = threading.Lock()  # model loading is not thread-safe: inline bodies run one at a time


def placed(stage: Stage, call: StageCall, executor: dict[str, Any]) -> StageOutput:
    """Run a stage where the executor says: as a Ray task (arms in parallel), or inline in the flow process, one
    body at a time. Either way the body sets its torch threads from its compute config, so where it runs never
    changes what it computes."""
    from infra.ray_exec import call as place
    from infra.spec import ExecutorSpec

    spec = ExecutorSpec(**executor)
    if spec.use_ray:
        processes = call.config.get("executor.compute", {}).get("shared_cpu_processes", 1)  # shared stages only
        return place(run_stage, call, stage.body, executor=spec, processes=processes)
    with _inline:
        return run_stage(call, stage.body)


class Session:
    """The flow process's view of one ablation run: the only lineage writer, the MLflow parent run, the lock."""

    def __init__(self, spec: AblationSpec, spec_file: str, fresh: bool = False, flow_run_id: str | None = None):
        self.home: Home = configure_environment()
        self.spec = spec
        self.spec_file = spec_file
        self.fresh = fresh
        self.flow_run_id = flow_run_id
        self.spec_hash = config_hash(spec)
        self.lineage = Lineage(self.home.lineage_db)
        self.store = ArtifactStore(self.home.artifacts)
        self.status: dict[str, str] = {}  # "stage/arm/seed" -> computed | cached | failed
        self.summaries: dict[str, dict[str, Any]] = {}
        self.stages: dict[str, Stage] = {}  # the declarations of the stages called so far
        self._lock = None

    def __enter__(self) -> "Session":
        self._lock = exclusive(self.home.locks / f"{self.spec.name}.lock", f"ablation '{self.spec.name}'")
        self._lock.__enter__()
        self.lineage.init()
        self.tracker = Tracker(self.home)
        self.parent_run = self.tracker.parent_run(self.spec.name, self.spec_hash, self.spec.description)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.tracker.finish(self.parent_run, "FAILED" if exc_type else "FINISHED")
        finally:
            self._lock.__exit__(exc_type, exc, tb)

    def report(self) -> Any:
        """Build the ledger and the report of this flow run from lineage (audit.report.build_report) and upload
        their files to the ablation's MLflow parent run (under report/). Returns the ReportFiles."""
        from audit.report import build_report

        report = build_report(self.home, self.spec.name)
        self.tracker.log_files(self.parent_run, report.files, "report")
        return report

    def stage_call(self, stage: Stage, arm: str, seed: int | None, config: dict[str, Any],
                   inputs: dict[str, Artifact]) -> StageCall:
        """The call of `stage` with this config slice and inputs (input roles checked against the declaration)."""
        stage.check_roles(inputs, stage.inputs, "input")
        self.stages[stage.name] = stage
        return StageCall(home=str(self.home.root), ablation=self.spec.name, arm=arm, seed=seed, stage=stage.name,
                         config=config, inputs=inputs, code=stage.code(), files=stage.file_hashes(config),
                         fresh=self.fresh)

    def begin(self, call: StageCall) -> StageCall:
        """Record the run as running (lineage) and find or create its MLflow child run."""
        name = f"{'shared' if call.arm == SHARED else call.arm}/{call.stage}" + (
            f"/seed{call.seed}" if call.seed is not None else "")
        mlflow_id = self.tracker.child_run(self.spec.name, self.parent_run, call.run_id, name, flatten(call.config),
                                           tags={"twinarm.stage": call.stage, "twinarm.arm": call.arm,
                                                 "twinarm.seed": str(call.seed)})
        call = dataclasses.replace(call, mlflow_run_id=mlflow_id)
        self.lineage.record(self._record(call, status="running"))
        return call

    def _record(self, call: StageCall, status: str, out: StageOutput | None = None) -> StageRecord:
        run = Run(run_id=call.run_id, ablation=call.ablation, arm=call.arm, stage=call.stage, seed=call.seed,
                  config=call.config, config_hash=config_hash(call.config),
                  code_version=out.code_version if out else code_version(), status=status,
                  started_at=datetime.fromisoformat(out.started_at) if out and out.started_at else None,
                  ended_at=datetime.fromisoformat(out.ended_at) if out and out.ended_at else None,
                  flow_run_id=self.flow_run_id, mlflow_run_id=call.mlflow_run_id)
        return StageRecord(run=run, inputs=[(a, role) for role, a in sorted(call.inputs.items())],
                           outputs=[(a, role) for role, a in sorted((out.outputs if out else {}).items())],
                           facts=(out.facts if out else {}))

    def finish(self, call: StageCall, out: StageOutput, cached: bool) -> StageOutput:
        """Record a completed stage: lineage (run, edges, facts) and MLflow (metrics, datasets, models, files)."""
        stage = self.stages[call.stage]
        stage.check_roles(out.outputs, stage.outputs, "output")
        out = dataclasses.replace(out, facts={**out.facts, "stage": stage.declaration()})
        self.lineage.record(self._record(call, status="completed", out=out))
        if stage.result_view:
            self.lineage.refresh_result_view(stage.result_view, stage.name, stage.result_role or stage.name)
        run_id = call.mlflow_run_id
        assert run_id is not None
        self.tracker.log_metrics(run_id, out.metrics)
        for role, art in sorted(out.outputs.items()):
            if art.kind in ("dataset", "table"):
                self.tracker.log_dataset(run_id, art, name=f"{call.stage}/{role}", context="output")
            elif art.kind == "checkpoint":
                self.tracker.log_model(call.ablation, run_id, art, name=f"{call.arm}-{call.stage}-{role}",
                                       step=art.facets.get("step"))
        for role, art in sorted(call.inputs.items()):
            if art.kind in ("dataset", "table"):
                self.tracker.log_dataset(run_id, art, name=role, context="input")
        for path in out.files:
            self.tracker.log_artifact(run_id, Path(path))
        self.tracker.finish(run_id)
        self.status[call.label] = "cached" if cached else "computed"
        stage_done(call.label, self.status[call.label], out.summary)
        if out.summary:
            self.summaries[call.label] = out.summary
        return out

    def fail(self, call: StageCall, exc: BaseException) -> None:
        """Record a failed stage: lineage status `failed`, the error as an MLflow tag, the run marked FAILED."""
        self.lineage.record(self._record(call, status="failed"))
        if call.mlflow_run_id:
            self.tracker.client.set_tag(call.mlflow_run_id, "twinarm.error",
                                        "".join(traceback.format_exception_only(type(exc), exc))[:5000])
            self.tracker.finish(call.mlflow_run_id, "FAILED")
        self.status[call.label] = "failed"


def _settle(session: Session, call: StageCall, state: Any, first: StageCall, submitted: str
            ) -> tuple[StageOutput | None, BaseException | None]:
    """Record one call from the final state of the task that ran its compute key: (output, None) when it
    completed, (None, the task's exception) when it failed (recorded as failed)."""
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        try:
            state.result()
            exc: BaseException = RuntimeError(f"stage {call.stage} ended in state {state.name}")
        except BaseException as raised:  # the task's own exception, re-raised by the caller
            exc = raised
        session.fail(call, exc)
        return None, exc
    out = state.result()
    # computed here: this call's own task ran the body now. A Prefect cache hit, a duplicate call, or an output
    # reused from its completion marker (the body skipped: run_stage) is cached, whatever Prefect's state says
    ran_here = first is call and state.name != "Cached" and (out.started_at or "") >= submitted
    return session.finish(call, out, cached=not ran_here), None


def _submit(session: Session, task: Any, call: StageCall, **kwargs: Any) -> tuple[Any, StageCall, str]:
    future = task.with_options(refresh_cache=session.fresh, task_run_name=call.label).submit(call=call, **kwargs)
    return future, call, utcnow().isoformat()


def run_calls(session: Session, task: Any, calls: list[StageCall], **kwargs: Any) -> list[StageOutput]:
    """Run stage calls through Prefect and record each; calls with the same compute key run once.

    The unique calls are submitted together, so independent arms run concurrently (each task body may hand
    its work to a Ray worker). A failure is recorded against every call that needed it, then re-raised.
    """
    submitted: dict[str, tuple[Any, StageCall, str]] = {}
    for call in calls:
        if call.key not in submitted:
            submitted[call.key] = _submit(session, task, call, **kwargs)
    for future, _, _ in submitted.values():
        future.wait()
    outputs: list[StageOutput] = []
    failure: BaseException | None = None
    for call in calls:
        future, first, at = submitted[call.key]
        out, exc = _settle(session, call, future.state, first, at)
        if out is not None:
            outputs.append(out)
        failure = failure or exc
    if failure is not None:
        raise failure
    return outputs


Link = tuple[Stage, Callable[[str, int, list[StageOutput]], dict[str, Artifact]]]


def run_chains(session: Session, arms: dict[str, BaseSpec], links: list[Link], **kwargs: Any
               ) -> list[dict[tuple[str, int], StageOutput]]:
    """Per-arm stages in order (`links`: each stage with its inputs from the arm, seed and that chain's earlier
    outputs) for every arm × seed, each chain's next stage submitted as soon as its own previous one finished,
    never waiting for another arm's: an arm whose SFT ends first starts its RL at once. Calls with the same compute
    key run once, whenever they are asked for. A failed stage ends its chain; the others run on, then the first
    failure is raised (every call recorded: completed, cached or failed). Returns one {(arm, seed): output} per
    link."""
    from prefect.futures import as_completed

    chains = [(arm, seed) for arm, cfg in arms.items() for seed in cfg.seeds]
    done: dict[tuple[str, int], list[StageOutput]] = {chain: [] for chain in chains}
    submitted: dict[str, tuple[Any, StageCall, str]] = {}
    waiting: dict[str, list[tuple[tuple[str, int], StageCall]]] = {}
    failure: BaseException | None = None

    def advance(chain: tuple[str, int]) -> None:
        if len(done[chain]) == len(links):
            return
        stage, inputs_for = links[len(done[chain])]
        arm, seed = chain
        call = session.begin(session.stage_call(stage, arm, seed, stage.config(arms[arm], seed),
                                                inputs_for(arm, seed, done[chain])))
        if call.key not in submitted:
            submitted[call.key] = _submit(session, stage.task, call, **kwargs)
        waiting.setdefault(call.key, []).append((chain, call))

    for chain in chains:
        advance(chain)
    while waiting:
        future = next(as_completed([submitted[key][0] for key in waiting]))
        future.wait()
        key = next(k for k in waiting if submitted[k][0] is future)
        _, first, at = submitted[key]
        for chain, call in waiting.pop(key):
            out, exc = _settle(session, call, future.state, first, at)
            failure = failure or exc
            if out is not None:
                done[chain].append(out)
                advance(chain)
    if failure is not None:
        raise failure
    return [{chain: outs[i] for chain, outs in done.items() if len(outs) > i} for i in range(len(links))]


def run_task(session: Session, task: Any, call: StageCall, **kwargs: Any) -> StageOutput:
    """One stage call (see run_calls)."""
    return run_calls(session, task, [call], **kwargs)[0]
