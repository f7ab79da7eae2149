"""Prefect deployments: the ablation (its UI form is generated from the flow's typed parameters: the spec file
plus RunOverrides) and the nightly held-out evaluation on a cron schedule. `twinarm ui` serves both next to the
Prefect and MLflow UIs; `prefect.yaml` declares the same two for work-pool based `prefect deploy`."""
from __future__ import annotations

from typing import Any

NIGHTLY_CRON = "0 3 * * *"  # 03:00 every night, the server's time zone


def deployments(spec_file: str = "configs/demo.yaml", cron: str = NIGHTLY_CRON) -> list[Any]:
    from flows.ablation import ablation
    from flows.heldout import nightly_heldout

    return [
        ablation.to_deployment(name="ablation", parameters={"spec_file": spec_file}, tags=["twinarm"],
                               description="Run (or resume) a matched twin-arm ablation from a spec file. "
                                           "Completed stages are served from cache."),
        nightly_heldout.to_deployment(name="nightly-heldout", cron=cron, tags=["twinarm", "nightly"],
                                      description="Held-out evaluation of every new checkpoint of every "
                                                  "registered ablation."),
    ]


def serve(spec_file: str = "configs/demo.yaml", cron: str = NIGHTLY_CRON) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(spec_file, cron), print_starting_message=True)
