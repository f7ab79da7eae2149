"""Data-parallel training on CPU cores: rank 0 is the calling process (it owns the optimizer, the checkpoints and
the callbacks); ranks 1..n-1 are processes started here that only compute gradients (the trainer's own loop,
sft.train.follow). Collectives are torch.distributed over gloo, rendezvous through a FileStore in a fresh
temporary directory.

One optimizer step with n ranks:
1. rank 0 broadcasts the step (or STOP) and its parameters as one flat fp32 vector;
2. every rank builds the step's batch itself (`sft.train.batch_indices`: a function of step, seed and rows only),
   cuts it into the same length-sorted micro-batches as one process would, and runs its share of them, dealt
   snake-wise (0, 1, …, n-1, n-1, …, 0, …) so that short and long micro-batches are spread evenly; each
   micro-batch's loss has the same token weight (its trained tokens / the batch's) as in one process;
3. the flat gradients (zeros where a rank ran nothing) and the loss sums are summed onto rank 0 (`dist.reduce`),
   which clips, steps, checkpoints and evaluates exactly as with one process.

The gradient equals the one-process gradient up to the order of fp32 summation across micro-batches, so the rank
count changes low-order bits: it is part of the compute key (`executor.compute.shared_cpu_processes`).

Why not torch's DistributedDataParallel: DDP keeps an optimizer replica per rank and all-reduces inside backward,
which needs every rank to run the same number of backward passes; a batch's micro-batches divide unevenly (an
epoch's last batch may be a single micro-batch) and only rank 0 checkpoints and evaluates. Followers here hold no
optimizer state, so resuming is rank 0's alone (it loads its checkpoint and the next broadcast carries the
weights). Followers die with rank 0 (infra.procs.spawn), and rank 0 raises TwinarmError naming a follower's log
when a collective fails because a follower died.
"""
from __future__ import annotations

import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.errors import TwinarmError
from infra.procs import kill_all, spawn_jobs

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# rank 0 may evaluate between two steps (the base model's greedy val) while followers wait in a collective
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# every follower has built its model before the rendezvous starts (Ranks._wait_ready), so it takes well under a
# second: one that dies in it is named after this long, not after COLLECTIVE_TIMEOUT
RENDEZVOUS_TIMEOUT = timedelta(seconds=30)
START_TIMEOUT_S = 600  # a follower not ready (imports, model build) after this long is named as hung
STOP = -1


def join(store_path: str, rank: int, world: int) -> Any:
    """Join the ranks' rendezvous (a FileStore at store_path, RENDEZVOUS_TIMEOUT) and return the process group the
    steps' collectives run in (COLLECTIVE_TIMEOUT). Raises RuntimeError when a rank does not join."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=RENDEZVOUS_TIMEOUT)
    return dist.new_group(timeout=COLLECTIVE_TIMEOUT)


def ready_file(store_path: str, rank: int) -> str:
    """The file a follower creates once it is ready for the rendezvous (next to the FileStore)."""
    return f"{store_path}.rank{rank}.ready"


def deal(n_parts: int, world: int) -> list[list[int]]:
    """Micro-batch indices per rank, dealt snake-wise over length-sorted micro-batches: with 4 parts and 2 ranks,
    rank 0 gets [0, 3] and rank 1 [1, 2]. A rank may get none (a short batch)."""
    out: list[list[int]] = [[] for _ in range(world)]
    for i in range(n_parts):
        lap, pos = divmod(i, world)
        out[pos if lap % 2 == 0 else world - 1 - pos].append(i)
    return out


def flat_grads(params: list["torch.Tensor"]) -> "torch.Tensor":
    """All parameter gradients as one fp32 vector (zeros for a parameter without a gradient)."""
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


class Ranks:
    """Rank 0's side of a data-parallel run with `world` ranks (context manager; `world` 1 does nothing).

    `job` is what a follower needs to rebuild every step's batch (sft.train.follower_job); `log_dir` gets one
    `rank-N.log` per follower."""

    def __init__(self, world: int, job: dict[str, Any], log_dir: Path):
        self.world = world
        self.job = job
        self.log_dir = Path(log_dir)
        self.procs: list[subprocess.Popen] = []
        self.tmp: str | None = None
        self.group: Any = None  # the collectives' process group (join)

    def __enter__(self) -> "Ranks":
        if self.world == 1:
            return self
        import torch.distributed as dist

        self.tmp = tempfile.mkdtemp(prefix="twinarm-ranks-")
        store_path = str(Path(self.tmp) / "store")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the follower's loop is the trainer's own (sft.train.follow); this module does not import the trainer
        self.procs = spawn_jobs("sft.train", [{**self.job, "rank": rank, "world": self.world, "store": store_path}
                                              for rank in range(1, self.world)],
                                self.tmp, [self.log_dir / f"rank-{rank}.log" for rank in range(1, self.world)])
        try:
            self._wait_ready(store_path)
            try:
                self.group = join(store_path, 0, self.world)
            except RuntimeError as exc:
                raise self._peer_failure("the rendezvous", exc) from None
        except BaseException:
            if dist.is_initialized():
                dist.destroy_process_group()
            else:
                # a failed init_process_group has still used up a group name (c10d counts them; the names prefix
                # the store's keys): reset the count as destroy_process_group does, or a later rendezvous in this
                # process would name its groups differently from its fresh followers and wait for nothing
                from torch.distributed import distributed_c10d

                distributed_c10d._world.group_count = 0
            kill_all(self.procs, self.tmp)
            raise
        return self

    def _log(self, rank: int) -> Path:
        return self.log_dir / f"rank-{rank}.log"

    def _wait_ready(self, store_path: str) -> None:
        """Wait until every follower has built its model (its ready file), so that the rendezvous never waits for a
        follower that died starting. Raises TwinarmError naming its log when one exits first, or is not ready after
        START_TIMEOUT_S."""
        import time

        waiting = dict(enumerate(self.procs, start=1))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            for rank, proc in list(waiting.items()):
                if Path(ready_file(store_path, rank)).exists():
                    del waiting[rank]
                elif proc.poll() is not None:
                    log = self._log(rank)
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
                    raise TwinarmError(f"data-parallel training ({self.world} ranks): rank {rank} exited with code "
                                       f"{proc.returncode} while starting: {' '.join(tail) or 'no output'} "
                                       f"(log: {log})")
            if waiting and time.monotonic() > deadline:
                raise TwinarmError(f"data-parallel training ({self.world} ranks): rank(s) {sorted(waiting)} not "
                                   f"ready after {START_TIMEOUT_S} s (logs: "
                                   f"{', '.join(str(self._log(r)) for r in sorted(waiting))})")
            time.sleep(0.05)

    def __exit__(self, exc_type, exc, tb) -> None:
        import torch.distributed as dist

        if self.world == 1:
            return
        try:
            if exc_type is None:
                self._control(STOP)
                for proc in self.procs:
                    proc.wait(timeout=60)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            kill_all(self.procs, self.tmp)

    def _control(self, step: int) -> None:
        import torch

        self._collective("broadcast", torch.tensor([step], dtype=torch.long))

    def _collective(self, what: str, tensor: "torch.Tensor") -> None:
        import torch.distributed as dist

        try:
            if what == "broadcast":
                dist.broadcast(tensor, src=0, group=self.group)
            else:
                dist.reduce(tensor, dst=0, group=self.group)
        except RuntimeError as exc:
            raise self._peer_failure(what, exc) from None

    def _peer_failure(self, what: str, exc: RuntimeError) -> TwinarmError:
        """The error of a collective that failed: which followers exited, with their codes and logs."""
        for proc in self.procs:  # a peer's socket closes while its process is still being torn down
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        dead = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
        who = ", ".join(f"rank {r} exited with code {c} (log: {self._log(r)})" for r, c in dead) or \
            "no follower has exited"
        return TwinarmError(f"data-parallel training ({self.world} ranks): {what} failed: "
                            f"{str(exc).splitlines()[0]}; {who}")

    def begin_step(self, step: int, model: "PreTrainedModel", n_parts: int) -> list[int]:
        """Send the step (0-based) and the weights; returns the indices of the step's `n_parts` micro-batches that
        rank 0 runs itself (all of them with one rank)."""
        if self.world == 1:
            return list(range(n_parts))
        from torch.nn.utils import parameters_to_vector

        self._control(step)
        self._collective("broadcast", parameters_to_vector(model.parameters()).detach().float().contiguous())
        return deal(n_parts, self.world)[0]

    def end_step(self, model: "PreTrainedModel", loss_sum: float) -> float:
        """Sum every rank's gradients into rank 0's parameters' .grad; returns the summed loss."""
        if self.world == 1:
            return loss_sum
        import torch

        params = list(model.parameters())
        grads = flat_grads(params)
        self._collective("reduce", grads)
        losses = torch.tensor([loss_sum], dtype=torch.float64)
        self._collective("reduce", losses)
        offset = 0
        for p in params:
            p.grad = grads[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        return float(losses[0])
