"""P3's kernel process: the appliers it serves behave as the in-process fakes do, read-backs round-trip, and its
digest tells a difference from the model's state."""

from __future__ import annotations

import ipaddress

import pytest

from bench.kernel_process import ROUTES_PER_CHUNK, KernelProcess, state_digest
from node_hook.addresses import address_key
from node_hook.contracts import DeleteRoute, DeviceSpec, RemoveAllowedIPs, SetRoute, UpsertPeer
from node_hook.keys import public_key_of
from node_hook.model import RouteKind

KEY_A, KEY_B = "A" * 43 + "=", "B" * 43 + "="


@pytest.fixture
def kernel():  # type: ignore[no-untyped-def]
    process = KernelProcess("wgtest0", 51820)
    try:
        yield process
    finally:
        process.close()


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_programmed_state_reads_back_equal_and_digests_alike(kernel: KernelProcess) -> None:
    kernel.wireguard.ensure_device(DeviceSpec("wgtest0", bytes(range(32)), public_key_of(bytes(range(32))), 51820,
                                              0x100000, 1420))
    many = [address_key(f"10.{64 + (i >> 16)}.{i >> 8 & 255}.{i & 255}") for i in range(ROUTES_PER_CHUNK + 10)]
    kernel.routing.apply([SetRoute(prefix, RouteKind.WIREGUARD) for prefix in many]
                         + [SetRoute(net("fd00::/64"), RouteKind.THROW), DeleteRoute(many[0])])
    kernel.wireguard.apply_peer_ops([UpsertPeer(KEY_A, ("10.240.0.4", 51820), (net("10.0.0.0/28"), many[1]), True),
                                     UpsertPeer(KEY_B, ("10.240.0.5", 51820), (net("fd00::5/128"),), True),
                                     RemoveAllowedIPs(KEY_A, (many[1],))])

    table, device = kernel.routing.read(), kernel.wireguard.read()

    want_routes = {prefix: "dev" for prefix in many[1:]} | {net("fd00::/64"): "throw"}
    assert table.routes == want_routes
    assert device is not None and {key: peer.allowed_ips for key, peer in device.peers.items()} == {
        KEY_A: {net("10.0.0.0/28")}, KEY_B: {net("fd00::5/128")}}
    assert device.peers[KEY_A].endpoint == ("10.240.0.4", 51820)
    want = state_digest({KEY_A: frozenset({net("10.0.0.0/28")}), KEY_B: frozenset({net("fd00::5/128")})},
                        want_routes.items())
    assert kernel.digest() == want
    assert kernel.covers(KEY_A, net("10.0.0.3/32")) is False  # allowed, but no route for it in the table
    assert kernel.covers(KEY_B, net("fd00::5/128")) is False  # routed by throw, not into the tunnel


def test_digest_tells_one_route_or_one_allowed_ip_apart(kernel: KernelProcess) -> None:
    kernel.wireguard.ensure_device(DeviceSpec("wgtest0", bytes(range(32)), public_key_of(bytes(range(32))), 51820,
                                              0x100000, 1420))
    kernel.routing.apply([SetRoute(net("10.0.0.1/32"), RouteKind.WIREGUARD)])
    kernel.wireguard.apply_peer_ops([UpsertPeer(KEY_A, None, (net("10.0.0.1/32"),), True)])
    same = state_digest({KEY_A: frozenset({net("10.0.0.1/32")})}, [(net("10.0.0.1/32"), "dev")])
    assert kernel.digest() == same
    assert kernel.covers(KEY_A, net("10.0.0.1/32"))
    assert kernel.digest() != state_digest({KEY_A: frozenset({net("10.0.0.1/32")})}, [(net("10.0.0.1/32"), "throw")])
    assert kernel.digest() != state_digest({KEY_A: frozenset({net("10.0.0.2/32")})}, [(net("10.0.0.1/32"), "dev")])
    assert kernel.digest() != state_digest({KEY_B: frozenset({net("10.0.0.1/32")})}, [(net("10.0.0.1/32"), "dev")])


def test_an_applier_error_in_the_kernel_process_reaches_the_caller(kernel: KernelProcess) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):  # no device yet, as FakeWireGuard says
        kernel.wireguard.apply_peer_ops([UpsertPeer(KEY_A, None, (), True)])
    assert kernel.wireguard.read() is None  # and the process still serves
