"""A bulk change (more than CHANGED_ROUTES_LISTED routes) is handed out as "every route may have changed" instead
of a dict as large as the table, and the reconciler then reads the table back and diffs every route (the memory
bound behind bench/p3_scale.py's figures at 5 000 x 250: neither the model nor the reconciler keeps a table)."""

from __future__ import annotations

import ipaddress

import pytest

from node_hook import model as model_module
from node_hook.apply.fakes import FakeFirewall, FakeRouting, FakeSysctls, FakeWireGuard
from node_hook.contracts import DeviceSpec, FirewallSpec
from node_hook.keys import public_key_of
from node_hook.model import NodeModel, RemoteNode, RouteKind
from node_hook.planner import desired_rules
from node_hook.reconciler import Reconciler, Targets


def _node(index: int, pods: range) -> RemoteNode:
    return RemoteNode(f"node-{index}", f"{index:043d}=", f"172.16.0.{index}", 51820, frozenset({f"172.16.0.{index}"}),
                      frozenset(f"10.{index}.0.{pod}" for pod in pods), 1.0)


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(model_module, "CHANGED_ROUTES_LISTED", 8)
    return 8


def test_a_bulk_change_is_handed_out_as_every_route(small_limit: int) -> None:
    model = NodeModel("local", ["172.16.0.250"])
    model.set_remote_node(_node(1, range(1, 4)))
    changes = model.take_changes()
    assert changes.previous_routes is not None and len(changes.previous_routes) == 4  # 3 pods + node IP
    assert set(changes.previous_routes.values()) == {None}  # none of them had a route
    model.set_remote_node(_node(2, range(1, 20)))
    changes = model.take_changes()
    assert changes.previous_routes is None and changes
    assert changes.peer_keys == {_node(2, range(0)).public_key}
    model.set_remote_node(_node(2, range(1, 21)))  # listing resumes after the take
    assert model.take_changes().previous_routes == {ipaddress.ip_network("10.2.0.20/32"): None}


def test_after_a_bulk_change_the_reconciler_reads_the_table_back_and_diffs_every_route(small_limit: int,
                                                                                    tmp_path) -> None:
    model = NodeModel("local", ["172.16.0.250"])
    routing = FakeRouting()
    wireguard = FakeWireGuard()
    sysctls = {"net/ipv4/conf/all/src_valid_mark": "1"}
    reconciler = Reconciler(model, Targets(DeviceSpec("wgcni0", bytes(range(32)), public_key_of(bytes(range(32))),
                                                      51820, 0x100000, 1420),
                                           desired_rules(99, 0x100000, 51820),
                                           FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820), sysctls),
                            wireguard, routing, FakeFirewall(), FakeSysctls({"net/ipv4/conf/all/src_valid_mark": "0"},
                                                                           tmp_path / "sysctls.json"))
    model.set_remote_node(_node(1, range(1, 4)))
    assert reconciler.reconcile().error is None and reconciler.converged
    model.set_remote_node(_node(2, range(1, 30)))
    model.remove_remote_node("node-1")
    routing.routes[ipaddress.ip_network("10.9.9.9/32")] = "dev"  # an outside route only a read-back sees
    result = reconciler.reconcile()
    assert result.error is None and "routes" in result.full and "peers" not in result.full
    assert result.applied["route_sets"] == 30 and result.applied["route_deletes"] == 5
    assert routing.routes == {prefix: kind.value for prefix, kind in model.routes.items()}
    assert all(kind is RouteKind.WIREGUARD for kind in model.routes.values()) and len(model.routes) == 30


def test_a_complete_delivery_applies_removals_changes_and_additions_and_skips_the_same_objects() -> None:
    first = {f"node-{index}": _node(index, range(1, 5)) for index in range(1, 6)}
    model = NodeModel("local", ["172.16.0.250"])
    model.replace_remote_nodes(first)
    model.take_changes()
    model.replace_remote_nodes(dict(first))  # the same objects again: nothing changes
    assert not model.take_changes()
    second = dict(first)
    del second["node-2"]  # gone
    second["node-3"] = _node(3, range(1, 7))  # changed
    second["node-4"] = _node(4, range(1, 5))  # equal, another object
    second["node-9"] = _node(9, range(1, 3))  # new
    model.replace_remote_nodes(second)
    scratch = NodeModel("local", ["172.16.0.250"])
    scratch.replace_remote_nodes(second)
    assert model.peers == scratch.peers and dict(model.routes.items()) == dict(scratch.routes.items())
    assert set(model.remote_nodes) == {"node-1", "node-3", "node-4", "node-5", "node-9"}
