"""Prefect deployments: the ablation (its UI form is generated from the flow's typed parameters: the spec file
plus RunOverrides) and the nightly held-out evaluation on a schedule (a cron, or an interval in seconds).
`twinarm ui` serves both next to the Prefect and MLflow UIs; `prefect.yaml` declares the same two for work-pool
based `prefect deploy`."""
from __future__ import annotations

from typing import Any

NIGHTLY_CRON = "0 3 * * *"  # 03:00 every night, the server's time zone


def deployments(spec_file: str = "configs/demo.yaml", cron: str = NIGHTLY_CRON,
                interval_s: float | None = None) -> list[Any]:
    """The two deployments. The nightly runs on `cron`, or every `interval_s` seconds when given; one nightly run
    at a time (a second one due while the first runs waits for it), so a run never finds its ablation locked
    by the previous night's."""
    from flows.ablation import ablation
    from flows.heldout import nightly_heldout

    schedule: dict[str, Any] = {"interval": interval_s} if interval_s else {"cron": cron}
    return [
        ablation.to_deployment(name="ablation", parameters={"spec_file": spec_file}, tags=["twinarm"],
                               description="Run (or resume) a matched twin-arm ablation from a spec file. "
                                           "Completed stages are served from cache."),
        nightly_heldout.to_deployment(name="nightly-heldout", tags=["twinarm", "nightly"], concurrency_limit=1,
                                      description="Held-out evaluation of every new checkpoint of every "
                                                  "registered ablation.", **schedule),
    ]


NAMES = ("twinarm-ablation/ablation", "twinarm-nightly-heldout/nightly-heldout")


def check_api(api_url: str, timeout_s: float = 5.0) -> None:
    """Fail with one line naming the URL when the Prefect API does not answer."""
    import urllib.request

    from infra.errors import TwinarmError

    try:
        urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s)
    except Exception as exc:  # refused, DNS, timeout, HTTP error: the same advice
        raise TwinarmError(f"the Prefect API {api_url} (PREFECT_API_URL) is unreachable: {exc}. Start the server "
                           f"(`twinarm ui`) or fix PREFECT_API_URL.") from None


def served_elsewhere() -> list[str]:
    """The twinarm deployments a runner is polling right now (status READY: polled within the last minute)."""
    from prefect import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    busy = []
    with get_client(sync_client=True) as client:
        for name in NAMES:
            try:
                if client.read_deployment_by_name(name).status == DeploymentStatus.READY:
                    busy.append(name)
            except ObjectNotFound:
                pass
    return busy


def serve(spec_file: str = "configs/demo.yaml", cron: str = NIGHTLY_CRON, interval_s: float | None = None) -> None:
    """Serve both deployments until SIGINT/SIGTERM (then their schedules are paused: the owner is gone)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(spec_file, cron, interval_s), print_starting_message=True)
