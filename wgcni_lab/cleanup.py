"""Host clean-up shared by the lab's teardown (wgcni_lab.lab), each node's containerd (wgcni_lab.containerd) and the
lab tests' footprint: one scan of /proc's process table, end a set of processes for good, reap a subreaper's dead
children, remove a cgroup in every hierarchy, and remove a directory tree that containerd's snapshotter made partly
read-only."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ProcessInfo:
    """One process as /proc showed it during a scan."""

    pid: int
    parent: int
    argv: tuple[bytes, ...]
    state: str  # one letter: R, S, D, Z, ...

    @property
    def live(self) -> bool:
        """Not a zombie (a zombie holds no namespace, mount or file any more)."""
        return self.state != "Z"

    @property
    def command_line(self) -> str:
        """argv joined by spaces, for matching and for messages."""
        return b" ".join(self.argv).decode(errors="replace")


def netns_inode(path: str) -> int | None:
    """The inode that identifies the network namespace at `path` (/proc/PID/ns/net, /run/netns/NAME, a pod's
    netns path), or None when there is none."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def process_table() -> dict[int, ProcessInfo]:
    """pid -> ProcessInfo of every process, from one pass over /proc (processes that end during the pass are
    left out)."""
    table: dict[int, ProcessInfo] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw_argv = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        argv = raw_argv.split(b"\0")
        if argv[-1] == b"":
            argv.pop()
        table[int(entry.name)] = ProcessInfo(int(entry.name), int(fields[1]), tuple(argv), fields[0])
    return table


def with_descendants(roots: Iterable[int], table: Mapping[int, ProcessInfo]) -> set[int]:
    """`roots` and every process in `table` that descends from one of them."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.parent, []).append(info.pid)
    found = set(roots)
    pending = list(found)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (R, S, D, Z, ...), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def kill_processes(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL every pid, then wait (up to `timeout` in all) until each is gone or a zombie; our own children are
    reaped, anyone else's are left to their parent or init. Those whose parent was among them became ours (as
    subreaper) when it died and are reaped too: a zombie still populates its cgroup v2, which cannot be removed."""
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
    for pid in pids:  # all dead now: every orphan among them has been handed to its reaper
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def reap_children() -> None:
    """Collect every exited child of this process (orphans handed to it as subreaper included). Only for a process
    that waits for no child of its own elsewhere (the lab daemon): it takes their exit statuses."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def remove_cgroups(relative: str, timeout: float = 10.0) -> bool:
    """Remove the cgroup `relative` (a cgroup parent such as /wgcni-lab-<id>-node-1) and every cgroup below it, in
    every hierarchy, once their processes are dead; retried for up to `timeout` seconds, as a killed process keeps
    its cgroup v2 populated until it has exited and been reaped. True when nothing of it is left."""
    relative = relative.strip("/")
    if not relative:
        return True
    tops = [hierarchy / relative for hierarchy in CGROUP_ROOT.iterdir()] if CGROUP_ROOT.is_dir() else []
    deadline = time.monotonic() + timeout
    while True:
        for top in tops:
            if not top.is_dir() or top.is_symlink():
                continue
            below = sorted((path for path in top.rglob("*") if path.is_dir()), key=lambda path: -len(path.parts))
            for directory in [*below, top]:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        if not any(top.is_dir() and not top.is_symlink() for top in tops):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


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
