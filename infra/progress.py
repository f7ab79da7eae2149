"""Progress of long loops (base model, SFT and RL steps, generation, grading): a bar with ETA on a terminal, plain
lines elsewhere (CI, logs, Ray workers, pipes) at most every few seconds, so logs stay readable.

Every line names the stage and arm that is running (set by the stage runner), e.g.
`[rl/pmishift] step 12/60  20%  3.1 s/it  ETA 2m28s  acc=0.41`.
"""
from __future__ import annotations

import contextvars
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

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
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, shown=" ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                                            else f"{k}={v}" for k, v in shown.items()))
            return
        now = time.monotonic()
        if now - self.last_line >= LINE_EVERY_S or self.done >= self.total:
            self.last_line = now
            print(self.line(shown), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
