"""Host clean-up shared by the lab's teardown (wgcni_lab.lab) and each node's containerd (wgcni_lab.containerd):
end a set of processes for good, and remove a directory tree that containerd's snapshotter made partly read-only."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Iterable


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (R, S, D, Z, ...), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def kill_processes(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL every pid, then wait (up to `timeout` in all) until each is gone or a zombie; our own children are
    reaped, anyone else's are left to their parent or init."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if process_state(pid) in (None, "Z"):
                break
            time.sleep(0.01)


def remove_tree(path: Path) -> None:
    """rm -rf, also through the read-only directories containerd's native snapshotter leaves."""
    if not path.exists():
        return
    for directory, subdirs, _files in os.walk(path):
        for subdir in subdirs:
            full = os.path.join(directory, subdir)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)
