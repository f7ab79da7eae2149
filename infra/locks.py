"""Advisory file locks (flock) that say who holds them: one run per ablation, one writer per stage directory."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from infra.errors import LockedError


@contextmanager
def exclusive(path: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on `path`; if another process holds it past wait_s, raise LockedError naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    try:
                        holder = json.loads(fh.read() or "{}")
                    except json.JSONDecodeError:
                        holder = {}
                    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                           if holder else "another process")
                    raise LockedError(f"{what} is already running ({who}). Wait for it to finish, or stop it; "
                                      f"the lock is {path}.") from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the flock
