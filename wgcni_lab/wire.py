"""What crosses the lab's VNet bridge: a short tcpdump capture in the bridge's namespace, parsed into packets.

tcpdump runs with `-nn -q -tt` (numeric, one line per packet, epoch timestamps) and the filter `not arp`: ARP is the
nodes resolving each other's MAC on the shared L2 and carries no payload. Each packet becomes
`{"time", "src", "dst", "sport", "dport", "proto", "length", "line"}` (ports None when the protocol has none), so
callers can assert that pod traffic between nodes is only WireGuard UDP between node addresses.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from typing import Any, Callable

from wgcni_lab import lab

_LINE = re.compile(r"^(?P<time>\d+\.\d+) (?P<family>IP6?) (?P<src>\S+) > (?P<dst>\S+?): (?P<rest>.*)$")
_WITH_PORT = re.compile(r"^(?P<address>.+)\.(?P<port>\d+)$")


def _endpoint(text: str, has_ports: bool) -> tuple[str, int | None]:
    if has_ports:
        match = _WITH_PORT.match(text)
        if match:
            return match["address"], int(match["port"])
    return text, None


def parse_line(line: str) -> dict[str, Any] | None:
    """One `tcpdump -nn -q -tt` line as a packet; None for lines that are not IP packets."""
    match = _LINE.match(line.strip())
    if not match:
        return None
    rest = match["rest"]
    proto = rest.split(",", 1)[0].split()[0].lower() if rest else ""
    has_ports = proto in ("udp", "tcp")
    src, sport = _endpoint(match["src"], has_ports)
    dst, dport = _endpoint(match["dst"], has_ports)
    length = re.search(r"length (\d+)", rest)
    return {"time": float(match["time"]), "src": src, "dst": dst, "sport": sport, "dport": dport, "proto": proto,
            "length": int(length[1]) if length else None, "line": line.strip()}


def capture_bridge(state: lab.LabState, seconds: float, on_listening: Callable[[], None] = lambda: None,
                   stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Capture IP packets on the VNet bridge for `seconds` (counted from when tcpdump listens: `on_listening`), or
    until `stop` is set."""
    capture = subprocess.Popen(
        ["ip", "netns", "exec", state.vnet_netns, "tcpdump", "-i", lab.BRIDGE, "-nn", "-q", "-tt", "-l",
         "--immediate-mode", "not", "arp"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert capture.stderr is not None
        said = []
        for line in capture.stderr:  # tcpdump says "listening on vnet0, ..." once the capture runs
            said.append(line.strip())
            if line.startswith("listening on"):
                break
        else:
            capture.wait(5)
            raise lab.LabError(f"tcpdump on {lab.BRIDGE} failed: {' '.join(said) or 'no output'}")
        on_listening()
        (stop or threading.Event()).wait(seconds)
        capture.send_signal(signal.SIGINT)
        output, _ = capture.communicate(timeout=10)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    return [packet for packet in map(parse_line, output.splitlines()) if packet is not None]


def only_wireguard_between_nodes(state: lab.LabState, packets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The packets that are NOT WireGuard UDP from one node's address and port to another's (empty = all are)."""
    nodes = {node.ip for node in state.nodes}
    return [packet for packet in packets
            if not (packet["proto"] == "udp" and packet["src"] in nodes and packet["dst"] in nodes
                    and packet["src"] != packet["dst"] and packet["sport"] == lab.WG_PORT
                    and packet["dport"] == lab.WG_PORT)]
