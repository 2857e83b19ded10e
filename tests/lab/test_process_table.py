"""The one /proc scan the lab's teardown, each node's containerd and the lab footprint share
(wgcni_lab.cleanup.process_table and with_descendants), checked against a process tree this test starts."""

from __future__ import annotations

import os
import subprocess

from wgcni_lab.cleanup import kill_processes, netns_inode, process_table, with_descendants
from wgcni_lab.harness.polling import wait_until


def _sleeping_child(shell_pid: int) -> int | None:
    table = process_table()
    return next((pid for pid in with_descendants([shell_pid], table) - {shell_pid}
                 if table[pid].argv[:1] == (b"sleep",)), None)


def test_scan_sees_parent_argv_state_namespace_and_descendants() -> None:
    marker = f"wgcni-process-table-{os.getpid()}"
    shell = subprocess.Popen(["sh", "-c", f"sleep 300 & wait; : {marker}"])
    grandchild = None
    try:
        grandchild = wait_until(lambda: _sleeping_child(shell.pid), 10, what="the shell's sleep child")
        table = process_table()

        info = table[shell.pid]
        assert info.parent == os.getpid()
        assert info.argv == (b"sh", b"-c", f"sleep 300 & wait; : {marker}".encode())
        assert marker in info.command_line
        assert info.live and info.state in ("S", "R")
        assert netns_inode(f"/proc/{shell.pid}/ns/net") == netns_inode("/proc/self/ns/net")
        assert table[grandchild].parent == shell.pid
        assert with_descendants([shell.pid], table) == {shell.pid, grandchild}
        assert os.getpid() not in with_descendants([shell.pid], table), "ancestors are not descendants"

        kill_processes([grandchild])
        os.kill(shell.pid, 9)
        wait_until(lambda: process_table()[shell.pid].state == "Z", 10, what="the killed shell to be a zombie")
        assert not process_table()[shell.pid].live
    finally:
        kill_processes([pid for pid in (grandchild, shell.pid) if pid is not None])
        shell.wait(timeout=10)
    assert shell.pid not in process_table()
