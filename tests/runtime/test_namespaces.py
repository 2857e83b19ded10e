"""The suites' one way to make and remove a test network namespace (wgcni_lab.harness.netns.Namespaces), as the runtime
tests use it: unique names, loopback up, and nothing left behind, not even a process still running inside."""

from __future__ import annotations

import subprocess

import pytest

from wgcni_lab.cleanup import process_state
from wgcni_lab.harness.netns import Namespaces, in_ns, sh
from wgcni_lab.harness.polling import wait_until

pytestmark = [pytest.mark.netns]


def _listed() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()}


def test_unique_namespaces_come_up_and_go_with_the_processes_inside() -> None:
    with Namespaces() as namespaces:
        first = namespaces.add_unique("wgcni-rt-ns")
        second = namespaces.add_unique("wgcni-rt-ns")
        assert first != second and first.startswith("wgcni-rt-ns-") and {first, second} <= _listed()
        assert "UP" in in_ns(first, "ip", "-o", "link", "show", "lo").stdout

        sleeper = subprocess.Popen(["ip", "netns", "exec", first, "sleep", "300"])
        wait_until(lambda: str(sleeper.pid) in sh("ip", "netns", "pids", first).stdout.split(), 10,
                   what="the sleeper inside the namespace")
    try:
        assert not {first, second} & _listed()
        assert process_state(sleeper.pid) is None, "the process left inside was killed (and reaped)"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
