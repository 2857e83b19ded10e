"""The kernel WireGuard backend against a real kernel (VM tier): device, peers, AllowedIPs, removal without a window,
read-back for the planner, checked with pyroute2's answers and independently with `wg show`."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
import subprocess
import threading
import time
from socket import AF_INET, SOCK_DGRAM

import pytest
from nacl.public import PrivateKey
from pyroute2.netns import create_socket

from node_hook.apply import wg_kernel
from node_hook.apply.wg_kernel import (
    TEMPORARY_PEER_KEY,
    KernelWireGuard,
    KernelWireGuardError,
)
from node_hook.config import Settings
from node_hook.contracts import DeviceSpec, RemoveAllowedIPs, RemovePeer, UpsertPeer, WireGuardChange
from node_hook.detect import kernel_wireguard_available
from node_hook.keys import public_key_of
from node_hook.node import real_wireguard_backend
from tests.support.handshakes import check_greetings
from tests.support.kernel_wg import ip, unique_name

pytestmark = [pytest.mark.kernel_wg, pytest.mark.usefixtures("kernel_wireguard")]

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not exported by Python's socket module


def net(text: str):
    return ipaddress.ip_network(text)


def new_key() -> tuple[bytes, str]:
    private = PrivateKey.generate()
    return bytes(private), wg_kernel.encode_key(bytes(private.public_key))


def wg_show(ifname: str, what: str, netns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, "wg", "show", ifname, what], check=True, capture_output=True, text=True).stdout


def wg_allowed_ips(ifname: str) -> dict[str, set]:
    """`wg show <if> allowed-ips` parsed: public key -> set of networks (independent of pyroute2)."""
    result: dict[str, set] = {}
    for line in wg_show(ifname, "allowed-ips").splitlines():
        key, *prefixes = line.split()
        result[key] = {net(p) for p in prefixes if p != "(none)"}
    return result


@pytest.fixture
def backend(wg_ifname):
    device = KernelWireGuard(wg_ifname)
    try:
        yield device
    finally:
        device.delete_device()
        device.close()


def spec_for(ifname: str, private: bytes, port: int = 51820, fwmark: int = 0x100000, mtu: int = 1420) -> DeviceSpec:
    return DeviceSpec(name=ifname, private_key=private, public_key=public_key_of(private), listen_port=port,
                      fwmark=fwmark, mtu=mtu)


def test_the_daemon_picks_the_kernel_backend_for_auto_in_the_vm(wg_ifname):
    assert kernel_wireguard_available()  # the daemon's own check (module files) agrees with the netlink probe
    backend = real_wireguard_backend(Settings(backend="auto", interface=wg_ifname), on_exit=lambda code: None)
    try:
        assert isinstance(backend, KernelWireGuard) and backend.kind == "kernel"
    finally:
        backend.close()


def _captured(capture, timeout: float = 20.0) -> list:
    changes: list = []
    deadline = time.monotonic() + timeout
    while not changes and time.monotonic() < deadline:
        changes += capture.receive()
    return changes


def test_writes_by_others_are_captured_and_our_own_are_not(backend, wg_ifname):
    private, _ = new_key()
    backend.ensure_device(spec_for(wg_ifname, private))
    capture = backend.capture()
    capture.open()
    try:
        assert wg_kernel.capture_link_name(wg_ifname) in ip("link")
        one, two = new_key()[1], new_key()[1]
        backend.apply_peer_ops([UpsertPeer(one, ("10.0.0.2", 51820), (net("10.9.0.0/24"),), True)])  # ours
        subprocess.run(["wg", "set", wg_ifname, "peer", two, "allowed-ips", "10.9.1.1/32"], check=True)
        assert _captured(capture) == [WireGuardChange(frozenset({two}), frozenset({net("10.9.1.1/32")}))]
        backend.apply_peer_ops([RemovePeer(one)])  # ours
        subprocess.run(["wg", "set", wg_ifname, "peer", one, "remove"], check=True)
        assert _captured(capture) == [WireGuardChange(frozenset({one}))]
        subprocess.run(["wg", "set", wg_ifname, "listen-port", "51821"], check=True)
        assert _captured(capture)[0].device
    finally:
        capture.close()
    assert wg_kernel.capture_link_name(wg_ifname) not in ip("link")


def test_a_capture_that_fails_to_open_leaves_no_link(backend, wg_ifname, monkeypatch):
    private, _ = new_key()
    backend.ensure_device(spec_for(wg_ifname, private))
    capture = backend.capture()

    def broken_filter(family_id: int) -> bytes:
        raise OSError(errno.EINVAL, "injected: the filter cannot be built")

    monkeypatch.setattr(wg_kernel, "set_device_filter", broken_filter)
    with pytest.raises(OSError, match="injected"):
        capture.open()
    assert wg_kernel.capture_link_name(wg_ifname) not in ip("link")
    assert capture.socket is None


def test_device_created_configured_and_deleted(backend, wg_ifname):
    assert backend.read() is None
    private, public = new_key()
    backend.ensure_device(spec_for(wg_ifname, private, port=51820, fwmark=0x100000, mtu=1340))
    state = backend.read()
    assert (state.public_key, state.listen_port, state.fwmark, state.mtu, state.up) == (
        public, 51820, 0x100000, 1340, True
    )
    assert state.peers == {}
    assert wg_show(wg_ifname, "public-key").strip() == public
    assert wg_show(wg_ifname, "listen-port").strip() == "51820"
    assert wg_show(wg_ifname, "fwmark").strip() == "0x100000"
    link = ip("-d", "link", "show", wg_ifname)
    assert "mtu 1340" in link and "wireguard" in link and ",UP" in link

    # Changing key, port, fwmark and MTU converges; a second call with the same spec changes nothing.
    private2, public2 = new_key()
    backend.ensure_device(spec_for(wg_ifname, private2, port=51999, fwmark=0x200000, mtu=1400))
    backend.ensure_device(spec_for(wg_ifname, private2, port=51999, fwmark=0x200000, mtu=1400))
    state = backend.read()
    assert (state.public_key, state.listen_port, state.fwmark, state.mtu) == (public2, 51999, 0x200000, 1400)

    # Link set down behind our back: ensure_device brings it up again.
    ip("link", "set", wg_ifname, "down")
    assert backend.read().up is False
    backend.ensure_device(spec_for(wg_ifname, private2, port=51999, fwmark=0x200000, mtu=1400))
    assert backend.read().up is True

    backend.delete_device()
    assert backend.read() is None
    assert subprocess.run(["ip", "link", "show", wg_ifname], capture_output=True).returncode != 0
    backend.delete_device()  # already gone: no error


def test_greet_makes_one_handshake_keeps_each_keepalive_and_creates_no_peer(backend, wg_ifname):
    """As the userspace backend's test (tests/netns/test_appliers.py): one handshake per greeting, keepalives kept,
    no peer created; the kernel sends a keepalive when persistent keepalive goes from off to on."""
    private, _ = new_key()
    backend.ensure_device(spec_for(wg_ifname, private, port=51997))
    check_greetings(backend, lambda: new_key()[1], wait=3.0)


def test_foreign_link_with_our_name_is_neither_taken_over_nor_deleted(wg_ifname):
    ip("link", "add", wg_ifname, "type", "dummy")
    device = KernelWireGuard(wg_ifname)
    try:
        with pytest.raises(KernelWireGuardError, match="dummy link"):
            device.ensure_device(spec_for(wg_ifname, new_key()[0]))
        with pytest.raises(KernelWireGuardError, match="dummy link"):
            device.read()
        with pytest.raises(KernelWireGuardError, match="refusing to delete"):
            device.delete_device()
        assert "dummy" in ip("-d", "link", "show", wg_ifname)
    finally:
        device.close()


def test_peers_added_replaced_moved_and_removed(backend, wg_ifname):
    backend.ensure_device(spec_for(wg_ifname, new_key()[0]))
    _, peer_a = new_key()
    _, peer_b = new_key()
    backend.apply_peer_ops(
        [
            UpsertPeer(peer_a, ("10.240.0.35", 51820), (net("10.240.1.7/32"), net("10.240.1.8/31")), True, 25),
            UpsertPeer(peer_b, ("fd00::66", 51821), (net("10.240.2.0/30"), net("fd00:1::/64")), True, 0),
        ]
    )
    peers = backend.read().peers
    assert peers[peer_a].endpoint == ("10.240.0.35", 51820)
    assert peers[peer_a].persistent_keepalive == 25
    assert peers[peer_a].allowed_ips == {net("10.240.1.7/32"), net("10.240.1.8/31")}
    assert peers[peer_b].endpoint == ("fd00::66", 51821)
    assert peers[peer_b].allowed_ips == {net("10.240.2.0/30"), net("fd00:1::/64")}
    assert wg_allowed_ips(wg_ifname) == {k: set(p.allowed_ips) for k, p in peers.items()}

    # Adding without replace keeps what is there; a prefix given to B is taken from A (kernel semantics).
    backend.apply_peer_ops(
        [
            UpsertPeer(peer_a, ("10.240.0.35", 51820), (net("10.240.1.20/32"),), False, 25),
            UpsertPeer(peer_b, ("fd00::66", 51821), (net("10.240.1.7/32"),), False, 0),
        ]
    )
    allowed = wg_allowed_ips(wg_ifname)
    assert allowed[peer_a] == {net("10.240.1.8/31"), net("10.240.1.20/32")}
    assert allowed[peer_b] == {net("10.240.2.0/30"), net("fd00:1::/64"), net("10.240.1.7/32")}

    # Replace sets the whole list; the endpoint and keepalive follow the op.
    backend.apply_peer_ops([UpsertPeer(peer_a, ("10.240.0.36", 51822), (net("10.240.3.1/32"),), True, 0)])
    peer = backend.read().peers[peer_a]
    assert peer.allowed_ips == {net("10.240.3.1/32")}
    assert (peer.endpoint, peer.persistent_keepalive) == (("10.240.0.36", 51822), 0)

    backend.apply_peer_ops([RemovePeer(peer_a), RemovePeer(new_key()[1])])  # removing an unknown peer is a no-op
    assert set(backend.read().peers) == {peer_b}
    assert set(wg_allowed_ips(wg_ifname)) == {peer_b}


@pytest.mark.parametrize("strategy", ["probed", "temporary-peer"])
def test_single_prefix_removal_keeps_the_rest_and_leaves_no_temporary_peer(backend, wg_ifname, strategy):
    """Both strategies: whatever the probe finds on this kernel, and the temporary-peer fallback forced."""
    backend.ensure_device(spec_for(wg_ifname, new_key()[0]))
    _, peer_a = new_key()
    _, peer_b = new_key()
    a_prefixes = (net("10.240.0.65/32"), net("10.240.0.66/32"), net("10.240.0.80/28"), net("fd00::65/128"))
    backend.apply_peer_ops(
        [
            UpsertPeer(peer_a, ("10.240.0.4", 51820), a_prefixes, True),
            UpsertPeer(peer_b, ("10.240.0.5", 51820), (net("10.240.0.99/32"),), True),
        ]
    )
    supported = backend.per_ip_remove_supported()
    print(f"kernel {os.uname().release}: per-AllowedIP removal {'supported' if supported else 'not supported'}")
    if strategy == "temporary-peer":
        backend._per_ip_remove = False
    # The probe leaves nothing behind.
    assert set(backend.read().peers) == {peer_a, peer_b}

    backend.apply_peer_ops([RemoveAllowedIPs(peer_a, (net("10.240.0.66/32"), net("fd00::65/128")))])
    allowed = wg_allowed_ips(wg_ifname)
    assert allowed == {
        peer_a: {net("10.240.0.65/32"), net("10.240.0.80/28")},
        peer_b: {net("10.240.0.99/32")},
    }
    assert TEMPORARY_PEER_KEY not in allowed

    # A prefix that moved to B earlier in the same batch is B's now: removing it "from A" leaves B's alone.
    backend.apply_peer_ops(
        [
            UpsertPeer(peer_b, ("10.240.0.5", 51820), (net("10.240.0.65/32"),), False),
            RemoveAllowedIPs(peer_a, (net("10.240.0.65/32"),)),
        ]
    )
    allowed = wg_allowed_ips(wg_ifname)
    assert allowed[peer_a] == {net("10.240.0.80/28")}
    assert allowed[peer_b] == {net("10.240.0.99/32"), net("10.240.0.65/32")}


def test_large_batches_are_split_and_read_back_whole(backend, wg_ifname, monkeypatch):
    """Thousands of prefixes do not fit one netlink message either way: writes are split (a peer continued in the
    next message keeps what the previous one added) and the kernel's multi-part dump is merged."""
    backend.ensure_device(spec_for(wg_ifname, new_key()[0]))
    big_peer = new_key()[1]
    big = tuple(ipaddress.ip_network(f"10.{64 + i // 250}.{i % 250}.1/32") for i in range(3000))
    small = {new_key()[1]: (net(f"10.200.{i}.0/30"), net(f"fd00:{i:x}::/96")) for i in range(200)}
    sent: list = []
    socket = backend._socket()
    original = socket.set_device
    monkeypatch.setattr(socket, "set_device", lambda message: (sent.append(message), original(message))[1])
    backend.apply_peer_ops(
        [UpsertPeer(big_peer, ("10.240.0.35", 51820), big, True)]
        + [UpsertPeer(key, None, prefixes, True) for key, prefixes in small.items()]
    )
    assert len(sent) > 1
    state = backend.read()
    assert state.peers[big_peer].allowed_ips == frozenset(big)
    for key, prefixes in small.items():
        assert state.peers[key].allowed_ips == frozenset(prefixes)
        assert state.peers[key].endpoint is None
    assert len(wg_allowed_ips(wg_ifname)[big_peer]) == 3000


@pytest.fixture
def tunnel(backend, wg_ifname, netns):
    """Our device (root namespace of the VM) and a peer device living in its own namespace, connected over
    loopback: the peer link is created and configured in the root namespace, then moved, so its UDP socket stays
    on the root namespace's loopback. Our side routes 10.99.0.0/24 to it; the peer owns 10.99.0.1-3."""
    ns = netns()
    peer_name = unique_name("wgp")
    # Fresh ports per test: a namespace deleted by the previous test frees its device's UDP port asynchronously.
    local_port, peer_port = random.sample(range(20000, 32000), 2)
    local_private, local_public = new_key()
    peer_private, peer_public = new_key()
    backend.ensure_device(spec_for(wg_ifname, local_private, port=local_port, fwmark=0))
    peer_device = KernelWireGuard(peer_name)
    try:
        peer_device.ensure_device(spec_for(peer_name, peer_private, port=peer_port, fwmark=0))
        peer_device.apply_peer_ops([UpsertPeer(local_public, ("127.0.0.1", local_port), (net("10.98.0.1/32"),), True)])
    finally:
        peer_device.close()
    ip("link", "set", peer_name, "netns", ns)
    for address in ("10.99.0.1", "10.99.0.2", "10.99.0.3"):
        ip("-n", ns, "addr", "add", f"{address}/32", "dev", peer_name)
    ip("-n", ns, "link", "set", peer_name, "up")
    ip("-n", ns, "route", "add", "10.98.0.1/32", "dev", peer_name)
    ip("addr", "add", "10.98.0.1/32", "dev", wg_ifname)
    ip("route", "add", "10.99.0.0/24", "dev", wg_ifname, "src", "10.98.0.1")
    peer_ips = (net("10.99.0.1/32"), net("10.99.0.2/32"), net("10.99.0.3/32"))
    backend.apply_peer_ops([UpsertPeer(peer_public, ("127.0.0.1", peer_port), peer_ips, True)])
    return peer_public, ns, peer_port


class UdpProbe:
    """Datagrams from the root namespace to addresses of the peer namespace, counted by sockets opened inside it
    (one-way traffic exercises exactly our device's AllowedIPs lookup on the way out)."""

    port = 40000

    def __init__(self, netns_name: str, addresses: tuple[str, ...]):
        self.receivers = {}
        for address in addresses:
            receiver = create_socket(netns_name, AF_INET, SOCK_DGRAM, flags=0)
            # Room for a whole stream read afterwards (the default buffer drops the tail of ~300 datagrams).
            receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            receiver.bind((address, self.port))
            self.receivers[address] = receiver
        self.sender = socket.socket(AF_INET, SOCK_DGRAM)

    def send(self, address: str, payload: bytes) -> None:
        try:
            self.sender.sendto(payload, (address, self.port))
        except OSError as error:  # wireguard answers ENOKEY when no peer holds the destination
            if error.errno != errno.ENOKEY:
                raise

    def received(self, address: str, wait: float) -> list[bytes]:
        """Everything that arrived for `address`, waiting up to `wait` seconds after the last datagram."""
        receiver = self.receivers[address]
        got = []
        receiver.settimeout(wait)
        try:
            while True:
                got.append(receiver.recv(2048))
        except TimeoutError:
            return got

    def close(self) -> None:
        self.sender.close()
        for receiver in self.receivers.values():
            receiver.close()


@pytest.fixture
def probe(tunnel):
    _, ns, _ = tunnel
    udp = UdpProbe(ns, ("10.99.0.1", "10.99.0.2", "10.99.0.3"))
    try:
        yield udp
    finally:
        udp.close()


def test_traffic_handshake_and_counters(backend, tunnel, probe):
    peer_public, _, _ = tunnel
    probe.send("10.99.0.1", b"hello")
    assert probe.received("10.99.0.1", wait=10) == [b"hello"]
    peer = backend.read().peers[peer_public]
    assert peer.latest_handshake > 0
    assert peer.rx_bytes > 0 and peer.tx_bytes > 0


def test_removing_one_ip_never_interrupts_the_peers_other_ips(backend, tunnel, probe, monkeypatch):
    """While 10.99.0.3 is removed from and given back to the peer over and over, a steady stream to 10.99.0.2
    (same peer) loses nothing, and no message ever rewrites the peer's own AllowedIPs."""
    peer_public, _, peer_port = tunnel
    probe.send("10.99.0.2", b"warm-up")  # handshake before measuring
    assert probe.received("10.99.0.2", wait=10) == [b"warm-up"]
    sent: list = []
    socket_ = backend._socket()
    original = socket_.set_device
    monkeypatch.setattr(socket_, "set_device", lambda message: (sent.append(message), original(message))[1])
    streamed = 300
    stop = threading.Event()

    def stream() -> None:
        for sequence in range(streamed):
            probe.send("10.99.0.2", str(sequence).encode())
            time.sleep(0.005)
        stop.set()

    sender = threading.Thread(target=stream)
    sender.start()
    cycles = 0
    while not stop.is_set():
        backend.apply_peer_ops([RemoveAllowedIPs(peer_public, (net("10.99.0.3/32"),))])
        assert backend.read().peers[peer_public].allowed_ips == {net("10.99.0.1/32"), net("10.99.0.2/32")}
        backend.apply_peer_ops([UpsertPeer(peer_public, ("127.0.0.1", peer_port), (net("10.99.0.3/32"),), False)])
        cycles += 1
    sender.join()
    arrived = probe.received("10.99.0.2", wait=5)
    assert cycles >= 5, "too few removal cycles overlapped the stream"
    missing = set(range(streamed)) - {int(payload) for payload in arrived}
    assert not missing, f"{len(missing)} of {streamed} datagrams lost during {cycles} removal cycles"
    for message in sent:
        decoded = wg_kernel.WireGuardMessage(message.data)
        decoded.decode()
        for peer in decoded.get_attr("WGDEVICE_A_PEERS"):
            if wg_kernel._key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")) == peer_public:
                flags = peer.get_attr("WGPEER_A_FLAGS") or 0
                assert not flags & (wg_kernel.WGPEER_F_REPLACE_ALLOWEDIPS | wg_kernel.WGPEER_F_REMOVE_ME)

    # After a final removal the IP really is cut off (routed into the device, but no peer holds it).
    backend.apply_peer_ops([RemoveAllowedIPs(peer_public, (net("10.99.0.3/32"),))])
    probe.received("10.99.0.3", wait=0.1)
    probe.send("10.99.0.3", b"after-removal")
    probe.send("10.99.0.2", b"still-there")
    assert probe.received("10.99.0.2", wait=10) == [b"still-there"]
    assert probe.received("10.99.0.3", wait=1) == []
    print(f"{streamed} datagrams, {cycles} remove/re-add cycles, none lost")
