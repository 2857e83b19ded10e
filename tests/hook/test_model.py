"""Unit tests of the pure model: ownership, conflict rules, mixed clusters, incremental changes."""

from __future__ import annotations

import ipaddress

import pytest

from node_hook.model import LOCAL, NodeModel, RemoteNode, RouteKind

KEY_B = "B" * 43 + "="
KEY_C = "C" * 43 + "="


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def node(name: str, key: str, pods: list[str], node_ip: str, changed: float = 0.0,
         endpoint: str | None = "default") -> RemoteNode:
    return RemoteNode(name, key, node_ip if endpoint == "default" else endpoint, 51820, frozenset({node_ip}),
                      frozenset(pods), changed)


def test_remote_pods_route_to_wireguard_and_local_pods_throw() -> None:
    model = NodeModel("a", local_node_ips=["10.240.0.4"])
    model.set_local_pod("c1@eth0", ["10.240.0.9"])
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70", "10.240.0.71"], "10.240.0.35"))
    peer = model.peers[KEY_B]
    assert peer.endpoint == ("10.240.0.35", 51820)
    assert peer.allowed_ips == {net("10.240.0.70/31"), net("10.240.0.35/32")}
    assert model.routes == {
        net("10.240.0.9/32"): RouteKind.THROW,
        net("10.240.0.70/32"): RouteKind.WIREGUARD,
        net("10.240.0.71/32"): RouteKind.WIREGUARD,
        net("10.240.0.35/32"): RouteKind.WIREGUARD,
    }


def test_without_host_encryption_node_ips_are_allowed_but_not_routed() -> None:
    model = NodeModel("a", host_encryption=False)
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    assert net("10.240.0.35/32") in model.peers[KEY_B].allowed_ips  # replies from host-network pods (#9751)
    assert net("10.240.0.35/32") not in model.routes
    assert model.routes[net("10.240.0.70/32")] is RouteKind.WIREGUARD


def test_ip_becoming_local_leaves_the_peer_and_throws() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70", "10.240.0.71"], "10.240.0.35"))
    model.take_changes()
    model.set_local_pod("c1@eth0", ["10.240.0.71"])
    assert model.peers[KEY_B].allowed_ips == {net("10.240.0.70/32"), net("10.240.0.35/32")}
    assert model.routes[net("10.240.0.71/32")] is RouteKind.THROW
    assert model.owner_of(ipaddress.ip_address("10.240.0.71")) == LOCAL
    changes = model.take_changes()
    assert changes.peer_keys == {KEY_B}
    assert changes.previous_routes == {net("10.240.0.71/32"): RouteKind.WIREGUARD}  # the route it had
    model.remove_local_pod("c1@eth0")
    assert model.peers[KEY_B].allowed_ips == {net("10.240.0.70/31"), net("10.240.0.35/32")}
    assert model.routes[net("10.240.0.71/32")] is RouteKind.WIREGUARD


def test_two_records_with_the_same_ip_keep_it_local_until_both_are_gone() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    model.set_local_pod("old@eth0", ["10.240.0.70"])
    model.set_local_pod("new@eth0", ["10.240.0.70"])
    model.remove_local_pod("old@eth0")
    assert model.routes[net("10.240.0.70/32")] is RouteKind.THROW
    model.remove_local_pod("new@eth0")
    assert model.routes[net("10.240.0.70/32")] is RouteKind.WIREGUARD


def test_ip_claimed_by_two_nodes_goes_to_the_latest_then_lowest_name() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35", changed=10))
    model.set_remote_node(node("c", KEY_C, ["10.240.0.70"], "10.240.0.66", changed=20))
    assert net("10.240.0.70/32") in model.peers[KEY_C].allowed_ips
    assert net("10.240.0.70/32") not in model.peers[KEY_B].allowed_ips
    assert [p.kind for p in model.problems()] == ["ip-conflict"]
    model.set_remote_node(node("c", KEY_C, ["10.240.0.70"], "10.240.0.66", changed=10))
    assert model.owner_of(ipaddress.ip_address("10.240.0.70")) == "b"  # tie: lowest name


def claimed(name: str, key: str, node_ip: str, changed: float, claims: dict[str, int]) -> RemoteNode:
    """A node whose pod IPs carry claim revisions (podIPClaimRevisions): {ip: revision}."""
    groups: dict[int, set[str]] = {}
    for ip, revision in claims.items():
        groups.setdefault(revision, set()).add(ip)
    return RemoteNode(name, key, node_ip, 51820, frozenset({node_ip}), frozenset(claims), changed,
                      tuple((revision, frozenset(ips)) for revision, ips in sorted(groups.items())))


def test_a_stale_claim_does_not_win_an_ip_back_when_its_node_changes_another_pod() -> None:
    """b's clock is an hour ahead and it still claims .70 from before; c claimed .70 later (revision 20). Per-IP
    claim revisions give .70 to c, also after b adds a pod (its podIPsChangedAt jumps ahead again)."""
    model = NodeModel("a")
    model.set_remote_node(claimed("b", KEY_B, "10.240.0.35", 5000.0, {"10.240.0.70": 10}))
    model.set_remote_node(claimed("c", KEY_C, "10.240.0.66", 100.0, {"10.240.0.70": 20}))
    seventy = ipaddress.ip_address("10.240.0.70")
    assert model.owner_of(seventy) == "c"
    model.set_remote_node(claimed("b", KEY_B, "10.240.0.35", 9000.0, {"10.240.0.70": 10, "10.240.0.71": 30}))
    assert model.owner_of(seventy) == "c" and model.owner_of(ipaddress.ip_address("10.240.0.71")) == "b"
    assert net("10.240.0.70/32") in model.peers[KEY_C].allowed_ips
    model.set_remote_node(claimed("c", KEY_C, "10.240.0.66", 100.0, {}))
    assert model.owner_of(seventy) == "b"  # c released it: b's claim is the only one
    model.set_remote_node(claimed("c", KEY_C, "10.240.0.66", 100.0, {"10.240.0.70": 40}))
    assert model.owner_of(seventy) == "c"
    model.set_remote_node(node("d", "D" * 43 + "=", ["10.240.0.70"], "10.240.0.90", changed=99999.0))
    assert model.owner_of(seventy) == "c", "a claim without a revision ranks below every claim with one"


def test_ip_moving_between_nodes_changes_both_peers() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35", changed=1))
    model.set_remote_node(node("c", KEY_C, [], "10.240.0.66", changed=1))
    model.take_changes()
    model.set_remote_node(node("b", KEY_B, [], "10.240.0.35", changed=2))
    model.set_remote_node(node("c", KEY_C, ["10.240.0.70"], "10.240.0.66", changed=2))
    assert model.take_changes().peer_keys == {KEY_B, KEY_C}
    assert net("10.240.0.70/32") in model.peers[KEY_C].allowed_ips


def test_duplicate_key_means_neither_is_a_peer_and_ips_throw() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    model.set_remote_node(node("c", KEY_B, ["10.240.0.80"], "10.240.0.66"))
    assert model.peers == {}
    assert model.routes[net("10.240.0.70/32")] is RouteKind.THROW
    assert model.routes[net("10.240.0.80/32")] is RouteKind.THROW
    assert [p.kind for p in model.problems()] == ["key-conflict"]
    model.remove_remote_node("c")
    assert model.peers[KEY_B].node == "b"
    assert model.routes[net("10.240.0.70/32")] is RouteKind.WIREGUARD
    assert net("10.240.0.80/32") not in model.routes


def test_a_remote_node_publishing_our_own_key_is_a_conflict_not_a_peer() -> None:
    model = NodeModel("a", local_public_key=KEY_B)
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    assert model.peers == {}
    assert model.routes[net("10.240.0.70/32")] is RouteKind.THROW
    (problem,) = model.problems()
    assert problem.kind == "key-conflict" and problem.subject == "a, b"
    model.remove_remote_node("b")
    assert model.problems() == [] and model.peers == {}


def test_mixed_cluster_node_without_key_is_plaintext_and_reported() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", "", ["10.240.0.70"], "10.240.0.35"))
    model.set_remote_node(node("c", KEY_C, ["10.240.0.80"], "10.240.0.66", endpoint=None))
    assert model.peers == {}
    assert model.routes[net("10.240.0.70/32")] is RouteKind.THROW
    assert model.routes[net("10.240.0.35/32")] is RouteKind.THROW
    assert {(p.kind, p.subject) for p in model.problems()} == {("no-key", "b"), ("no-endpoint", "c")}


def test_remote_node_claiming_a_local_node_ip_is_ignored_for_that_ip() -> None:
    model = NodeModel("a", local_node_ips=["10.240.0.4"])
    model.set_remote_node(node("b", KEY_B, ["10.240.0.4"], "10.240.0.35"))
    assert net("10.240.0.4/32") not in model.peers[KEY_B].allowed_ips
    assert net("10.240.0.4/32") not in model.routes


def test_removing_a_node_removes_its_peer_and_routes() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    model.take_changes()
    model.replace_remote_nodes({})
    assert model.peers == {} and model.routes == {}
    changes = model.take_changes()
    assert changes.peer_keys == {KEY_B}
    assert changes.previous_routes == {net("10.240.0.70/32"): RouteKind.WIREGUARD,
                                       net("10.240.0.35/32"): RouteKind.WIREGUARD}


def test_key_change_replaces_the_peer() -> None:
    model = NodeModel("a")
    model.set_remote_node(node("b", KEY_B, ["10.240.0.70"], "10.240.0.35"))
    model.take_changes()
    model.set_remote_node(node("b", KEY_C, ["10.240.0.70"], "10.240.0.35"))
    assert set(model.peers) == {KEY_C}
    assert model.take_changes().peer_keys == {KEY_B, KEY_C}


def test_a_pod_event_touches_only_the_peer_that_owned_the_ip() -> None:
    model = NodeModel("a")
    for index in range(200):
        key = f"{index:043d}="
        pods = [f"10.{1 + index // 250}.{index % 250}.{host}" for host in range(1, 6)]
        model.set_remote_node(node(f"n{index:03d}", key, pods, f"10.0.{index // 250}.{index % 250}"))
    model.take_changes()
    model.set_local_pod("c@eth0", ["10.1.7.3"])
    changes = model.take_changes()
    assert changes.peer_keys == {f"{7:043d}="}
    assert changes.previous_routes == {net("10.1.7.3/32"): RouteKind.WIREGUARD}


def test_bad_ip_in_a_record_is_a_clear_error() -> None:
    model = NodeModel("a")
    try:
        model.set_local_pod("c@eth0", ["not-an-ip"])
    except ValueError as error:
        assert "c@eth0" in str(error) and "not-an-ip" in str(error)
    else:
        raise AssertionError("expected ValueError")
    assert model.routes == {}


def test_strict_exemption_follows_local_pods_taking_and_releasing_a_keyless_nodes_ip() -> None:
    model = NodeModel("a", local_node_ips=["10.240.0.4"])
    model.set_remote_node(node("c", "", ["10.240.0.70"], "10.240.0.36"))
    cluster = (net("10.240.0.0/16"),)
    assert model.strict_addresses(cluster) == ((net("10.240.0.36/32"), net("10.240.0.70/32")), ())
    model.set_local_pod("c1@eth0", ["10.240.0.70"])  # the IP is local now: no longer exempt
    assert model.strict_addresses(cluster) == ((net("10.240.0.36/32"),), ())
    model.remove_local_pod("c1@eth0")
    assert model.strict_addresses(cluster) == ((net("10.240.0.36/32"), net("10.240.0.70/32")), ())


@pytest.mark.parametrize("host_encryption", [True, False])
def test_a_route_looked_up_is_the_route_listed(host_encryption: bool) -> None:
    """`routes.get()` derives a route inline (NodeModel._route_kind, for the speed of a full resync); iteration goes
    through NodeModel._kind_for. Every case of ownership and peer state must give the same route both ways."""
    model = NodeModel("a", local_node_ips=["10.240.0.4"], host_encryption=host_encryption, local_public_key=KEY_B)
    model.set_local_pod("p1@eth0", ["10.240.0.9", "10.240.0.4"])  # a pod IP, and one that is also a node IP
    model.set_local_pod("p2@eth0", ["10.240.0.10"])
    model.set_remote_node(node("c", KEY_C, ["10.240.0.70", "10.240.0.36", "10.240.0.9"], "10.240.0.36", 1.0))
    model.set_remote_node(node("d", "D" * 43 + "=", ["10.240.0.71", "10.240.0.80"], "10.240.0.37", 2.0))
    model.set_remote_node(node("e", "D" * 43 + "=", ["10.240.0.72"], "10.240.0.38"))  # d's key: neither is a peer
    model.set_remote_node(node("f", "", ["10.240.0.73", "10.240.0.70"], "10.240.0.39", 3.0))  # keyless, wins .70
    model.set_remote_node(node("g", "G" * 43 + "=", ["10.240.0.74", "10.240.0.4"], "10.240.0.40", endpoint=None))
    model.set_remote_node(node("h", KEY_B, ["10.240.0.75"], "10.240.0.41"))  # this node's key
    model.set_remote_node(node("i", "I" * 43 + "=", ["10.240.0.76", "10.240.0.80"], "10.240.0.42", 1.5))
    assert KEY_C in model.peers and "I" * 43 + "=" in model.peers
    universe = {net(f"10.240.0.{last}/32") for last in range(1, 100)}
    listed = dict(model.routes.items())
    looked_up = {prefix: model.routes.get(prefix) for prefix in universe}
    assert looked_up == {prefix: listed.get(prefix) for prefix in universe}
    assert set(looked_up.values()) == {RouteKind.THROW, RouteKind.WIREGUARD, None}
