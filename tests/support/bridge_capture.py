"""tcpdump on the netns lab's VNet bridge, for the tests that assert what crosses it."""

from __future__ import annotations

import subprocess
import time

from wgcni_lab.harness.netns_lab import Lab


class Capture:
    """tcpdump on the VNet bridge (everything but ARP), read back as text lines."""

    def __init__(self, lab: Lab) -> None:
        self.file = lab.root / f"capture-{time.monotonic_ns()}.pcap"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", lab.vnet, "tcpdump", "-i", lab.bridge, "--immediate-mode", "-U", "-n",
             "-w", str(self.file), "not arp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        assert "listening on" in line, line

    def lines(self) -> list[str]:
        time.sleep(0.2)
        self.process.terminate()
        self.process.wait(timeout=10)
        out = subprocess.run(["tcpdump", "-nn", "-r", str(self.file)], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
