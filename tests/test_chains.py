"""tasks.common.run_chains: each arm × seed runs its per-arm stages at its own pace (no stage waits for a slower
arm's), equal compute keys run once, and a failed chain lets the others finish before its error is raised."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from infra.spec import BaseSpec

RAN: list[str] = []  # bodies run (the tasks run in threads of this process)


@task(cache_policy=NO_CACHE)
def body(call, **kwargs):
    time.sleep(call.config["sleep"])
    if call.config.get("fail"):
        raise ValueError(f"{call.label} failed")
    RAN.append(call.label)
    return SimpleNamespace(started_at="9999", value=f"{call.label}<-{call.inputs.get('prev', '')}")


class FakeStage:
    """What run_chains reads of a Stage: name, task, config(cfg, seed)."""

    def __init__(self, name, plan):
        self.name, self.plan, self.task = name, plan, body

    def config(self, cfg, seed):
        return self.plan(cfg, seed)


class FakeSession:
    """Records finish/fail in the order they happen."""

    fresh = False

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def stage_call(self, stage, arm, seed, config, inputs):
        key = config.get("key", f"{stage.name}/{arm}/{seed}")
        return SimpleNamespace(key=key, label=f"{stage.name}/{arm}", stage=stage.name, config=config, inputs=inputs)

    def begin(self, call):
        return call

    def finish(self, call, out, cached):
        self.events.append((call.label, "cached" if cached else "computed"))
        return out

    def fail(self, call, exc):
        self.events.append((call.label, "failed"))


ARMS = {"slow": BaseSpec(seeds=[0]), "fast": BaseSpec(seeds=[0])}


def _links(first_plan):
    return [(FakeStage("a", first_plan), lambda arm, seed, earlier: {}),
            (FakeStage("b", lambda cfg, seed: {"sleep": 0}),
             lambda arm, seed, earlier: {"prev": earlier[0].value})]


def test_a_fast_arm_does_not_wait_for_a_slow_one(flow_home):
    from tasks.common import run_chains

    session = FakeSession()
    plan = lambda cfg, seed: {"sleep": 3 if cfg is ARMS["slow"] else 0}  # noqa: E731

    @flow
    def chains():
        return run_chains(session, ARMS, _links(plan))

    first, second = chains()
    # before: every arm's stage a had to end before any stage b started (a/slow before b/fast)
    assert [label for label, _ in session.events] == ["a/fast", "b/fast", "a/slow", "b/slow"]
    assert second[("fast", 0)].value == "b/fast<-a/fast<-" and second[("slow", 0)].value == "b/slow<-a/slow<-"
    assert set(first) == set(second) == {("slow", 0), ("fast", 0)}


def test_equal_keys_run_once_and_a_failure_ends_only_its_chain(flow_home):
    from tasks.common import run_chains

    RAN.clear()
    session = FakeSession()
    shared_a = lambda cfg, seed: {"sleep": 0, "key": "same"}  # noqa: E731
    arms = {**ARMS, "third": BaseSpec(seeds=[0, 1])}

    @flow
    def chains():
        return run_chains(session, arms, _links(shared_a))

    chains()
    assert RAN.count("a/slow") + RAN.count("a/fast") + RAN.count("a/third") == 1  # one body for key "same"
    states = [state for label, state in session.events if label.startswith("a/")]
    assert sorted(states) == ["cached"] * 3 + ["computed"]

    session = FakeSession()
    failing = lambda cfg, seed: {"sleep": 0, "fail": cfg is ARMS["slow"]}  # noqa: E731

    @flow
    def broken():
        return run_chains(session, ARMS, _links(failing))

    with pytest.raises(ValueError, match="a/slow failed"):
        broken()
    assert sorted(session.events) == [("a/fast", "computed"), ("a/slow", "failed"), ("b/fast", "computed")]
