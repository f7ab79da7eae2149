"""Progress of long loops (base model, SFT and RL steps, generation, grading): a bar with ETA on a terminal, plain
lines elsewhere (CI, logs, Ray workers, pipes) at most every few seconds, so logs stay readable. Inside a Prefect
flow or task run the same lines (and each stage's summary) also go to the run's logs at INFO, which the Prefect UI
shows on the flow run page and `prefect flow-run logs` prints.

Every line names the stage and arm that is running (set by the stage runner), e.g.
`[rl/pmishift/seed0] GRPO steps 12/60  20%  3.1 s/it  ETA 2m28s  acc=0.41`.
"""
from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from contextlib import contextmanager
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


def to_run_log(line: str) -> None:
    """Send a line to the logs of the current Prefect task or flow run (INFO); nothing outside a run (a Ray
    worker, a unit test)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return
    from prefect.logging import get_run_logger

    get_run_logger().info(line)


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
