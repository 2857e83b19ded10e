"""Unit tests of the pure planner: peer diffs without windows, route and rule diffs, apply order."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from node_hook.apply.fakes import FakeWireGuard
from node_hook.contracts import (
    FOREIGN_ROUTE,
    AddRule,
    DeleteRoute,
    DeleteRule,
    DeviceSpec,
    FirewallSpec,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    RuleSpec,
    SetRoute,
    StrictSpec,
    UpsertPeer,
)
from node_hook.keys import public_key_of
from node_hook.model import UNKNOWN_PUBLICATION, DesiredPeer, Publication, RouteKind
from node_hook.planner import (
    APPLY_ORDER,
    Plan,
    desired_rules,
    plan_device,
    plan_firewall,
    plan_peers,
    plan_routes,
    plan_rules,
    plan_sysctls,
    publication_gate,
)

KEY = "K" * 43 + "="
OTHER = "O" * 43 + "="


def nets(*texts: str) -> frozenset:
    return frozenset(ipaddress.ip_network(t) for t in texts)


def desired(allowed: frozenset, key: str = KEY, endpoint: tuple[str, int] = ("10.240.0.35", 51820)) -> DesiredPeer:
    return DesiredPeer("b", key, endpoint, allowed, 0)


def actual(allowed: frozenset, key: str = KEY, endpoint: tuple[str, int] = ("10.240.0.35", 51820)) -> PeerState:
    return PeerState(key, endpoint, allowed)


def test_apply_order_is_written_down_once_and_puts_the_rule_last() -> None:
    assert APPLY_ORDER[-1] == "rules"
    assert APPLY_ORDER.index("device") < APPLY_ORDER.index("peer_reshape")
    assert APPLY_ORDER.index("peer_removals") < APPLY_ORDER.index("route_sets") < APPLY_ORDER.index("peer_adds")
    assert APPLY_ORDER.index("route_deletes") < APPLY_ORDER.index("route_sets")
    assert [name for name, _ in Plan(rules=[1], peer_adds=[2], firewall="x").steps()] == [  # type: ignore[list-item]
        "firewall", "peer_adds", "rules"]


def test_new_peer_is_one_upsert_with_its_whole_list() -> None:
    reshape, removals, adds = plan_peers({KEY: desired(nets("10.0.0.0/31"))}, {})
    assert (reshape, removals) == ([], [])
    assert adds == [UpsertPeer(KEY, ("10.240.0.35", 51820), tuple(nets("10.0.0.0/31")), True, 0)]


def test_single_ip_removal_never_rebuilds_the_peer_and_leaves_no_window() -> None:
    # 10.0.0.0/31 -> 10.0.0.0/32: first give the peer the /32 (it already routes there), then remove the /31.
    reshape, removals, adds = plan_peers({KEY: desired(nets("10.0.0.0/32"))}, {KEY: actual(nets("10.0.0.0/31"))})
    assert reshape == [UpsertPeer(KEY, ("10.240.0.35", 51820), tuple(nets("10.0.0.0/32")), False, 0)]
    assert removals == [RemoveAllowedIPs(KEY, tuple(nets("10.0.0.0/31")))]
    assert adds == []
    fake = FakeWireGuard()
    fake.ensure_device(DeviceSpec("wgcni0", b"\x01" * 32, public_key_of(b"\x01" * 32), 51820, 0x100000, 1420))
    fake.apply_peer_ops([UpsertPeer(KEY, None, tuple(nets("10.0.0.0/31")), True)])
    for op in reshape + removals:
        fake.apply_peer_ops([op])
        covered = {a for p in fake.device.peers[KEY].allowed_ips for a in p}  # type: ignore[union-attr]
        assert ipaddress.ip_address("10.0.0.0") in covered
    assert fake.device.peers[KEY].allowed_ips == nets("10.0.0.0/32")  # type: ignore[union-attr]


def test_gained_ips_and_endpoint_change_are_adds() -> None:
    reshape, removals, adds = plan_peers(
        {KEY: desired(nets("10.0.0.0/32", "10.0.0.5/32"), endpoint=("10.240.0.36", 51820))},
        {KEY: actual(nets("10.0.0.0/32"))})
    assert (reshape, removals) == ([], [])
    assert adds == [UpsertPeer(KEY, ("10.240.0.36", 51820), tuple(nets("10.0.0.5/32")), False, 0)]


def test_unchanged_peer_plans_nothing_and_gone_peer_is_removed() -> None:
    same = {KEY: desired(nets("10.0.0.0/32"))}
    assert plan_peers(same, {KEY: actual(nets("10.0.0.0/32"))}) == ([], [], [])
    assert plan_peers({}, {OTHER: actual(nets("10.0.0.0/32"), key=OTHER)}) == ([], [RemovePeer(OTHER)], [])


def test_scope_limits_the_diff() -> None:
    wanted = {KEY: desired(nets("10.0.0.0/32")), OTHER: desired(nets("10.0.0.1/32"), key=OTHER)}
    _, _, adds = plan_peers(wanted, {}, keys=[OTHER])
    assert [op.public_key for op in adds] == [OTHER]  # type: ignore[union-attr]


def test_routes_deletes_then_sets_and_foreign_routes_are_replaced() -> None:
    n = ipaddress.ip_network
    desired = {n("10.0.0.1/32"): RouteKind.WIREGUARD, n("10.0.0.2/32"): RouteKind.THROW,
               n("10.0.0.3/32"): RouteKind.THROW}
    actual = {n("10.0.0.1/32"): "dev", n("10.0.0.2/32"): "dev", n("10.0.0.3/32"): FOREIGN_ROUTE,
              n("10.9.0.0/16"): "dev"}
    deletes, sets = plan_routes(desired, actual, desired.keys() | actual.keys())
    assert deletes == [DeleteRoute(n("10.9.0.0/16"))]
    assert sets == [SetRoute(n("10.0.0.2/32"), RouteKind.THROW), SetRoute(n("10.0.0.3/32"), RouteKind.THROW)]


def test_rules_only_ours_and_wrong_ones_deleted_first() -> None:
    want = desired_rules(99, 0x100000, 51820)
    stale = RuleSpec(4, 100, 0x100000, 0x100000, 51820, True)
    ops = plan_rules(want, frozenset({stale}))
    assert ops[0] == DeleteRule(stale)
    assert sorted(op.rule.family for op in ops[1:]) == [4, 6]  # type: ignore[union-attr]
    assert all(isinstance(op, AddRule) for op in ops[1:])
    assert plan_rules(want, want) == []


def test_bypass_rules_send_one_source_by_the_main_table_before_the_tunnel_rule() -> None:
    rules = desired_rules(99, 0x100000, 51820, True, ["10.240.0.9", "fd00::9"])
    bypass = {rule for rule in rules if rule.source is not None}
    assert bypass == {RuleSpec(4, 98, 0, 0, 254, False, ipaddress.ip_network("10.240.0.9/32")),
                      RuleSpec(6, 98, 0, 0, 254, False, ipaddress.ip_network("fd00::9/128"))}
    assert rules - bypass == desired_rules(99, 0x100000, 51820)
    assert desired_rules(99, 0x100000, 51820, False, ["10.240.0.9"]) == frozenset()
    assert [rule.describe() for rule in sorted(bypass, key=lambda rule: rule.family)] == [
        "98: from 10.240.0.9/32 lookup 254 (v4)", "98: from fd00::9/128 lookup 254 (v6)"]
    ops = plan_rules(rules, desired_rules(99, 0x100000, 51820))
    assert [type(op) for op in ops] == [AddRule, AddRule]


@pytest.mark.parametrize("publication,tunnel,bypass", [
    (UNKNOWN_PUBLICATION, True, set()),  # nothing seen yet: leave the tunnel as it is
    (Publication("written", "KEY", frozenset({"10.0.0.4", "10.0.0.5", "10.0.0.6"})), True, set()),
    (Publication("pending", "KEY", frozenset({"10.0.0.4", "10.0.0.5"})), True, {"10.0.0.6"}),
    (Publication("denied", "KEY", frozenset({"10.0.0.4"}), "403"), True, {"10.0.0.5", "10.0.0.6"}),
    (Publication("denied", "", frozenset(), "403"), False, set()),  # the API holds no key: no peer has ours
    (Publication("written", "OLD", frozenset({"10.0.0.4", "10.0.0.5", "10.0.0.6"})), False, set()),  # stale key
    (Publication("opted-out", "", frozenset({"10.0.0.4"})), False, set()),
], ids=["unknown", "held", "new-pod", "denied-after-held", "denied-never-held", "stale-key", "opted-out"])
def test_the_publication_gates_the_tunnel_and_each_local_source(publication: Publication, tunnel: bool,
                                                               bypass: set[str]) -> None:
    assert publication_gate(publication, "KEY", {"10.0.0.4", "10.0.0.5", "10.0.0.6"}) == (tunnel, frozenset(bypass))


def test_device_sysctl_and_firewall_diffs() -> None:
    spec = DeviceSpec("wgcni0", b"\x02" * 32, public_key_of(b"\x02" * 32), 51820, 0x100000, 1340)
    assert plan_device(spec, None) == spec
    fake = FakeWireGuard()
    fake.ensure_device(spec)
    assert plan_device(spec, fake.read()) is None
    fake.ensure_device(DeviceSpec("wgcni0", b"\x02" * 32, public_key_of(b"\x02" * 32), 51820, 0x100000, 1420))
    assert plan_device(spec, fake.read()) == spec
    assert plan_sysctls({"a": "1", "b": "2"}, {"a": "1", "b": "0"}) == {"b": "2"}
    firewall = FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820)
    assert plan_firewall(firewall, "x", "x", firewall) is None
    assert plan_firewall(firewall, None, "x", firewall) == firewall
    assert plan_firewall(firewall, "x", None, firewall) == firewall
    assert plan_firewall(firewall, "x", "x", None) == firewall  # the last apply failed: the kernel is unknown
    strict = replace(firewall, strict=StrictSpec("wgcni-strict", True, True, 0x100000, "wgcni0", ("azv",), 51820,
                                                 (ipaddress.ip_network("10.240.0.0/16"),), ()))
    assert plan_firewall(strict, "x", "x", firewall) == strict  # the strict table changed: re-applied
