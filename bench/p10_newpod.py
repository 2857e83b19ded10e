"""P10: the new-pod window in the lab, strict and permissive - how long after a pod's ADD every other node reaches it.

For each mode a 3-node lab of its own (`wgcni-lab up --setting strictMode=...`, 1 pod a node), then `ROUNDS` times:
a pod is added on node A (RunPodSandbox, the CNI chain inside it) and, the moment the call returns, the pods of B and
C each ping the new IP every 10 ms until the first echo reply (`ping -c 1 -w 30 -i 0.01`); the window is the time
from asking for the sandbox until the later of the two first replies. The pod is deleted afterwards.

In strict mode every reply is encrypted: whatever either side sends before it knows the other is dropped, and the
window is the time a new pod is unreachable from other nodes. In permissive mode the same packets leave in plaintext
instead, so the first reply may come before the tunnel carries the pod (the window of plaintext, counted in the
row's note from B's and C's strict-table counters). Rows are in ms. Run through `python -m bench.run --only P10` (as
root, after `make build`), or `python -m bench.p10_newpod` for the rows as JSON.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import row
from wgcni_lab import lab

TITLE = ("new-pod window in the lab (3 nodes, userspace WireGuard): pod ADD on A -> first echo reply from B's and "
         "C's pods")
ROUNDS, QUICK_ROUNDS = 20, 2
TIMEOUT = 30.0
TARGET_P99_MS = 2000.0


def first_reply(pod: dict[str, Any], ip: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["nsenter", f"--net={pod['netns']}", "--", "ping", "-n", "-q", "-c", "1", "-i", "0.01",
                             "-w", str(int(TIMEOUT)), ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def plaintext_matched(nodes: list[lab.NodeState]) -> int:
    """Packets the strict tables of `nodes` counted (permissive) or dropped (strict) so far, both directions."""
    total = 0
    for node in nodes:
        listing = lab.in_node(node, ["nft", "-j", "list", "counters", "table", "inet", "wgcni-strict"]).stdout
        total += sum(item["counter"]["packets"] for item in json.loads(listing)["nftables"] if "counter" in item)
    return total


def samples(strict: bool, rounds: int) -> tuple[list[float], list[float], int]:
    """(windows, RunPodSandbox durations) in seconds, and the packets B's and C's strict tables matched meanwhile."""
    parent = Path(tempfile.mkdtemp(prefix="wgl-bench9-"))
    lab_dir = parent / "lab"
    command = [sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(lab_dir)]
    windows: list[float] = []
    runtime: list[float] = []
    try:
        up = subprocess.run([*command, "up", "--nodes", "3", "--pods-per-node", "1", "--setting",
                             f"strictMode={'true' if strict else 'false'}"], capture_output=True, text=True,
                            timeout=300)
        if up.returncode != 0:
            raise lab.LabError(f"wgcni-lab up failed: {up.stderr.strip()}")
        state = lab.require_state(lab_dir)
        a = state.nodes[0]
        senders = [next(pod for pod in lab.all_pods(state) if pod["node"] == node.name) for node in state.nodes[1:]]
        matched_before = plaintext_matched(state.nodes[1:])
        for _ in range(rounds):
            asked = time.monotonic()
            pod = lab.add_pod(state, a.name)
            runtime.append(time.monotonic() - asked)
            pingers = [first_reply(sender, pod["ip"]) for sender in senders]
            replied = []
            for pinger in pingers:
                if pinger.wait(TIMEOUT + 5) != 0:
                    raise lab.LabError(f"{pod['ip']} not reached within {TIMEOUT:g} s")
                replied.append(time.monotonic())
            windows.append(max(replied) - asked)
            lab.delete_pod(state, pod["name"])
        matched = plaintext_matched(state.nodes[1:]) - matched_before
    finally:
        subprocess.run([*command, "down"], capture_output=True, timeout=300)
        shutil.rmtree(parent, ignore_errors=True)
    return windows, runtime, matched


def run(quick: bool) -> list[dict]:
    rows = []
    for strict in (False, True):
        windows, runtime, matched = samples(strict, QUICK_ROUNDS if quick else ROUNDS)
        verdict = "dropped" if strict else "sent in plaintext"
        after = sorted((window - call) * 1000.0 for window, call in zip(windows, runtime, strict=True))
        rows.append(row(f"{'strict' if strict else 'permissive'}: ADD on A -> B and C reach the pod",
                        [seconds * 1000.0 for seconds in windows], "ms", target_p99=TARGET_P99_MS,
                        note=f"of which the RunPodSandbox call p50 {statistics.median(runtime) * 1000:.0f} ms; "
                             f"reached p50 {statistics.median(after):.0f} ms, max {after[-1]:.0f} ms after it "
                             f"returned; {matched} packets {verdict} by B's and C's strict tables meanwhile"))
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
