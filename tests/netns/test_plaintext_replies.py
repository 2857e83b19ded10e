"""Replies follow their request, on real namespaces: a host whose route to a client goes into the tunnel (the
client is a WireGuard node whose current key it does not hold - reimaged, key file lost) still answers the client's
plaintext request in plaintext, so the client can reach an API server behind that host and publish its new key;
strict mode gives no such reply (its promise: nothing to a cluster address leaves unencrypted).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_hook.apply.firewall import render_firewall, render_strict
from node_hook.contracts import FirewallSpec, StrictSpec
from wgcni_lab.harness.netns import Namespaces, in_ns

pytestmark = pytest.mark.netns

FWMARK = 0x100000
SERVER, CLIENT, PORT = "10.240.0.4", "10.240.0.5", 6443
CLUSTER = (ipaddress.ip_network("10.240.0.0/16"),)
ACCEPT_ONE = (f"import socket; s = socket.create_server(('{SERVER}', {PORT})); print('listening', flush=True); "
              "c, _ = s.accept(); c.sendall(b'ok'); c.close()")
CONNECT = f"import socket; c = socket.create_connection(('{SERVER}', {PORT}), timeout=2); print(c.recv(2).decode())"


def _spec(enforce: bool) -> FirewallSpec:
    """The hook's tables: the strict table is always there, counting plaintext (permissive: the default mode) or
    dropping it (strictMode)."""
    strict = StrictSpec("wgcni-strict", enforce, True, FWMARK, "wgcni0", ("azv",), 51820, CLUSTER, ())
    return FirewallSpec("wgcni", FWMARK, "wgcni0", ("azv",), 51820, strict)


def _tables(spec: FirewallSpec) -> str:
    assert spec.strict is not None
    return render_firewall(spec) + render_strict(spec.strict)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """A server namespace whose route to the client leads into `wgcni0` unless the fwmark sends it by the main
    table (`wgcni0` is a veth whose other end forwards nothing: what enters it is lost, as a reply under a key the
    peer no longer has), and a client on the same veth link that has no tunnel."""
    with Namespaces() as namespaces:
        server, client = namespaces.add_unique("rpl-s"), namespaces.add_unique("rpl-c")
        in_ns(server, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
        for name, address in ((server, SERVER), (client, CLIENT)):
            in_ns(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            in_ns(name, "ip", "link", "set", "eth0", "up")
        in_ns(server, "ip", "link", "add", "wgcni0", "type", "veth", "peer", "name", "wgsink")
        for link in ("wgcni0", "wgsink"):
            in_ns(server, "ip", "link", "set", link, "up")
        in_ns(server, "ip", "route", "add", f"{CLIENT}/32", "dev", "wgcni0", "table", "51820")
        in_ns(server, "ip", "rule", "add", "not", "fwmark", f"{FWMARK:#x}/{FWMARK:#x}", "table", "51820",
              "pref", "100")
        yield server, client


def _request(server: str, client: str) -> str:
    """One TCP connection from the client to a server in the server's namespace: what the client read, or
    "timeout"."""
    listener = subprocess.Popen(["ip", "netns", "exec", server, "python3", "-c", ACCEPT_ONE],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        result = in_ns(client, "python3", "-c", CONNECT, check=False)
        return result.stdout.strip() if result.returncode == 0 else "timeout"
    finally:
        listener.kill()
        listener.wait()


def _load(server: str, text: str, tmp_path: Path) -> None:
    ruleset = tmp_path / "ruleset.nft"
    ruleset.write_text(text)
    in_ns(server, "nft", "-f", str(ruleset))


def test_without_the_firewall_the_reply_is_lost_in_the_tunnel(pair: tuple[str, str]) -> None:
    assert _request(*pair) == "timeout"  # the control: the lock-out this file is about


def test_a_plaintext_request_gets_its_reply_in_plaintext(pair: tuple[str, str], tmp_path: Path) -> None:
    server, client = pair
    _load(server, _tables(_spec(enforce=False)), tmp_path)
    assert _request(server, client) == "ok"


def test_strict_mode_gives_a_wireguard_node_no_plaintext_reply(pair: tuple[str, str], tmp_path: Path) -> None:
    server, client = pair
    _load(server, _tables(_spec(enforce=True)), tmp_path)
    assert _request(server, client) == "timeout"
