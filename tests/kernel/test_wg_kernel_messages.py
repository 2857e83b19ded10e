"""The kernel backend's message building against pyroute2, on the host (no kernel WireGuard needed): op
translation, the temporary-peer removal strategy, message splitting, encode/decode round trips, backend choice."""

from __future__ import annotations

import base64
import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_hook.apply import wg_kernel
from node_hook.apply.wg_kernel import (
    MAX_MESSAGE_BYTES,
    TEMPORARY_PEER_KEY,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    WireGuardMessage,
    build_set_message,
    parse_device,
    plan_peer_writes,
    split_messages,
)
from node_hook.config import Settings
from node_hook.contracts import RemoveAllowedIPs, RemovePeer, UpsertPeer, WireGuardChange
from node_hook.detect import kernel_wireguard_available
from node_hook.node import real_wireguard_backend
from tests.support import kernel_wg
from tests.support.kernel_wg import REQUIRE_ENV

KEY_A = base64.b64encode(b"\x01" * 32).decode()
KEY_B = base64.b64encode(b"\x02" * 32).decode()


def net(text: str):
    return ipaddress.ip_network(text)


def encode(writes) -> WireGuardMessage:
    """Encode as the kernel would receive it, then decode it again with the same message class."""
    message = build_set_message("wgcni0", writes)
    message["cmd"] = wg_kernel.WG_CMD_SET_DEVICE
    message["version"] = wg_kernel.WG_GENL_VERSION
    message["header"]["type"] = 0x20
    message.encode()
    decoded = WireGuardMessage(message.data)
    decoded.decode()
    return decoded


def peers_of(message: WireGuardMessage) -> list:
    return message.get_attr("WGDEVICE_A_PEERS") or []


def test_upserts_carry_endpoint_keepalive_flags_and_prefixes_through_pyroute2():
    writes = plan_peer_writes(
        [
            UpsertPeer(KEY_A, ("10.240.0.35", 51820), (net("10.240.1.7/32"), net("fd00::/64")), True, 25),
            UpsertPeer(KEY_B, ("fd00::66", 51821), (net("10.240.2.0/30"),), False),
        ],
        per_ip_remove=False,
    )
    (message,) = [encode(part) for part in split_messages(writes)]
    first, second = peers_of(message)
    assert first.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert first.get_attr("WGPEER_A_ENDPOINT")["addr"] == "10.240.0.35"
    assert first.get_attr("WGPEER_A_ENDPOINT")["port"] == 51820
    assert first.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert second.get_attr("WGPEER_A_FLAGS") == 0
    assert second.get_attr("WGPEER_A_ENDPOINT")["addr"] == "fd00::66"
    state = parse_device("wgcni0", [message], mtu=1420, up=True)
    assert state.peers[KEY_A].allowed_ips == {net("10.240.1.7/32"), net("fd00::/64")}
    assert state.peers[KEY_A].endpoint == ("10.240.0.35", 51820)
    assert state.peers[KEY_B].allowed_ips == {net("10.240.2.0/30")}


def test_per_ip_removal_flags_each_prefix_and_never_creates_the_peer():
    writes = plan_peer_writes([RemoveAllowedIPs(KEY_A, (net("10.240.0.66/32"), net("fd00::5/128")))], True)
    (message,) = [encode(part) for part in split_messages(writes)]
    (peer,) = peers_of(message)
    assert wg_kernel._key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")) == KEY_A
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
    flags = [allowed.get_attr("WGALLOWEDIP_A_FLAGS") for allowed in peer.get_attr("WGPEER_A_ALLOWEDIPS")]
    assert flags == [wg_kernel.WGALLOWEDIP_F_REMOVE_ME] * 2


def test_fallback_moves_prefixes_to_the_temporary_peer_and_deletes_it_in_the_same_message():
    ops = [RemoveAllowedIPs(KEY_A, (net("10.240.0.66/32"),)), RemoveAllowedIPs(KEY_B, (net("10.240.0.70/32"),))]
    messages = split_messages(plan_peer_writes(ops, per_ip_remove=False))
    assert len(messages) == 1
    keys_and_flags = [(w.public_key, w.flags, w.allowed_ips) for w in messages[0]]
    assert keys_and_flags == [
        (TEMPORARY_PEER_KEY, 0, [net("10.240.0.66/32")]),
        (TEMPORARY_PEER_KEY, 0, [net("10.240.0.70/32")]),
        (TEMPORARY_PEER_KEY, WGPEER_F_REMOVE_ME, []),
    ]
    # The named peers are not written at all: their remaining prefixes are never touched.
    assert all(w.public_key == TEMPORARY_PEER_KEY for w in messages[0])


def test_fallback_leaves_a_prefix_alone_that_an_earlier_op_of_the_batch_gave_to_another_peer():
    ops = [
        UpsertPeer(KEY_B, None, (net("10.240.0.66/32"),), False),
        RemoveAllowedIPs(KEY_A, (net("10.240.0.66/32"), net("10.240.0.67/32"))),
    ]
    writes = plan_peer_writes(ops, per_ip_remove=False)
    assert [(w.public_key, w.allowed_ips) for w in writes] == [
        (KEY_B, [net("10.240.0.66/32")]),
        (TEMPORARY_PEER_KEY, [net("10.240.0.67/32")]),
    ]


def test_remove_peer_is_the_remove_flag_alone():
    (message,) = [encode(part) for part in split_messages(plan_peer_writes([RemovePeer(KEY_A)], False))]
    (peer,) = peers_of(message)
    assert peer.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert peer.get_attr("WGPEER_A_ALLOWEDIPS") is None


def test_unknown_op_is_rejected():
    with pytest.raises(TypeError):
        plan_peer_writes(["not an op"], False)  # type: ignore[list-item]


def mixed_prefixes(count: int, seed: int, base: int) -> list:
    """`count` distinct host prefixes, IPv4 and IPv6 interleaved in a seed-dependent pattern."""
    chooser = random.Random(seed)
    return [
        ipaddress.ip_network((base + i, 32)) if chooser.random() < 0.7
        else ipaddress.ip_network((base + i + 2**100, 128))
        for i in range(count)
    ]


@settings(max_examples=15, deadline=None)
@given(
    big_count=st.integers(0, 2500),
    removed_count=st.integers(0, 1500),
    seed=st.integers(0, 2**32),
    replace=st.booleans(),
    per_ip=st.booleans(),
    limit=st.sampled_from([1024, 4096, MAX_MESSAGE_BYTES]),
)
def test_split_messages_fit_the_limit_and_keep_every_prefix_once(
    big_count, removed_count, seed, replace, per_ip, limit
):
    big = mixed_prefixes(big_count, seed, 0x0A000000)
    removed = mixed_prefixes(removed_count, seed + 1, 0x0B000000)
    ops = [UpsertPeer(KEY_A, ("10.240.0.4", 51820), tuple(big), replace, 0)]
    if removed:
        ops.append(RemoveAllowedIPs(KEY_B, tuple(removed)))
    messages = split_messages(plan_peer_writes(ops, per_ip), limit=limit)
    upserted: list = []
    taken: list = []
    first_a = True
    for writes in messages:
        decoded = encode(writes)
        assert len(decoded.data) <= limit
        temporary_used = False
        for peer in peers_of(decoded):
            key = wg_kernel._key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            flags = peer.get_attr("WGPEER_A_FLAGS")
            prefixes = [
                ipaddress.ip_network(
                    (
                        int.from_bytes(a.get_attr("WGALLOWEDIP_A_IPADDR"), "big"),
                        a.get_attr("WGALLOWEDIP_A_CIDR_MASK"),
                    )
                )
                for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
            ]
            if key == KEY_A:
                # Only the first part of a continued peer may replace; the rest only add.
                assert bool(flags & WGPEER_F_REPLACE_ALLOWEDIPS) == (replace and first_a)
                first_a = False
                upserted += prefixes
            elif key == TEMPORARY_PEER_KEY and not flags & WGPEER_F_REMOVE_ME:
                temporary_used = True
                taken += prefixes
            elif key == TEMPORARY_PEER_KEY:
                assert temporary_used, "the temporary peer is only deleted where it was used"
                temporary_used = False
            else:
                assert key == KEY_B and per_ip
                taken += prefixes
        assert not temporary_used, "every message that uses the temporary peer deletes it"
    assert upserted == big
    assert taken == removed


def test_the_daemon_picks_the_userspace_backend_for_auto_on_a_host_without_kernel_wireguard():
    if kernel_wireguard_available():
        pytest.skip("this host has the WireGuard module (the VM tier checks the kernel choice)")
    backend = real_wireguard_backend(Settings(backend="auto", interface="wgk-auto"), on_exit=lambda code: None)
    try:
        assert backend.kind == "userspace"  # no module here, by the check the daemon itself makes
    finally:
        backend.close()


def test_host_without_kernel_wireguard_skips_kernel_tests_and_the_vm_fails_them(monkeypatch):
    """The gate: skip on a host, fail inside the VM tier (where the module must be there)."""
    if kernel_wg._available():
        pytest.skip("kernel WireGuard is available here; the gate has nothing to skip")
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        kernel_wg.require_kernel_wireguard()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception):
        kernel_wg.require_kernel_wireguard()


def test_a_large_peer_is_continued_over_several_messages():
    big = tuple(ipaddress.ip_network((0x0A400000 + i, 32)) for i in range(3000))
    messages = split_messages(plan_peer_writes([UpsertPeer(KEY_A, None, big, True)], False), limit=4096)
    assert len(messages) > 20
    assert [w.flags for m in messages for w in m] == [WGPEER_F_REPLACE_ALLOWEDIPS] + [0] * (len(messages) - 1)
    assert [p for m in messages for w in m for p in w.allowed_ips] == list(big)
    assert all(len(encode(m).data) <= 4096 for m in messages)


def test_a_streamed_dump_hands_over_each_peer_once_complete_and_is_read_to_its_end_when_abandoned():
    """A peer split over two dump parts (as the kernel splits a large device) comes out once, with all its
    AllowedIPs; a stream abandoned after its first peer still takes every part (the socket's next answer must not
    be the rest of this dump)."""
    first = encode(plan_peer_writes([UpsertPeer(KEY_A, ("10.240.0.35", 51820), (net("10.240.1.7/32"),), True)],
                                    per_ip_remove=False)[0:1])
    second = encode(plan_peer_writes([UpsertPeer(KEY_A, None, (net("10.240.1.9/32"),), False),
                                      UpsertPeer(KEY_B, ("10.240.0.66", 51820), (net("10.240.2.0/30"),), True)],
                                     per_ip_remove=False))
    stream = wg_kernel.parse_device_stream("wgcni0", [first, second], mtu=1420, up=True)
    assert stream.device.peers == {} and stream.device.mtu == 1420
    peers = list(stream.peers)
    assert [peer.public_key for peer in peers] == [KEY_A, KEY_B]
    assert peers[0].allowed_ips == {net("10.240.1.7/32"), net("10.240.1.9/32")}
    assert peers[0].endpoint == ("10.240.0.35", 51820)
    taken = []

    def parts():
        for part in (first, second, second):
            taken.append(part)
            yield part

    abandoned = wg_kernel.parse_device_stream("wgcni0", parts(), mtu=1420, up=True)
    assert next(abandoned.peers).public_key == KEY_A
    abandoned.peers.close()  # type: ignore[attr-defined]
    assert len(taken) == 3


def test_a_captured_set_device_names_its_peers_allowed_ips_and_device_fields():
    """What ForeignWriteCapture reports of a request as the kernel receives it (encoded, then decoded from bytes)."""
    writes = wg_kernel.plan_peer_writes([UpsertPeer(KEY_A, ("10.0.0.1", 51820), (net("10.9.0.0/24"),), True),
                                         RemovePeer(KEY_B)], per_ip_remove=True)
    message = encode(writes)
    captured = WireGuardMessage(message.data)
    captured.decode()
    assert wg_kernel.change_of_set_device(captured) == WireGuardChange(frozenset({KEY_A, KEY_B}),
                                                                       frozenset({net("10.9.0.0/24")}))
    device = WireGuardMessage()
    device["cmd"], device["version"] = wg_kernel.WG_CMD_SET_DEVICE, 1
    device["attrs"] = [["WGDEVICE_A_IFNAME", "wg0"], ["WGDEVICE_A_FLAGS", wg_kernel.WGDEVICE_F_REPLACE_PEERS],
                       ["WGDEVICE_A_LISTEN_PORT", 1]]
    device.encode()
    captured = WireGuardMessage(device.data)
    captured.decode()
    assert wg_kernel.change_of_set_device(captured) == WireGuardChange(device=True, all_peers=True)
