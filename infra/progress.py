"""Progress of long loops (base model, SFT and RL steps, generation, grading): a bar with ETA on a terminal, plain
lines elsewhere (CI, logs, Ray workers, pipes) at most every few seconds, so logs stay readable. Inside a Prefect
flow or task run the same lines (and each stage's summary) also go to the run's logs at INFO, which the Prefect UI
shows on the flow run page and `prefect flow-run logs` prints. A Ray worker has no Prefect run context: the flow
process hands it the run's ids and API (`current_run_log`, infra.ray_exec), and the worker sends its lines to that
run's logs through Prefect's own API log handler (`run_log`); Ray forwards the worker's stderr to the terminal.

Every line names the stage and arm that is running (set by the stage runner), e.g.
`[rl/pmishift/seed0] GRPO steps 12/60  20%  3.1 s/it  ETA 2m28s  acc=0.41`.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

# Set on Ctrl-C / SIGTERM of the command line: every running loop stops at its next step (stage bodies run in
# worker threads, which a signal does not reach).
STOP = threading.Event()


class StopRequested(Exception):
    """Raised by Progress.advance once STOP is set: the stage ends here (its last checkpoint is kept)."""


STAGE_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("twinarm_stage_label", default="")
LINE_EVERY_S = float(os.environ.get("TWINARM_PROGRESS_EVERY_S", "10"))


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("TWINARM_PROGRESS") != "plain"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """`advance(n, **shown)` after each unit of work; `done` of `total`, starting at `start` (a resumed run)."""

    def __init__(self, what: str, total: int, start: int = 0):
        label = STAGE_LABEL.get()
        self.prefix = f"[{label}] {what}" if label else what
        self.total, self.done, self.start = total, start, start
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.bar: Any = None
        if _interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, \
                TimeRemainingColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[shown]}"), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.prefix, total=total, completed=start, shown="")

    def line(self, shown: dict[str, Any]) -> str:
        elapsed = time.monotonic() - self.t0
        rate = elapsed / max(1, self.done - self.start)
        eta = rate * (self.total - self.done)
        extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        pct = 100 * self.done / max(1, self.total)
        return (f"{self.prefix} {self.done}/{self.total}  {pct:.0f}%  {rate:.2f} s/it  ETA {_duration(eta)}"
                + (f"  {extra}" if extra else ""))

    def advance(self, n: int = 1, **shown: Any) -> None:
        """Count `n` units done; raises StopRequested when the command was interrupted (STOP)."""
        if STOP.is_set():
            raise StopRequested(f"{self.prefix}: interrupted at {self.done}/{self.total}")
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, shown=" ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                                            else f"{k}={v}" for k, v in shown.items()))
        now = time.monotonic()
        if now - self.last_line >= LINE_EVERY_S or self.done >= self.total:
            self.last_line = now
            line = self.line(shown)
            if self.bar is None:
                to_terminal(line)
            to_run_log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def to_terminal(line: str) -> None:
    """A line on stderr, written directly: inside a flow run with log_prints, Prefect turns print() into an INFO
    log record, which the terminal (console handler at WARNING) would not show."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class RunLog:
    """The Prefect run whose logs a process without a run context (a Ray worker) writes to: the API at `api_url`
    (e.g. http://127.0.0.1:4200/api), flow run `flow_run_id`, task run `task_run_id` (None: the flow run's own
    logs)."""

    api_url: str
    flow_run_id: str
    task_run_id: str | None = None


RUN_LOG: contextvars.ContextVar[RunLog | None] = contextvars.ContextVar("twinarm_run_log", default=None)


def current_run_log() -> RunLog | None:
    """The run this code logs to now, to hand to a process that has no Prefect run context: the current task run
    (or else flow run) and the API its client talks to (the temporary server of `twinarm run`, the server of
    `twinarm ui`, or PREFECT_API_URL); inside `run_log`, its target; None outside any run."""
    from prefect.context import FlowRunContext, TaskRunContext

    def api(ctx: Any) -> str:  # the client's base URL, as PREFECT_API_URL writes it (no trailing slash)
        return str(ctx.client.api_url).rstrip("/")

    task_ctx = TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        return RunLog(api(task_ctx), str(task_ctx.task_run.flow_run_id), str(task_ctx.task_run.id))
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        return RunLog(api(flow_ctx), str(flow_ctx.flow_run.id))
    return RUN_LOG.get()


_api_handler: logging.Handler | None = None
_api_settings: dict[str, Any] = {}  # api_url -> Prefect settings pointing at it (a copy costs ~0.1 s)


def _send(target: RunLog, line: str) -> None:
    """One INFO record to the target run's logs through Prefect's APILogHandler, which takes the run from the
    record's `flow_run_id` / `task_run_id` (no run context needed) and queues it on Prefect's batched log worker
    for the API of the settings in effect (here the target's). Only that handler sees the record: Ray already
    brings the worker's stderr line to the terminal, so it is not printed twice."""
    global _api_handler
    from prefect.context import SettingsContext, get_settings_context
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL

    if _api_handler is None:
        _api_handler = APILogHandler()
    current = get_settings_context()
    if target.api_url not in _api_settings:
        _api_settings[target.api_url] = current.settings.copy_with_update(updates={PREFECT_API_URL: target.api_url})
    record = logging.LogRecord("prefect.task_runs" if target.task_run_id else "prefect.flow_runs", logging.INFO,
                               __file__, 0, line, None, None)
    record.flow_run_id, record.task_run_id = target.flow_run_id, target.task_run_id
    # what prefect.settings.temporary_settings does, without copying the settings at each line
    with SettingsContext(profile=current.profile, settings=_api_settings[target.api_url]):
        _api_handler.handle(record)


@contextmanager
def run_log(target: RunLog | None) -> Iterator[None]:
    """Inside, to_run_log writes to `target`'s logs (a Ray worker running a stage body for that run); on exit the
    queued lines are sent (Prefect's log worker, at most 15 s), so they reach the API before the flow run can end
    and a temporary server stop. None: nothing changes."""
    if target is None:
        yield
        return
    token = RUN_LOG.set(target)
    try:
        yield
    finally:
        RUN_LOG.reset(token)
        if _api_handler is not None:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=15)


def to_run_log(line: str) -> None:
    """Send a line to the logs of the current Prefect task or flow run (INFO), or of the run handed to this
    process by `run_log` (a Ray worker); nothing outside a run (a unit test)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
        from prefect.logging import get_run_logger

        get_run_logger().info(line)
        return
    target = RUN_LOG.get()
    if target is not None:
        _send(target, line)


def stage_done(label: str, status: str, summary: dict[str, Any]) -> None:
    """One line per finished stage, on the terminal and in the run's logs:
    `[sft/control/seed0] computed  loss=0.41  steps=60`."""
    numbers = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    line = f"[{label}] {status}" + (f"  {numbers}" if numbers else "")
    to_terminal(line)
    to_run_log(line)


@contextmanager
def progress(what: str, total: int, start: int = 0) -> Iterator[Progress]:
    bar = Progress(what, total, start)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def stage_label(label: str) -> Iterator[None]:
    token = STAGE_LABEL.set(label)
    try:
        yield
    finally:
        STAGE_LABEL.reset(token)
