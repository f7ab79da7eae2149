"""THE grading function (DESIGN §6 correctness head, §8 evaluation): one call path for every arm and stage.

    answer  = final_answer(response, gold)          # conventions below, each a `grader` spec key
    correct = math_verify.verify(parse(\\boxed{norm(gold)}), parse(\\boxed{norm(answer)}))

Conventions (the table in docs/method-cards.md "Grader conventions"; defaults follow verl and Qwen2.5-Math):
- the answer is the last box (`\\boxed`, `\\fbox` with `fbox`, brace-less `\\boxed 5` with `braceless_box`);
  when the last box opening never closes the response has no answer and counts as truncated
  (`unclosed_last_box: no_answer`; `previous_box` takes the last complete box instead, still counted);
- a list gold (top-level commas or semicolons) takes the response's last boxes joined when they form one list
  (`join_boxes`);
- norm drops a percent sign on both sides (`percent: strip`; `scaled` also accepts the gold ×100 and ÷100);
- numbers compare by relative tolerance: `rel_tol` when either side holds a decimal, `numeric_precision`
  significant digits between exact values (math-verify 0.9's own rule rounds to 6 decimal places, so it calls
  2^-98 equal to 2^-99; ours replaces `math_verify.grader.sympy_numeric_eq` inside the grading processes).

No answer → incorrect, extracted None. Grading runs in worker processes (fresh interpreters, so callers may have
torch, CUDA, Ray or threads) with two per-item budgets:
- soft: a SIGALRM timer in the worker's main thread interrupts pure-Python sympy work at 80 % of `timeout_s`; the
  worker survives. math-verify's own signal timeouts are switched off: they would cancel this timer, and they
  swallow a timeout into a silent "False" that could not be counted.
- hard: the parent kills a worker whose current item has run `timeout_s` (work stuck in C ignores signals), marks
  that item incorrect with timed_out=True, re-queues the rest of its chunk and starts a replacement.
Workers report after every item, so a kill loses only the hung item. Identical (extracted, gold) pairs are graded
once per batch and remembered in an LRU cache in the parent.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.errors import DataError, TwinarmError
from infra.code import closure_hash
from infra.hashing import hash_json
from meta.grammar import BOX_COMMANDS, find_boxes

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from infra.spec import GraderSpec

CALL_PATH = ("rewards.grader.Grader.grade→final_answer(response, gold)→math_verify.verify("
             "parse(boxed(norm(gold))), parse(boxed(norm(answer)))) with relative-tolerance numbers")

_CACHE_ENTRIES = 65536
_CACHE_MAX_CHARS = 1000  # longer answers are rare repeats: not worth holding in memory (parent or worker)
_CHUNK_MAX = 8  # items per message: small, so a chunk of slow items cannot hold up the end of a batch
_PIPELINE_CHARS = 16384  # a queued chunk must fit the socket buffer (a send to a busy worker must not block)
_START_TIMEOUT_S = 120.0  # a worker that cannot import math-verify in this long is broken, not slow
_SOFT_FRACTION = 0.8
_ERROR_CHARS = 200
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    timed_out: bool = False
    error: str | None = None
    truncated: bool = False  # the response's last box never closes


# ---------------------------------------------------------------- extraction (runs in the parent)

_SEPARATOR = re.compile(r"(?:[\s$,;.]|\\[,;:! ]|\\q?quad|\band\b|&|\\text\{\s*(?:and|,)?\s*\})*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:,|\{,\}|,\\!)\d{3})+(?:\.\d+)?")
_OPEN, _CLOSE = "([{", ")]}"


def list_items(answer: str) -> list[str]:
    """The top-level items of a comma or semicolon list (`3, 5, 7` → 3 items; `(1, 2)`, `\\{1, 2\\}`, `10,\\!080`
    and `1,000` → 1 item): separators inside brackets, braces or escaped braces, escaped separators (`\\,` `\\;`)
    and thousands groups do not split."""
    text = answer.strip()
    if _THOUSANDS.fullmatch(text):
        return [text]
    items, depth, last, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped brace `\\{ \\}` is a bracket (a set); any other escape is skipped
            depth = depth + 1 if text.startswith("{", i + 1) else max(0, depth - 1) if text.startswith("}", i + 1) \
                else depth
            i += 2
            continue
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch in ",;" and depth == 0 and not text.startswith("\\!", i + 1):
            items.append(text[last:i])
            last = i + 1
        i += 1
    items.append(text[last:])
    return [x.strip() for x in items if x.strip()]


def final_answer(response: str, gold: str, cfg: GraderSpec) -> tuple[str | None, bool]:
    """(answer, truncated) of one response under the `cfg` conventions; answer None = no answer."""
    commands = BOX_COMMANDS if cfg.fbox else ("boxed",)
    boxes = find_boxes(response, commands, cfg.braceless_box)
    if not boxes.contents or (boxes.truncated and cfg.unclosed_last_box == "no_answer"):
        return None, boxes.truncated
    answer = boxes.contents[-1]
    n = len(list_items(gold)) if cfg.join_boxes else 1
    if n > 1 and len(list_items(answer)) < n and len(boxes.contents) >= n and not boxes.truncated:
        tail = range(len(boxes.contents) - n, len(boxes.contents))
        between = [response[boxes.spans[k - 1][1]:boxes.spans[k][0]] for k in tail if k > tail[0]]
        # Only boxes that form one written list are joined, never earlier boxes of abandoned attempts.
        if all(_SEPARATOR.fullmatch(b) for b in between) and all(len(list_items(boxes.contents[k])) == 1
                                                                 for k in tail):
            answer = ", ".join(boxes.contents[k].strip() for k in tail)
    return answer, boxes.truncated


# ---------------------------------------------------------------- the semantics (runs in workers)

_PERCENT = re.compile(r"(?:\s|\\[,;:! ]|~)*(?:\\(?:text|mathrm|textrm|mbox)\{\s*(?:\\?%|percent)\s*\}|\\?%|percent\b)")


def strip_percent(answer: str) -> str:
    """`10\\%`, `10 \\%`, `10%`, `10\\,\\%`, `10\\text{\\%}`, `10 percent` → `10`: every percent sign, with the spacing
    before it."""
    return _PERCENT.sub("", answer).strip()


@dataclass(frozen=True)
class Semantics:
    """The comparison conventions a worker needs (a slice of GraderSpec)."""

    percent: str = "strip"
    rel_tol: float = 1e-4
    numeric_precision: int = 15

    @classmethod
    def of(cls, cfg: GraderSpec) -> Semantics:
        return cls(cfg.percent, cfg.rel_tol, cfg.numeric_precision)


_ACTIVE = Semantics()  # the conventions of the grading now running in this process (see _install)


def _quiet_math_verify() -> None:
    # Its "timeout is disabled" warning is expected: the timeouts are ours (module docstring).
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _relative_numeric_eq(a: Any, b: Any, float_rounding: int, numeric_precision: int) -> bool:
    """math-verify's numeric comparison with a RELATIVE tolerance: |a − b| ≤ tol · max(|a|, |b|), tol = rel_tol
    when either side holds a decimal (a Float), else 10^-numeric_precision, evaluated with 20 extra digits;
    two exact rationals compare exactly. Symbolic expressions and matrices keep math-verify's own rule."""
    from math_verify import grader as mv
    from sympy import Float, N, Rational

    a, b = mv.get_pct_val(a, a), mv.get_pct_val(b, b)
    try:
        numbers = bool(getattr(a, "is_number", False)) and bool(getattr(b, "is_number", False))
    except Exception:
        numbers = False
    if not numbers:
        return _UPSTREAM_NUMERIC_EQ(a, b, float_rounding, numeric_precision)
    ea, eb = mv.safe_sympy_doit(a), mv.safe_sympy_doit(b)
    if isinstance(ea, Rational) and isinstance(eb, Rational):
        return bool(ea == eb)
    floats = a.has(Float) or b.has(Float)
    tol = _ACTIVE.rel_tol if floats else 10.0 ** -_ACTIVE.numeric_precision
    digits = _ACTIVE.numeric_precision + 20
    try:
        va, vb = N(ea, digits), N(eb, digits)
        diff, scale = abs(va - vb), max(abs(va), abs(vb))
        return bool(diff <= Float(tol, digits) * scale)
    except Exception:  # not comparable as numbers (zoo, nan, a complex max): math-verify's own rule
        return _UPSTREAM_NUMERIC_EQ(a, b, float_rounding, numeric_precision)


_UPSTREAM_NUMERIC_EQ: Any = None


def _install(semantics: Semantics) -> None:
    """Make math-verify compare numbers by `semantics` in this process (workers and grade_one only)."""
    global _ACTIVE, _UPSTREAM_NUMERIC_EQ
    from math_verify import grader as mv

    if _UPSTREAM_NUMERIC_EQ is None:
        _UPSTREAM_NUMERIC_EQ = mv.sympy_numeric_eq
        mv.sympy_numeric_eq = _relative_numeric_eq
    _ACTIVE = semantics


def _norm(answer: str) -> str:
    return strip_percent(answer) or answer


def _parse(answer: str) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + _norm(answer) + "}", parsing_timeout=None))


_parse_cached = lru_cache(maxsize=4096)(_parse)  # a batch repeats each gold n times


def _parsed(answer: str) -> tuple:
    return _parse_cached(answer) if len(answer) <= _CACHE_MAX_CHARS else _parse(answer)


def _verify(extracted: str, gold: str) -> bool:
    from math_verify import verify

    golds = list(_parsed(gold))
    if _ACTIVE.percent == "scaled":  # Qwen2.5-Math include_percentage: gold, gold/100 and gold·100
        from sympy import Expr, Integer, Rational

        numbers = [g for g in golds if isinstance(g, Expr) and g.is_number]
        golds += [g * Rational(1, 100) for g in numbers] + [g * Integer(100) for g in numbers]
    return verify(golds, list(_parsed(extracted)), numeric_precision=_ACTIVE.numeric_precision,
                  timeout_seconds=None)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def grade_one(response: str, gold: str, cfg: GraderSpec | None = None) -> Grade:
    """The same semantics as Grader.grade for one item, in this process and WITHOUT a timeout (tests, debugging)."""
    from infra.spec import GraderSpec

    cfg = cfg or GraderSpec()
    _quiet_math_verify()
    _install(Semantics.of(cfg))
    extracted, truncated = final_answer(response, gold, cfg)
    if extracted is None:
        return Grade(False, None, truncated=truncated)
    try:
        return Grade(bool(_verify(extracted, gold)), extracted, truncated=truncated)
    except Exception as exc:
        return Grade(False, extracted, error=_describe(exc), truncated=truncated)


class _SoftTimeout(BaseException):
    """A BaseException so that math-verify's and sympy's `except Exception` cannot swallow it."""


_armed = False
_expired = False


def _on_alarm(signum: int, frame: Any) -> None:
    global _expired
    if _armed:  # a signal delivered after the item finished is ignored
        _expired = True
        raise _SoftTimeout


def _run_item(extracted: str, gold: str, soft_s: float | None) -> tuple[bool, bool, str | None]:
    """(correct, timed_out, error) for one item under the soft budget."""
    global _armed, _expired
    _expired = False
    correct, error = False, None
    try:
        try:
            if soft_s:
                _armed = True
                signal.setitimer(signal.ITIMER_REAL, soft_s)
            correct = bool(_verify(extracted, gold))
        finally:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        pass
    except Exception as exc:
        error = _describe(exc)
    if _expired:  # also when a bare `except:` inside sympy swallowed the interrupt and carried on
        return False, True, None
    return correct, False, error


def _worker_entry() -> None:
    """Worker process main: argv = socket fd, Semantics as JSON, soft budget (repr of a float or None)."""
    from multiprocessing.connection import Connection

    fd, semantics, soft = sys.argv[1:4]
    _worker_loop(Connection(int(fd)), Semantics(**json.loads(semantics)), None if soft == "None" else float(soft))


def _worker_loop(conn: Connection, semantics: Semantics, soft_s: float | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    signal.signal(signal.SIGALRM, _on_alarm)
    _quiet_math_verify()
    _install(semantics)
    # Warm-up outside any item's budget: the first parse of each kind triggers lazy imports.
    for pred, gold in (("0.5", "\\frac{1}{2}"), ("3", "x=3"), ("(1,2)", "[0,1)"), ("2\\sqrt{3}", "\\pi")):
        _run_item(pred, gold, None)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if chunk is None:
            return
        for idx, extracted, gold in chunk:
            result = _run_item(extracted, gold, soft_s)
            try:
                conn.send((idx, *result))
            except OSError:  # the parent is gone
                return


# ---------------------------------------------------------------- the pool (parent side)

def _soft_budget(timeout_s: float) -> float | None:
    return timeout_s * _SOFT_FRACTION


class _Worker:
    """One grading process and the items it was sent, in the order it grades them.

    A fresh interpreter started with subprocess rather than multiprocessing's spawn: the same isolation from
    whatever the caller has loaded (torch, CUDA, Ray, threads), without re-running the caller's __main__ module
    in every worker (a script without an `if __name__ == "__main__"` guard would break or run twice).
    """

    def __init__(self, semantics: Semantics, soft_s: float | None) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from rewards.grader import _worker_entry; _worker_entry()",
             str(theirs.fileno()), json.dumps(asdict(semantics)), repr(soft_s)],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            # its own session: a terminal's Ctrl-C (SIGINT to the foreground process group) reaching a worker that
            # is still starting, before it ignores SIGINT, printed "Fatal Python error"; the parent stops workers
            # itself, and an orphan exits at its socket's EOF
            start_new_session=True)
        theirs.close()  # the worker's end lives only in the worker, so its death reads as EOF here
        self.conn = Connection(ours.detach())
        self.started = time.monotonic()
        self.ready = False
        self.gone = False  # its socket hit EOF: the process has exited or is exiting
        self.items: deque[tuple[int, str, str]] = deque()
        self.head_since = 0.0  # when the worker began its current (first outstanding) item

    def send(self, chunk: list[tuple[int, str, str]], now: float) -> None:
        self.conn.send(chunk)
        if not self.items:
            self.head_since = now
        self.items.extend(chunk)

    def stop(self, grace_s: float = 1.0) -> None:
        try:
            self.conn.send(None)
            self.proc.wait(grace_s if not self.items else 0)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


@lru_cache(maxsize=1)
def grader_versions() -> dict[str, str]:
    """Everything the grading outcome depends on: the packages in the call path and our own sources."""
    out = {}
    for package in ("math-verify", "latex2sympy2_extended", "sympy", "antlr4-python3-runtime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "absent"
    out["source"] = closure_hash((__name__,))  # this module and every project module it imports
    return out


def grader_version() -> str:
    v = grader_versions()
    return f"math-verify=={v['math-verify']}+sympy=={v['sympy']}+latex2sympy2_extended=={v['latex2sympy2_extended']}" \
           f"+antlr4=={v['antlr4-python3-runtime']};src={v['source']}"


def _check_inputs(responses: list[str], golds: list[str]) -> None:
    if len(responses) != len(golds):
        raise DataError(f"grade: {len(responses)} responses but {len(golds)} golds")
    for name, values in (("responses", responses), ("golds", golds)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"grade: {name}[{i}]: expected a string, got {type(value).__name__}")
    for i, gold in enumerate(golds):
        if not gold.strip():
            raise DataError(f"grade: golds[{i}]: empty gold (every response would grade as wrong)")


class Grader:
    """The process pool grader for one GraderSpec. Thread-safe (calls are serialised); workers start lazily.

    facts()["counts"]: items (graded items returned), unboxed (no answer: no box, or only an unclosed one),
    truncated (the last box never closes; with unclosed_last_box=no_answer these are also unboxed), cache_hits (items answered without a worker of
    their own: the LRU, or an identical (extracted, gold) earlier in the same batch), graded (distinct pairs sent
    to workers), timeouts and errors (items, duplicates included), worker_starts, worker_kills, max_item_s.
    """

    def __init__(self, cfg: GraderSpec) -> None:
        self.cfg = cfg  # GraderSpec.backend admits only "math_verify"
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._counts = {"items": 0, "unboxed": 0, "truncated": 0, "cache_hits": 0, "graded": 0, "timeouts": 0, "errors": 0,
                        "worker_starts": 0, "worker_kills": 0}
        self._max_item_s = 0.0
        _LIVE.add(self)

    # -- public

    def grade(self, responses: list[str], golds: list[str]) -> list[Grade]:
        _check_inputs(responses, golds)
        with self._lock:
            out: list[Grade | None] = [None] * len(responses)
            jobs: dict[tuple[str, str], list[int]] = {}
            truncated = [False] * len(responses)
            for i, (response, gold) in enumerate(zip(responses, golds)):
                extracted, truncated[i] = final_answer(response, gold, self.cfg)
                self._counts["truncated"] += truncated[i]
                if extracted is None:
                    out[i] = Grade(False, None, truncated=truncated[i])
                    self._counts["unboxed"] += 1
                    continue
                key = (extracted, gold)
                if key in self._cache:
                    self._cache.move_to_end(key)
                    out[i] = Grade(self._cache[key], extracted, truncated=truncated[i])
                    self._counts["cache_hits"] += 1
                elif key in jobs:  # graded once for the whole batch
                    jobs[key].append(i)
                    self._counts["cache_hits"] += 1
                else:
                    jobs[key] = [i]
            keys = list(jobs)
            results = self._run(keys)
            for key, (correct, timed_out, error) in zip(keys, results):
                for i in jobs[key]:
                    out[i] = Grade(correct, key[0], timed_out, error, truncated[i])
                self._counts["timeouts"] += timed_out * len(jobs[key])
                self._counts["errors"] += (error is not None) * len(jobs[key])
                if not timed_out and error is None and len(key[0]) + len(key[1]) <= _CACHE_MAX_CHARS:
                    self._remember(key, correct)
            self._counts["items"] += len(out)
            self._counts["graded"] += len(keys)
            return out  # type: ignore[return-value]  # every slot is filled above

    def facts(self) -> dict:
        """Runtime facts for lineage and the audit: what graded, with which config, along which path, how often."""
        with self._lock:
            counts = {**self._counts, "max_item_s": round(self._max_item_s, 4)}
        return {"grader_version": grader_version(), "versions": dict(grader_versions()),
                "config": self.cfg.model_dump(mode="json"), "call_path": CALL_PATH, "counts": counts}

    def close(self) -> None:
        """Stop the workers; a later grade() starts new ones."""
        # Bounded wait: at interpreter exit a daemon thread may still be inside grade(); stop the workers anyway.
        locked = self._lock.acquire(timeout=10)
        try:
            if self._pid == os.getpid():
                for worker in self._workers:
                    worker.stop()
            self._workers = []
        finally:
            if locked:
                self._lock.release()

    # -- internals

    def _remember(self, key: tuple[str, str], correct: bool) -> None:
        self._cache[key] = correct
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def _start_worker(self) -> _Worker:
        self._counts["worker_starts"] += 1
        return _Worker(Semantics.of(self.cfg), _soft_budget(self.cfg.timeout_s))

    def _ensure_workers(self) -> None:
        if self._pid != os.getpid():  # forked: the workers belong to the parent process
            self._workers, self._pid = [], os.getpid()
        while len(self._workers) < self.cfg.workers:
            self._workers.append(self._start_worker())

    def _replace(self, index: int, todo: deque, results: list, head_result: tuple[bool, bool, str | None],
                 now: float) -> int:
        """Kill worker `index`, settle its current item with head_result, re-queue the rest; returns items settled."""
        worker = self._workers[index]
        worker.kill()
        self._counts["worker_kills"] += 1
        settled = 0
        if worker.items:
            idx = worker.items.popleft()[0]
            results[idx] = head_result
            self._max_item_s = max(self._max_item_s, now - worker.head_since)
            settled = 1
            if worker.items:
                todo.appendleft(list(worker.items))
        self._workers[index] = self._start_worker()
        return settled

    def _drain(self, worker: _Worker, results: list) -> int:
        """Read every message the worker has sent; returns the number of items it settled."""
        settled = 0
        try:
            while worker.conn.poll():
                msg = worker.conn.recv()
                now = time.monotonic()
                if msg[0] == "ready":
                    worker.ready = True
                    continue
                idx, correct, timed_out, error = msg
                head = worker.items.popleft()
                assert head[0] == idx, "grader worker answered out of order"
                results[idx] = (correct, timed_out, error)
                self._max_item_s = max(self._max_item_s, now - worker.head_since)
                worker.head_since = now
                settled += 1
        except (EOFError, OSError):
            worker.gone = True
        return settled

    def _run(self, keys: list[tuple[str, str]]) -> list[tuple[bool, bool, str | None]]:
        if not keys:
            return []
        try:
            return self._pump(keys)
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a failed start): busy workers would answer into the next batch.
            for worker in self._workers:
                worker.kill()
            self._workers = []
            raise

    def _pump(self, keys: list[tuple[str, str]]) -> list[tuple[bool, bool, str | None]]:
        from multiprocessing.connection import wait

        results: list[Any] = [None] * len(keys)
        self._ensure_workers()
        size = max(1, min(_CHUNK_MAX, math.ceil(len(keys) / (4 * len(self._workers)))))
        items = [(j, extracted, gold) for j, (extracted, gold) in enumerate(keys)]
        todo = deque(items[i:i + size] for i in range(0, len(items), size))
        remaining = len(keys)
        hard = self.cfg.timeout_s
        while remaining:
            now = time.monotonic()
            for worker in self._workers:
                # One chunk queued behind the current one keeps the worker busy between round trips; only a
                # small one, which the socket buffer takes without blocking while the worker is busy.
                while worker.ready and todo and (not worker.items or (
                        len(worker.items) <= size and sum(len(e) + len(g) for _, e, g in todo[0]) <= _PIPELINE_CHARS)):
                    worker.send(todo.popleft(), now)
            deadlines = [w.head_since + hard for w in self._workers if w.items]
            deadlines += [w.started + _START_TIMEOUT_S for w in self._workers if not w.ready]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            wait([w.conn for w in self._workers], timeout)  # a dead worker's socket reads as EOF
            for index, worker in enumerate(self._workers):
                remaining -= self._drain(worker, results)
                now = time.monotonic()
                code = worker.proc.wait() if worker.gone else worker.proc.poll()
                if code is not None:
                    if not worker.ready:
                        raise TwinarmError(f"grader worker exited with code {code} before it was ready "
                                           f"(can it import math_verify? see its stderr above)")
                    remaining -= self._replace(index, todo, results, (False, False, f"worker died (exit code {code})"),
                                               now)
                elif worker.items and now - worker.head_since >= hard:
                    remaining -= self._replace(index, todo, results, (False, True, None), now)
                elif not worker.ready and now - worker.started >= _START_TIMEOUT_S:
                    raise TwinarmError(f"grader worker did not start within {_START_TIMEOUT_S:.0f} s")
        return results


# ---------------------------------------------------------------- shared instances

_LIVE: weakref.WeakSet[Grader] = weakref.WeakSet()
_SHARED: dict[str, Grader] = {}
_SHARED_LOCK = threading.Lock()


def get_grader(cfg: GraderSpec) -> Grader:
    """The process-wide Grader for this config (one pool per distinct config)."""
    key = hash_json(cfg.model_dump(mode="json"))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Grader(cfg)
        return _SHARED[key]


@atexit.register
def _close_all() -> None:
    for grader in list(_LIVE):
        grader.close()
