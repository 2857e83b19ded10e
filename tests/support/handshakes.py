"""WireGuard handshake initiations seen at a UDP socket standing in for a peer's endpoint, and the greeting check
both backends' tests run (WireGuardBackend.greet)."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable

from node_hook.contracts import UpsertPeer, WireGuardBackend


def handshake_initiations(sink: socket.socket, seconds: float) -> int:
    """WireGuard handshake initiations (message type 1, 148 bytes) arriving at `sink` within `seconds`."""
    count, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sink.settimeout(left)
        try:
            data = sink.recv(2048)
        except TimeoutError:
            break
        count += len(data) == 148 and data[0] == 1
    return count


def check_greetings(backend: WireGuardBackend, keys: Callable[[], str], wait: float) -> None:
    """On `backend`'s existing device: two peers with endpoints at local UDP sockets, one with persistent keepalive 25;
    `greet` makes one handshake initiation at the one without a session, leaves each keepalive as it was and does
    not create an unknown peer. `keys()` makes a public key; `wait` bounds the wait for the initiation."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink_a, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink_b:
        sink_a.bind(("127.0.0.1", 0))
        sink_b.bind(("127.0.0.1", 0))
        a, b, unknown = keys(), keys(), keys()
        backend.apply_peer_ops([
            UpsertPeer(a, ("127.0.0.1", sink_a.getsockname()[1]), (ipaddress.ip_network("10.9.0.0/24"),), True),
            UpsertPeer(b, ("127.0.0.1", sink_b.getsockname()[1]), (ipaddress.ip_network("10.9.1.0/24"),), True, 25)])
        assert handshake_initiations(sink_a, 1.0) == 0  # no traffic, keepalive off: nothing is sent
        backend.greet({a: 0, unknown: 0})
        assert handshake_initiations(sink_a, wait) == 1
        state = backend.read()
        assert state is not None
        assert state.peers[a].persistent_keepalive == 0 and state.peers[b].persistent_keepalive == 25
        assert unknown not in state.peers
        backend.greet({b: 25})
        after = backend.read()
        assert after is not None and after.peers[b].persistent_keepalive == 25
