"""`twinarm doctor SPEC`: can this spec's verl executor run here? Each check passes or fails with one line.

- ray: the Ray Jobs API (the head's dashboard) answers at executor.ray_address / RAY_ADDRESS;
- gpus: at least executor.verl.nnodes alive nodes with executor.verl.n_gpus_per_node GPUs each (Ray's state API);
- vllm: the `vllm` distribution is installed at a version verl 0.9.1 accepts (≥ 0.18.0, verl's own check in
  verl/third_party/vllm; verl[vllm] pins the version it is tested with) — only when the rollout engine is vllm;
- torch: torch is a CUDA build (torch.version.cuda is set);
- transfer_queue: verl's v1 trainer imports TransferQueue (verl's `verl-core` extra);
- home: TWINARM_HOME exists, is writable and sits on a filesystem every node can mount (nfs, lustre, …), not a
  local disk (ext4, xfs, overlay, tmpfs).
The package checks look at the Python running the doctor: run it with the cluster's environment (on the head node,
or `ray job submit -- twinarm doctor SPEC`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from infra.spec import BaseSpec

VLLM_MIN = "0.18.0"  # verl/third_party/vllm/__init__.py: "supported vllm versions are 0.18.0+"
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "fuse.",
             "wekafs", "9p", "virtiofs", "panfs", "efs")
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "apfs", "ntfs", "vfat")


@dataclass
class Check:
    name: str
    ok: bool
    line: str


def check_ray(address: str | None) -> tuple[Check, object | None]:
    from infra.errors import TwinarmError
    from rl.verl_jobs import client, dashboard_address

    try:
        url = dashboard_address(address)
        jobs = client(url)
        jobs.list_jobs()
    except TwinarmError as exc:
        return Check("ray", False, str(exc)), None
    except Exception as exc:  # the API answered with an error
        return Check("ray", False, f"the Ray Jobs API at {address} answered: {str(exc).splitlines()[0]}"), None
    return Check("ray", True, f"Ray Jobs API at {url}"), url


def check_gpus(url: str | None, nnodes: int, per_node: int) -> Check:
    if url is None:
        return Check("gpus", False, "GPUs: not checked (no Ray cluster reachable)")
    from ray.util.state import list_nodes

    nodes = [n for n in list_nodes(address=url, detail=True) if n.state == "ALIVE"]
    gpus = {n.node_ip: int((n.resources_total or {}).get("GPU", 0)) for n in nodes}
    ready = [ip for ip, g in gpus.items() if g >= per_node]
    if len(ready) < nnodes:
        have = ", ".join(f"{ip}: {g}" for ip, g in sorted(gpus.items())) or "no alive nodes"
        return Check("gpus", False, f"GPUs: verl needs {nnodes} node(s) with {per_node} GPUs each "
                                    f"(executor.verl.nnodes / n_gpus_per_node); the cluster has {have}")
    return Check("gpus", True, f"GPUs: {len(ready)} node(s) with ≥ {per_node} GPUs")


def pinned_vllm() -> str | None:
    """The vllm version verl[vllm] pins (from verl's package metadata)."""
    for req in metadata.requires("verl") or []:
        m = re.match(r"vllm\s*==\s*([\w.]+)\s*;\s*extra\s*==\s*['\"]vllm['\"]", req)
        if m:
            return m.group(1)
    return None


def check_vllm() -> Check:
    from packaging.version import Version

    pin = pinned_vllm()
    want = f"≥ {VLLM_MIN}" + (f" (verl[vllm] pins {pin})" if pin else "")
    try:
        have = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return Check("vllm", False, f"vLLM: not installed; verl's vllm rollout needs vllm {want}: "
                                    f"pip install 'verl[vllm]=={metadata.version('verl')}'")
    base = re.match(r"\d+\.\d+(\.\d+)?", have)
    if base is None or Version(base.group(0)) < Version(VLLM_MIN):
        return Check("vllm", False, f"vLLM: {have} installed; verl accepts {want}")
    return Check("vllm", True, f"vLLM {have} (verl accepts {want})")


def check_torch() -> Check:
    import torch

    if torch.version.cuda is None:
        return Check("torch", False, f"torch {torch.__version__} is not a CUDA build; verl trains on CUDA "
                                     f"(docs/gpu-cluster.md, 'Install for CUDA')")
    if not torch.cuda.is_available():
        return Check("torch", False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU here")
    return Check("torch", True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                f"{torch.cuda.device_count()} GPU(s) visible")


def check_transfer_queue() -> Check:
    try:
        have = metadata.version("TransferQueue")
    except metadata.PackageNotFoundError:
        return Check("transfer_queue", False, "TransferQueue: not installed; verl's v1 trainer imports it: "
                                              f"pip install 'verl[verl-core]=={metadata.version('verl')}'")
    return Check("transfer_queue", True, f"TransferQueue {have}")


def fs_type(path: Path, mounts: str | None = None) -> str:
    """The filesystem type of the mount holding `path` (longest mount point prefix in /proc/mounts)."""
    text = mounts if mounts is not None else Path("/proc/mounts").read_text()
    best, kind = "", "unknown"
    target = str(path.resolve())
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def check_home(root: Path, mounts: str | None = None) -> Check:
    if not root.is_dir():
        return Check("home", False, f"TWINARM_HOME {root} does not exist")
    if not os.access(root, os.W_OK):
        return Check("home", False, f"TWINARM_HOME {root} is not writable")
    kind = fs_type(root, mounts)
    if kind.startswith(SHARED_FS):
        return Check("home", True, f"TWINARM_HOME {root} on {kind}")
    if kind in LOCAL_FS:
        return Check("home", False, f"TWINARM_HOME {root} is on a local {kind} filesystem; every node must read "
                                    f"the same files: put it on a shared mount (NFS, Lustre, …)")
    return Check("home", False, f"TWINARM_HOME {root} is on a '{kind}' filesystem not known to be shared; "
                                f"use a shared mount (NFS, Lustre, …)")


def doctor(cfg: BaseSpec, root: Path, address: str | None = None, mounts: str | None = None) -> list[Check]:
    """Every check for the verl executor of `cfg` (address defaults to executor.ray_address / RAY_ADDRESS)."""
    v = cfg.executor.verl
    ray_check, url = check_ray(address or cfg.executor.ray_address)
    checks = [ray_check, check_gpus(url, v.nnodes, v.n_gpus_per_node)]
    if v.rollout_engine == "vllm":
        checks.append(check_vllm())
    checks += [check_torch(), check_transfer_queue(), check_home(root, mounts)]
    return checks


def print_doctor(spec_file: str, address: str | None, console: Any) -> int:
    """`twinarm doctor`: one line per check; exit 1 when any fails."""
    from rich.markup import escape

    from infra.home import home
    from infra.spec import load_spec

    spec = load_spec(spec_file)
    checks = doctor(spec.base, home().root, address)
    for c in checks:
        mark = "[green]✓[/]" if c.ok else "[bold red]✗[/]"
        console.print(f"{mark} {c.name:<15} {escape(c.line)}", highlight=False, soft_wrap=True)
    return 0 if all(c.ok for c in checks) else 1
