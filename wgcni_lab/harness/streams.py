"""A TCP stream through the tunnel for as long as a block runs, and the longest stall in it: how the tests and bench
P12 measure that a key rotation or a restart stops no connection.

iperf3 sends at a fixed rate; its server reports what arrived every 0.1 s (flushed as it goes), so the stream lasts
exactly as long as the block, however slow the machine (the VM tier emulates its CPU), and the stalls are counted
where the bytes arrive, not where a send buffer hides them.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from wgcni_lab.harness.polling import TIME_SCALE

STREAM_INTERVAL = 0.1  # iperf3's report interval: the resolution of a measured stall
_INTERVAL = re.compile(r"\]\s+(\d+\.\d+)-(\d+\.\d+)\s+sec\s+([\d.]+)\s+([KMG]?)Bytes")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass
class StreamReport:
    """What the receiving end saw: (seconds, bytes) per report interval, in order."""

    intervals: list[tuple[float, int]] = field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(size for _, size in self.intervals)

    def longest_stall(self) -> float:
        """The longest run of intervals in which no byte arrived, in seconds."""
        longest = current = 0.0
        for seconds, size in self.intervals:
            current = current + seconds if size == 0 else 0.0
            longest = max(longest, current)
        return longest


def parse_server_report(text: str) -> StreamReport:
    """The per-interval lines of an iperf3 server's text output (the summary lines, which span the whole test and
    name the receiver or sender, are left out; a repeated interval counts once)."""
    report = StreamReport()
    last = None
    for line in text.splitlines():
        match = _INTERVAL.search(line)
        if match is None or "receiver" in line or "sender" in line:
            continue
        start, end, amount, unit = match.groups()
        if (start, end) != last:  # a server whose client ended prints the last interval twice
            report.intervals.append((float(end) - float(start), round(float(amount) * _UNIT[unit])))
        last = (start, end)
    return report


@contextmanager
def tcp_stream(server: Sequence[str], client: Sequence[str], target: str, port: int = 5202,
               rate: str = "20M") -> Iterator[StreamReport]:
    """iperf3 from `client` (an argv prefix entering the sender's namespace) to `target` (served under `server`'s
    prefix), from before the block until it ends; the report is filled once the stream has ended."""
    report = StreamReport()
    serving = subprocess.Popen([*server, "iperf3", "-s", "-1", "-p", str(port), "-i", str(STREAM_INTERVAL),
                                "--forceflush"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3 * TIME_SCALE)
        sending = subprocess.Popen([*client, "iperf3", "-c", target, "-p", str(port), "-t", "3600", "-b", rate],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0 * TIME_SCALE)  # the stream runs before what the block does to it
            yield report
        finally:
            sending.send_signal(signal.SIGINT)  # iperf3 ends the test; its server reports the last interval
            try:
                sending.wait(timeout=10 * TIME_SCALE)
            except subprocess.TimeoutExpired:
                sending.kill()
                sending.wait()
        output = serving.communicate(timeout=10 * TIME_SCALE)[0]
        report.intervals.extend(parse_server_report(output).intervals)
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
