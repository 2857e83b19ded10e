"""The reconcile loop against fakes: convergence, O(change) passes, and for every failure point exactly one
error reported and then convergence; outside damage (device, route, rule removed) repaired with the same key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from node_hook.apply.fakes import FakeFirewall, FakeRouting, FakeSysctls, FakeWireGuard
from node_hook.apply.firewall import render_firewall
from node_hook.contracts import DEVICE_ADDRESS, DeviceSpec, FirewallSpec
from node_hook.keys import public_key_of
from node_hook.model import NodeModel, RemoteNode
from node_hook.planner import desired_rules
from node_hook.reconciler import Reconciler, Targets

PRIVATE = bytes(range(1, 33))
KEY_B = "B" * 43 + "="
KEY_C = "C" * 43 + "="
SYSCTLS = {"net/ipv4/conf/all/src_valid_mark": "1", "net/ipv4/conf/wgcni0/rp_filter": "2"}


class Node:
    def __init__(self, tmp_path: Path) -> None:
        self.model = NodeModel("a", local_node_ips=["10.240.0.4"])
        self.wg = FakeWireGuard()
        self.routing = FakeRouting(51820)
        self.firewall = FakeFirewall()
        self.sysctls = FakeSysctls({"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/wgcni0/rp_filter": "1"},
                                   tmp_path / "sysctl-originals.json")
        self.targets = Targets(
            DeviceSpec("wgcni0", PRIVATE, public_key_of(PRIVATE), 51820, 0x100000, 1340),
            desired_rules(99, 0x100000, 51820),
            FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820),
            SYSCTLS,
        )
        self.reconciler = Reconciler(self.model, self.targets, self.wg, self.routing, self.firewall, self.sysctls)

    def populate(self) -> None:
        self.model.set_local_pod("p1@eth0", ["10.240.0.9"])
        self.model.set_remote_node(RemoteNode("b", KEY_B, "10.240.0.35", 51820, frozenset({"10.240.0.35"}),
                                              frozenset({"10.240.0.70", "10.240.0.71", "10.240.0.12"}), 1.0))
        self.model.set_remote_node(RemoteNode("c", KEY_C, "10.240.0.66", 51820, frozenset({"10.240.0.66"}),
                                              frozenset({"10.240.0.20"}), 1.0))

    def assert_converged(self) -> None:
        device = self.wg.device
        assert device is not None and device.public_key == public_key_of(PRIVATE)
        assert (device.mtu, device.listen_port, device.fwmark, device.up) == (1340, 51820, 0x100000, True)
        assert {key: peer.allowed_ips for key, peer in device.peers.items()} == {
            key: peer.allowed_ips for key, peer in self.model.peers.items()}
        assert {key: peer.endpoint for key, peer in device.peers.items()} == {
            key: peer.endpoint for key, peer in self.model.peers.items()}
        assert self.routing.routes == {prefix: kind.value for prefix, kind in self.model.routes.items()}
        assert self.routing.rules == set(self.targets.rules)
        assert self.routing.device_addresses == {DEVICE_ADDRESS}
        assert self.firewall.listing == render_firewall(self.targets.firewall)
        assert {k: self.sysctls.values[k] for k in SYSCTLS} == SYSCTLS


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_first_pass_converges_and_a_second_does_nothing(node: Node) -> None:
    node.populate()
    result = node.reconciler.reconcile()
    assert result.error is None
    node.assert_converged()
    assert node.reconciler.reconcile().applied == {}


def test_events_are_applied_as_deltas(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.wg.calls.clear()
    node.routing.calls.clear()
    node.model.set_local_pod("p2@eth0", ["10.240.0.71"])  # an IP of b becomes local
    result = node.reconciler.reconcile()
    assert result.error is None and result.full == ()
    assert result.applied == {"peer_reshape": 1, "peer_removals": 1, "route_sets": 1}
    assert "read" not in node.wg.calls and "read" not in node.routing.calls
    node.assert_converged()


def test_ip_moving_to_another_remote_node(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.model.set_remote_node(RemoteNode("b", KEY_B, "10.240.0.35", 51820, frozenset({"10.240.0.35"}),
                                          frozenset({"10.240.0.70", "10.240.0.71"}), 2.0))
    node.model.set_remote_node(RemoteNode("c", KEY_C, "10.240.0.66", 51820, frozenset({"10.240.0.66"}),
                                          frozenset({"10.240.0.20", "10.240.0.12"}), 2.0))
    assert node.reconciler.reconcile().error is None
    node.assert_converged()
    assert ipaddress.ip_network("10.240.0.12/32") in node.wg.device.peers[KEY_C].allowed_ips  # type: ignore[union-attr]


FAILURE_POINTS = (
    [("wg", op) for op in FakeWireGuard.operations if op != "delete_device"]
    + [("routing", op) for op in ("read", "apply")]
    + [("firewall", op) for op in ("read", "apply")]
    + [("sysctls", op) for op in ("read", "write")]
)


@pytest.mark.parametrize("phase", ["initial", "delta"])
@pytest.mark.parametrize("applier,operation", FAILURE_POINTS, ids=[f"{a}.{o}" for a, o in FAILURE_POINTS])
def test_every_failure_point_reports_one_error_then_converges(node: Node, applier: str, operation: str,
                                                              phase: str) -> None:
    node.populate()
    if phase == "delta":
        assert node.reconciler.reconcile().error is None
        node.model.set_local_pod("p2@eth0", ["10.240.0.71"])
        node.model.set_remote_node(RemoteNode("d", "D" * 43 + "=", "10.240.0.90", 51820, frozenset({"10.240.0.90"}),
                                              frozenset({"10.240.0.91"}), 1.0))
        node.model.remove_remote_node("c")
        # make the failure point reachable: damage what that operation would repair
        if operation == "read":
            node.reconciler.mark_out_of_sync()
        elif operation == "ensure_device":
            node.wg.device = None
            node.reconciler.mark_out_of_sync("device")
        elif applier == "firewall":
            node.firewall.listing = None
            node.reconciler.mark_out_of_sync("firewall")
        elif applier == "sysctls":
            node.sysctls.values["net/ipv4/conf/all/src_valid_mark"] = "0"
            node.reconciler.mark_out_of_sync("sysctls")
    getattr(node, applier).fail_next.add(operation)
    errors = [node.reconciler.reconcile().error for _ in range(3)]
    assert errors[0] is not None and "injected failure" in errors[0]
    assert errors[1:] == [None, None]
    node.assert_converged()
    assert node.reconciler.converged


def test_device_deleted_outside_is_recreated_with_the_same_key_and_peers(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.wg.device = None
    node.routing.routes = {p: k for p, k in node.routing.routes.items() if k == "throw"}  # dev routes die with it
    node.routing.device_addresses.clear()  # and so does its address
    node.reconciler.mark_out_of_sync("device")
    assert node.reconciler.reconcile().error is None
    node.assert_converged()


def test_rule_and_route_removed_outside_are_restored(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.routing.rules.clear()
    node.routing.routes.pop(ipaddress.ip_network("10.240.0.70/32"))
    node.reconciler.mark_out_of_sync("rules", "routes")
    assert node.reconciler.reconcile().applied == {"route_sets": 1, "rules": 2}
    node.assert_converged()


def test_rules_and_the_address_are_repaired_without_reading_the_routes(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.routing.reads.clear()
    node.routing.rules.clear()
    node.routing.device_addresses.clear()
    node.reconciler.mark_out_of_sync("rules")
    assert node.reconciler.reconcile().applied == {"device_address": 1, "rules": 2}
    assert node.routing.reads == [False]  # rules and addresses only: no dump of the table's routes
    node.assert_converged()


def test_rechecked_routes_are_set_as_the_model_wants_without_a_table_read(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.routing.reads.clear()
    changed, removed, foreign = (ipaddress.ip_network(p) for p in ("10.240.0.70/32", "10.240.0.20/32", "10.9.9.9/32"))
    node.routing.routes[changed] = "foreign"
    node.routing.routes.pop(removed)
    node.routing.routes[foreign] = "dev"
    node.reconciler.recheck_routes([changed, removed, foreign])
    assert node.reconciler.reconcile().applied == {"route_deletes": 1, "route_sets": 2}
    assert node.routing.reads == []
    node.assert_converged()


def test_rechecks_survive_a_pass_that_fails_before_the_routes(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    changed = ipaddress.ip_network("10.240.0.70/32")
    node.routing.routes[changed] = "foreign"
    node.reconciler.recheck_routes([changed])
    node.wg.fail_next.add("read")  # the pass fails reading the device, before the routes are planned
    node.reconciler.mark_out_of_sync("device")
    node.routing.reads.clear()
    assert (node.reconciler.reconcile().error or "").startswith("device")
    assert node.reconciler.reconcile().error is None
    assert node.routing.reads == []  # the route was rechecked alone, not found by a read-back
    node.assert_converged()


def test_rechecked_peers_are_programmed_whole_without_reading_the_device(node: Node) -> None:
    from node_hook.contracts import RemovePeer, UpsertPeer

    node.populate()
    node.reconciler.reconcile()
    intruder = "X" * 43 + "="
    node.wg.apply_peer_ops([RemovePeer(KEY_B),
                            UpsertPeer(KEY_C, ("10.9.9.9", 1), (ipaddress.ip_network("10.240.0.70/32"),), True),
                            UpsertPeer(intruder, None, (ipaddress.ip_network("10.240.0.12/32"),), False)])
    node.wg.calls.clear()
    node.reconciler.recheck_peers([KEY_B, KEY_C, intruder])
    assert node.reconciler.reconcile().error is None
    assert "read" not in node.wg.calls
    node.assert_converged()


def test_foreign_peer_is_removed(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    from node_hook.contracts import UpsertPeer

    node.wg.apply_peer_ops([UpsertPeer("X" * 43 + "=", None, (ipaddress.ip_network("10.240.0.70/32"),), False)])
    node.reconciler.mark_out_of_sync("peers")
    assert node.reconciler.reconcile().error is None
    node.assert_converged()


def test_sysctl_originals_are_remembered_and_restored(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.sysctls.restore()
    assert node.sysctls.values["net/ipv4/conf/all/src_valid_mark"] == "0"
    assert not node.sysctls.originals_file.exists()


def test_without_pruning_unknown_peers_and_routes_stay_until_pruning_is_allowed(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    restarted = Node.__new__(Node)  # a new hook process on the same kernel state, before the first complete list
    restarted.__dict__.update(node.__dict__)
    restarted.model = NodeModel("a", local_node_ips=["10.240.0.4"])
    restarted.model.set_local_pod("p1@eth0", ["10.240.0.9"])
    restarted.reconciler = Reconciler(restarted.model, node.targets, node.wg, node.routing, node.firewall,
                                      node.sysctls)
    restarted.reconciler.prune = False
    assert restarted.reconciler.reconcile().error is None
    assert set(node.wg.device.peers) == {KEY_B, KEY_C}  # type: ignore[union-attr]
    assert ipaddress.ip_network("10.240.0.70/32") in node.routing.routes
    restarted.model.set_remote_node(RemoteNode("b", KEY_B, "10.240.0.35", 51820, frozenset({"10.240.0.35"}),
                                               frozenset({"10.240.0.70", "10.240.0.71", "10.240.0.12"}), 1.0))
    restarted.reconciler.prune = True  # the first complete list: c is gone
    assert restarted.reconciler.reconcile().error is None
    assert set(node.wg.device.peers) == {KEY_B}  # type: ignore[union-attr]
    assert ipaddress.ip_network("10.240.0.20/32") not in node.routing.routes
    restarted.assert_converged()


def test_changes_taken_by_a_pass_that_failed_in_the_device_step_are_applied_by_the_next(node: Node) -> None:
    node.populate()
    assert node.reconciler.reconcile().error is None
    node.model.set_local_pod("p2@eth0", ["10.240.0.71"])  # peers and routes change ...
    node.model.set_remote_node(RemoteNode("d", "D" * 43 + "=", "10.240.0.90", 51820, frozenset({"10.240.0.90"}),
                                          frozenset({"10.240.0.91"}), 1.0))
    node.reconciler.mark_out_of_sync("device")  # ... while only the device is to be checked (a netlink event)
    node.wg.fail_next.add("read")  # the device step fails; peers and routes stay in sync, their changes unapplied
    assert node.reconciler.reconcile().error is not None
    assert node.reconciler.reconcile().error is None
    node.assert_converged()


def test_a_desired_firewall_is_applied_when_it_differs_from_the_applied_one(node: Node) -> None:
    node.populate()
    node.reconciler.reconcile()
    node.reconciler.set_firewall(FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820))  # equal, a new object
    assert "firewall" not in node.reconciler.reconcile().applied
    changed = FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv", "eth"), 51820)
    node.reconciler.set_firewall(changed)
    assert node.reconciler.reconcile().applied.get("firewall") == 1
    assert node.firewall.spec == changed
