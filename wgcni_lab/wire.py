"""What crosses the lab's VNet: a short tcpdump capture on Azure's fabric (`wgcni_lab.fabric`), parsed into packets.

tcpdump listens on every link of the fabric at ingress (`-i any -Q in`), so each packet a node or the client sends
into the VNet is seen exactly once, on the link of its sender (also when the fabric then drops it: an address no
NIC holds, a DF packet over the underlay's limit). It runs with `-nn -q -tt` (numeric, one line per packet, epoch
timestamps) and the filter `not arp`: ARP is a NIC asking the fabric for the gateway MAC and carries no payload.
Each packet becomes `{"time", "link", "src", "dst", "sport", "dport", "proto", "length", "line"}` (`link`: the
fabric link it entered on, i.e. the sending node's name or `client`; ports None when the protocol has none), so
callers can assert that pod traffic between nodes is only WireGuard UDP between node addresses.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from wgcni_lab import lab

_LINE = re.compile(r"^(?P<time>\d+\.\d+) (?:(?P<link>\S+) +(?:In|Out|B|M|P) +)?(?P<family>IP6?) "
                   r"(?P<src>\S+) > (?P<dst>\S+?): (?P<rest>.*)$")
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
    return {"time": float(match["time"]), "link": match["link"], "src": src, "dst": dst, "sport": sport,
            "dport": dport, "proto": proto, "length": int(length[1]) if length else None, "line": line.strip()}


def capture_fabric(state: lab.LabState, seconds: float, on_listening: Callable[[], None] = lambda: None,
                   stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Capture the IP packets entering the fabric for `seconds` (counted from when tcpdump listens:
    `on_listening`), or until `stop` is set."""
    capture = subprocess.Popen(
        ["ip", "netns", "exec", state.vnet_netns, "tcpdump", "-i", "any", "-Q", "in", "-nn", "-q", "-tt", "-l",
         "--immediate-mode", "not", "arp"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert capture.stderr is not None
        said = []
        for line in capture.stderr:  # tcpdump says "listening on any, ..." once the capture runs
            said.append(line.strip())
            if line.startswith("listening on"):
                break
        else:
            capture.wait(5)
            raise lab.LabError(f"tcpdump on the fabric failed: {' '.join(said) or 'no output'}")
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
