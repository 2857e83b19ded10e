"""P12: key rotation under traffic - the longest stall of a TCP stream while one end rotates its key.

A 3-node netns lab (each node its own `wgcni-node run`, userspace WireGuard, peers told through the lab's peers
files as the API would tell them: node_hook.rotation). `ROUNDS` times, alternating the sending and the receiving end:
an iperf3 stream from a pod on A to a pod on B (20 Mbit/s, a report every 0.1 s) while that node runs
`wgcni-node rotate-key`; the row is the longest run of 0.1 s intervals without a received byte (0 = none; the
resolution is 100 ms), and the time from the command until every device holds the new key and no old one. Run
through `python -m bench.run --only P12` (as root), or `python -m bench.p12_rotation` for the rows as JSON.
"""

from __future__ import annotations

import json
import sys
import time

from bench import row
from wgcni_lab.harness.netns_lab import running_lab
from wgcni_lab.harness.streams import tcp_stream

TITLE = "key rotation under a TCP stream (3 netns nodes, userspace WireGuard): longest stall, key taken everywhere"
ROUNDS, QUICK_ROUNDS = 10, 1
TARGET_STALL_MS = 1000.0  # issue 11: no stalled second
NODES = {"a": "10.240.0.4", "b": "10.240.0.35", "c": "10.240.0.66"}
PODS = {"a": ["10.240.0.70"], "b": ["10.240.0.71"], "c": ["10.240.0.72"]}


def run(quick: bool) -> list[dict]:
    stalls, taken, received = [], [], []
    with running_lab(NODES, PODS) as lab:
        sender, receiver = (next(iter(lab.nodes[name].pods.values())) for name in "ab")
        for index in range(QUICK_ROUNDS if quick else ROUNDS):
            rotating = lab.nodes["a" if index % 2 == 0 else "b"]
            with tcp_stream(["ip", "netns", "exec", receiver.netns], ["ip", "netns", "exec", sender.netns],
                            receiver.ip) as report:
                started = time.monotonic()
                lab.rotate_key(rotating)
                taken.append(time.monotonic() - started)
            stalls.append(report.longest_stall() * 1000.0)
            received.append(report.received)
    return [
        row("rotation of one end (A, B alternately): longest stall of the stream", stalls, "ms",
            target_p99=TARGET_STALL_MS, note=f"0 = no 100 ms interval without data; {min(received)} bytes received "
                                             "at least per stream"),
        row("rotate-key -> every device on the new key only", [seconds * 1000.0 for seconds in taken], "ms",
            note="includes the 5 s between announcement and switch"),
    ]


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
