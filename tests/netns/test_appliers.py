"""Real-namespace tests of each applier: the UAPI client/backend against a real wireguard-go, routes and rules
through pyroute2, the nftables tables, and sysctls — each checked with independent tools (wg, ip, nft, /proc)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from node_hook.apply.firewall import NftFirewall
from node_hook.apply.routes import PyrouteRouting
from node_hook.apply.sysctl import Sysctls
from node_hook.apply.wg_uapi import SOCKET_DIR, UapiClient, UserspaceWireGuard
from node_hook.contracts import (
    AddRule,
    DeleteRoute,
    DeleteRule,
    DeviceSpec,
    FirewallSpec,
    RemoveAllowedIPs,
    RemovePeer,
    RuleSpec,
    SetRoute,
    UpsertPeer,
    WireGuardChange,
)
from node_hook.keys import public_key_of
from node_hook.model import RouteKind
from node_hook.planner import desired_rules
from tests.support.handshakes import check_greetings
from wgcni_lab.cleanup import process_state
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

n = ipaddress.ip_network


def new_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


def wg_show(ifname: str) -> dict[str, list[str]]:
    """peer key -> sorted allowed IPs, from `wg show <if> allowed-ips`."""
    out = subprocess.run(["wg", "show", ifname, "allowed-ips"], capture_output=True, text=True, check=True).stdout
    peers = {}
    for line in out.splitlines():
        key, _, rest = line.partition("\t")
        peers[key] = sorted(rest.split()) if rest != "(none)" else []
    return peers


@pytest.fixture
def backend(netns: str, short_tmp: Path):
    ifname = f"h3u{secrets.token_hex(3)}"
    exits: list[int] = []
    wireguard = UserspaceWireGuard(ifname, on_exit=exits.append, log_file=short_tmp / "wg.log")
    wireguard.exits = exits  # type: ignore[attr-defined]
    try:
        yield wireguard
    finally:
        wireguard.delete_device()
        wireguard.close()
        assert not (SOCKET_DIR / f"{ifname}.sock").exists()


def test_userspace_device_and_peers_against_wireguard_go(backend: UserspaceWireGuard) -> None:
    private = bytes(PrivateKey.generate())
    spec = DeviceSpec(backend.ifname, private, public_key_of(private), 51999, 0x100000, 1340)
    assert backend.read() is None
    backend.ensure_device(spec)
    state = backend.read()
    assert state is not None
    assert (state.public_key, state.listen_port, state.fwmark, state.mtu, state.up) == (
        public_key_of(private), 51999, 0x100000, 1340, True)
    show = subprocess.run(["wg", "show", backend.ifname, "dump"], capture_output=True, text=True, check=True)
    assert show.stdout.split("\t")[1] == public_key_of(private)  # independent reader agrees
    b, c = new_key(), new_key()
    backend.apply_peer_ops([
        UpsertPeer(b, ("10.240.0.35", 51820), (n("10.240.0.35/32"), n("10.240.0.70/31")), True, 25),
        UpsertPeer(c, ("fd00::66", 51820), (n("10.240.0.66/32"), n("fd00:1::/127")), True),
    ])
    assert wg_show(backend.ifname) == {b: ["10.240.0.35/32", "10.240.0.70/31"],
                                       c: ["10.240.0.66/32", "fd00:1::/127"]}
    # a peer given an IP takes it from the other peer (WireGuard semantics the fakes copy)
    backend.apply_peer_ops([UpsertPeer(c, ("fd00::66", 51820), (n("10.240.0.35/32"),), False)])
    assert wg_show(backend.ifname)[b] == ["10.240.0.70/31"]
    # single-prefix removal through the temporary zero-key peer: others untouched, no zero-key peer left
    backend.apply_peer_ops([UpsertPeer(b, ("10.240.0.35", 51820), (n("10.240.0.70/32"),), False, 25),
                            RemoveAllowedIPs(b, (n("10.240.0.70/31"),))])
    assert wg_show(backend.ifname) == {b: ["10.240.0.70/32"],
                                       c: ["10.240.0.35/32", "10.240.0.66/32", "fd00:1::/127"]}
    state = backend.read()
    assert state.peers[b].persistent_keepalive == 25 and state.peers[c].endpoint == ("fd00::66", 51820)
    backend.apply_peer_ops([RemovePeer(c)])
    assert set(wg_show(backend.ifname)) == {b}
    backend.ensure_device(replace(spec, mtu=1420))  # an MTU change keeps the peers
    state = backend.read()
    assert state.mtu == 1420 and set(state.peers) == {b}


def test_userspace_streams_requests_and_answers_larger_than_a_chunk(backend: UserspaceWireGuard) -> None:
    """30 000 AllowedIPs over 20 peers: the `set` is written in many chunks and the `get` parsed as it arrives; what
    wireguard-go holds (read by `wg`) and what the backend reads back are exactly what was sent."""
    private = bytes(PrivateKey.generate())
    backend.ensure_device(DeviceSpec(backend.ifname, private, public_key_of(private), 51999, 0x100000, 1340))
    keys = [new_key() for _ in range(20)]
    wanted = {key: tuple(n(f"10.{64 + index}.{host >> 8}.{host & 255}/32") for host in range(1500))
              for index, key in enumerate(keys)}
    assert sum(len(f"allowed_ip={p}") for prefixes in wanted.values() for p in prefixes) > 10 * UapiClient.SEND_CHUNK
    backend.apply_peer_ops([UpsertPeer(key, ("10.240.0.35", 51820), prefixes, True)
                            for key, prefixes in wanted.items()])
    shown = wg_show(backend.ifname)
    assert {key: len(prefixes) for key, prefixes in shown.items()} == {key: 1500 for key in keys}
    state = backend.read()
    assert state is not None and {key: peer.allowed_ips for key, peer in state.peers.items()} == {
        key: frozenset(prefixes) for key, prefixes in wanted.items()}


def test_killed_wireguard_go_is_reported_and_restarted_with_the_same_key(backend: UserspaceWireGuard) -> None:
    private = bytes(PrivateKey.generate())
    spec = DeviceSpec(backend.ifname, private, public_key_of(private), 51998, 0x100000, 1340)
    backend.ensure_device(spec)
    pid = backend.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: backend.exits, 5, what="exit reported")  # type: ignore[attr-defined]
    wait_until(lambda: backend.read() is None, 5, what="device gone")
    backend.ensure_device(spec)
    assert backend.pid not in (None, pid)
    assert backend.read().public_key == public_key_of(private)


def test_close_leaves_wireguard_go_serving_and_a_new_backend_adopts_it(netns: str, short_tmp: Path) -> None:
    ifname = f"h3u{secrets.token_hex(3)}"
    private = bytes(PrivateKey.generate())
    spec = DeviceSpec(ifname, private, public_key_of(private), 51997, 0x100000, 1340)
    first = UserspaceWireGuard(ifname, log_file=short_tmp / "wg.log")
    successor = None
    try:
        first.ensure_device(spec)
        peer = new_key()
        first.apply_peer_ops([UpsertPeer(peer, ("10.0.0.2", 51820), (n("10.9.0.0/24"),), True)])
        pid = first.pid
        first.close()
        successor = UserspaceWireGuard(ifname, log_file=short_tmp / "wg.log")
        successor.ensure_device(spec)
        assert os.path.exists(f"/proc/{pid}")  # the same process still serves the device, peers intact
        assert set(successor.read().peers) == {peer}
        successor.delete_device()
        wait_until(lambda: process_state(pid) in (None, "Z"), 5, what="adopted wireguard-go ended by delete_device")
        assert not (SOCKET_DIR / f"{ifname}.sock").exists()
    finally:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)  # ends wireguard-go if still there
        if successor is not None:
            successor.close()


def wg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["wg", *args], capture_output=True, text=True, check=check)


def test_the_uapi_proxy_forwards_wg_and_reports_what_others_write(netns: str, short_tmp: Path) -> None:
    """wireguard-go's own socket is private (its mount namespace); `wg` goes through the proxy, which reports every
    set it forwarded; the hook's own writes are not reported; a successor adopts wireguard-go and proxies again."""
    ifname = f"h3u{secrets.token_hex(3)}"
    private = bytes(PrivateKey.generate())
    spec = DeviceSpec(ifname, private, public_key_of(private), 51996, 0x100000, 1340)
    private_dir = short_tmp / "wireguard-go"
    changes: list[WireGuardChange] = []
    first = UserspaceWireGuard(ifname, log_file=short_tmp / "wg.log", private_dir=private_dir,
                               on_change=changes.append)
    successor = None
    try:
        first.ensure_device(spec)
        assert first.intercepting
        assert (private_dir / f"{ifname}.sock").is_socket()
        one, two = new_key(), new_key()
        first.apply_peer_ops([UpsertPeer(one, ("10.0.0.2", 51820), (n("10.9.0.0/24"),), True),
                              UpsertPeer(two, ("10.0.0.3", 51820), (n("10.9.1.1/32"),), True)])
        assert wg_show(ifname) == {one: ["10.9.0.0/24"], two: ["10.9.1.1/32"]}  # a get through the proxy
        assert changes == []
        wg("set", ifname, "peer", one, "remove")
        wait_until(lambda: changes, 5, what="the removal reported")
        assert changes.pop() == WireGuardChange(frozenset({one}))
        wg("set", ifname, "peer", two, "allowed-ips", "10.9.2.0/24", "endpoint", "10.0.0.9:1")
        wait_until(lambda: changes, 5, what="the edit reported")
        assert changes.pop() == WireGuardChange(frozenset({two}), frozenset({n("10.9.2.0/24")}))
        wg("set", ifname, "listen-port", "51995")
        wait_until(lambda: changes, 5, what="the port change reported")
        assert changes.pop().device
        pid = first.pid
        first.close()
        assert wg("show", ifname, check=False).returncode != 0  # no proxy while no hook serves it
        successor = UserspaceWireGuard(ifname, log_file=short_tmp / "wg.log", private_dir=private_dir,
                                       on_change=changes.append)
        successor.ensure_device(spec)
        assert os.path.exists(f"/proc/{pid}") and successor.intercepting  # the same process, proxied again
        assert set(wg_show(ifname)) == {two}
        wg("set", ifname, "peer", one, "allowed-ips", "10.9.1.1/32")
        wait_until(lambda: changes, 5, what="a write reported to the successor")
        assert changes.pop() == WireGuardChange(frozenset({one}), frozenset({n("10.9.1.1/32")}))
        successor.delete_device()
        wait_until(lambda: process_state(pid) in (None, "Z"), 5, what="wireguard-go ended by delete_device")
        assert not (SOCKET_DIR / f"{ifname}.sock").exists()
        assert not (private_dir / f"{ifname}.sock").exists()
    finally:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)  # ends wireguard-go if still there
        first.close()
        if successor is not None:
            successor.close()


def test_routes_and_rules_only_in_our_table(netns: str) -> None:
    subprocess.run(["ip", "link", "add", "wgfake0", "type", "veth", "peer", "name", "wgfake1"], check=True)
    subprocess.run(["ip", "link", "set", "wgfake0", "up"], check=True)
    subprocess.run(["ip", "route", "add", "10.99.0.0/16", "dev", "wgfake0"], check=True)  # main table: not ours
    subprocess.run(["ip", "rule", "add", "pref", "500", "lookup", "77"], check=True)  # another table's rule
    routing = PyrouteRouting(51820, "wgfake0", 98)
    try:
        rules = desired_rules(99, 0x100000, 51820)
        routing.apply([
            SetRoute(n("10.240.0.70/32"), RouteKind.WIREGUARD), SetRoute(n("10.240.0.9/32"), RouteKind.THROW),
            SetRoute(n("fd00::70/128"), RouteKind.WIREGUARD), SetRoute(n("fd00::9/128"), RouteKind.THROW),
            *[AddRule(rule) for rule in rules], *[AddRule(rule) for rule in rules],  # adding twice is fine
        ])
        subprocess.run(["ip", "route", "add", "10.240.5.0/24", "via", "10.99.0.1", "table", "51820"], check=True)
        state = routing.read()
        assert state.routes == {n("10.240.0.70/32"): "dev", n("10.240.0.9/32"): "throw",
                                n("fd00::70/128"): "dev", n("fd00::9/128"): "throw", n("10.240.5.0/24"): "foreign"}
        assert state.rules == rules
        shown = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
        assert "99:\tnot from all fwmark 0x100000/0x100000 lookup 51820" in shown
        table = subprocess.run(["ip", "route", "show", "table", "51820"], capture_output=True, text=True).stdout
        assert "10.240.0.70 dev wgfake0" in table and "throw 10.240.0.9" in table
        routing.apply([DeleteRoute(n("10.240.0.70/32")), DeleteRoute(n("10.240.0.70/32")),
                       SetRoute(n("10.240.0.9/32"), RouteKind.WIREGUARD),
                       DeleteRule(RuleSpec(4, 99, 0x100000, 0x100000, 51820, True))])
        state = routing.read()
        assert n("10.240.0.70/32") not in state.routes and state.routes[n("10.240.0.9/32")] == "dev"
        assert {rule.family for rule in state.rules} == {6}
        routing.flush()
        assert routing.read().routes == {} and routing.read().rules == frozenset()
        main = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        assert "10.99.0.0/16 dev wgfake0" in main
        assert "500:\tfrom all lookup 77" in subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
    finally:
        routing.close()


def test_bypass_rules_are_ours_only_at_their_priority(netns: str) -> None:
    """`from <IP> lookup main` at the bypass priority is the hook's; main-table rules elsewhere are not."""
    subprocess.run(["ip", "rule", "add", "pref", "98", "lookup", "main"], check=True)  # no source: not ours
    subprocess.run(["ip", "rule", "add", "pref", "97", "from", "10.240.0.8", "lookup", "main"], check=True)
    routing = PyrouteRouting(51820, "wgfake0", 98)
    try:
        rules = desired_rules(99, 0x100000, 51820, True, ["10.240.0.9", "fd00::9"])
        routing.apply([AddRule(rule) for rule in rules])
        assert routing.read().rules == rules
        shown = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
        assert "98:\tfrom 10.240.0.9 lookup main" in shown
        six = subprocess.run(["ip", "-6", "rule"], capture_output=True, text=True, check=True).stdout
        assert "98:\tfrom fd00::9 lookup main" in six
        routing.flush()
        left = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
        assert "from 10.240.0.9" not in left and "98:\tfrom all lookup main" in left
        assert "97:\tfrom 10.240.0.8 lookup main" in left and "32766:\tfrom all lookup main" in left
    finally:
        routing.close()


def test_firewall_tables_replace_atomically_and_delete_only_ours(netns: str) -> None:
    subprocess.run(["nft", "add", "table", "inet", "other"], check=True)
    firewall = NftFirewall("wgcni")
    spec = FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820)
    assert firewall.read() is None
    listing = firewall.apply(spec)
    assert listing == firewall.apply(spec) == firewall.read()
    ruleset = json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True).stdout)
    tables = {(item["table"]["family"], item["table"]["name"]) for item in ruleset["nftables"] if "table" in item}
    assert tables == {("inet", "other"), ("inet", "wgcni"), ("arp", "wgcni")}
    assert 'iifname "azv*" return' in listing and "udp dport 51820 accept" in listing
    assert firewall.apply(FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51821)) != listing
    firewall.delete()
    firewall.delete()
    assert firewall.read() is None
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert out.strip() == "table inet other"


def test_sysctls_are_per_namespace_and_restored(netns: str, short_tmp: Path) -> None:
    sysctls = Sysctls(short_tmp / "originals.json")
    name = "net/ipv4/conf/all/src_valid_mark"
    assert sysctls.read([name]) == {name: "0"}
    sysctls.write({name: "1"})
    assert Path("/proc/sys/net/ipv4/conf/all/src_valid_mark").read_text().strip() == "1"
    assert json.loads((short_tmp / "originals.json").read_text()) == {name: "0"}
    sysctls.write({name: "1"})  # the original stays the first value seen
    assert json.loads((short_tmp / "originals.json").read_text()) == {name: "0"}
    with pytest.raises(OSError, match="does not exist"):
        sysctls.write({"net/ipv4/conf/nosuchdev/rp_filter": "2"})
    sysctls.restore()
    assert sysctls.read([name]) == {name: "0"}
    assert not (short_tmp / "originals.json").exists()


def test_host_namespace_sysctl_untouched_by_namespace_tests() -> None:
    """The tests above ran in their own namespaces: the host's value is whatever it was (read in a fresh thread,
    which is in the host namespace)."""
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(
        Path("/proc/sys/net/ipv4/conf/all/src_valid_mark").read_text().strip()))
    thread.start()
    thread.join()
    assert seen == [Path("/proc/sys/net/ipv4/conf/all/src_valid_mark").read_text().strip()]


def test_greet_makes_one_handshake_keeps_each_keepalive_and_creates_no_peer(netns: str, short_tmp: Path) -> None:
    """`greet` sends each named peer one keepalive, so a peer without a session makes a handshake at once with no
    packet in the tunnel; each peer's persistent keepalive is as before afterwards; an unknown key is not created.
    Measured at the peers' endpoints, UDP sockets in the namespace."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ifname = f"h3u{secrets.token_hex(3)}"
    private = bytes(PrivateKey.generate())
    spec = DeviceSpec(ifname, private, public_key_of(private), 51996, 0x100000, 1340)
    backend = UserspaceWireGuard(ifname, log_file=short_tmp / "wg.log")
    try:
        backend.ensure_device(spec)
        check_greetings(backend, new_key, wait=1.5)
    finally:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        backend.close()
