"""Flow runs whose process died (SIGKILL, OOM killer, power loss) stay RUNNING in Prefect forever: nothing was
left to record their end, and `prefect flow-run retry` refuses a running flow run. The next run of the same
ablation holds the ablation's lock, so no live process can be running one of its flow runs: it marks them Crashed
(and their task runs still Running or Pending), which is what they are."""
from __future__ import annotations

from infra.lineage import Lineage

DEAD = "its process ended without recording an end (killed); found when the next run of ablation '{}' started"


def crash_orphans(lineage: Lineage, ablation: str, current: str | None) -> list[str]:
    """Mark Crashed every flow run that recorded stages of `ablation` in lineage and that Prefect still shows
    Running or Pending, except `current`, and the unfinished task runs of those and of `current` (a retried flow
    run keeps its id: its task runs still Running are the killed attempt's, as none of this attempt has started).
    Call with the ablation's lock held, before the first stage. Returns the flow run ids marked."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterState, \
        FlowRunFilterStateType, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    ids = [r["flow_run_id"] for r in lineage.rows("SELECT DISTINCT flow_run_id FROM runs WHERE ablation = ? AND "
                                                  "flow_run_id IS NOT NULL", [ablation]) if r["flow_run_id"] != current]
    alive = [StateType.RUNNING, StateType.PENDING]
    message = DEAD.format(ablation)
    with get_client(sync_client=True) as client:
        orphans = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=ids), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=alive)))) \
            if ids else []
        for run in orphans:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        stuck = [run.id for run in orphans] + ([current] if current else [])
        if stuck:
            for task_run in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=stuck)),
                    task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=alive)))):
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    return [str(run.id) for run in orphans]
