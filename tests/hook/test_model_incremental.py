"""The incrementally maintained model always equals a model built from scratch from the same final inputs
(property-based): any sequence of local pod and remote node events - IPs moving, contested, local, node IPs that
are also pod IPs, keys shared or missing, endpoints missing, timestamps changing - leaves the same peers, routes,
owners and problems; and after every event the changes it hands out name each route that changed with the kind it
had (the reconciler keeps no copy of the table and relies on them). The per-address bookkeeping behind
bench/p3_scale.py's figures must never drift from that."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from node_hook.model import NodeModel, RemoteNode, RouteKind

ADDRESSES = [f"10.0.0.{last}" for last in range(8)] + ["fd00::1", "fd00::2"]
NODE_NAMES = ["a", "b", "c"]
KEYS = ["", "K" * 43 + "=", "L" * 43 + "=", "M" * 43 + "="]
LOCAL_NODE_IP = "10.0.0.7"

@st.composite
def remote_nodes(draw: st.DrawFn) -> RemoteNode:
    """Remote nodes with and without per-IP claim revisions (some of their pod IPs claimed at 1, others at 2)."""
    pod_ips = draw(st.frozensets(st.sampled_from(ADDRESSES), max_size=5))
    claims: tuple[tuple[int, frozenset[str]], ...] = ()
    if pod_ips and draw(st.booleans()):
        late = draw(st.frozensets(st.sampled_from(sorted(pod_ips))))
        claims = tuple((revision, ips) for revision, ips in ((1, pod_ips - late), (2, late)) if ips)
    return RemoteNode(
        name=draw(st.sampled_from(NODE_NAMES)), public_key=draw(st.sampled_from(KEYS)),
        endpoint_ip=draw(st.sampled_from([None, "172.16.0.1"])), endpoint_port=51820,
        node_ips=draw(st.frozensets(st.sampled_from(ADDRESSES), max_size=1)), pod_ips=pod_ips,
        pod_ips_changed_at=draw(st.sampled_from([0.0, 1.0, 2.0])), pod_ip_claims=claims)



events = st.one_of(
    st.tuples(st.just("remote"), remote_nodes()),
    st.tuples(st.just("remove"), st.sampled_from(NODE_NAMES)),
    st.tuples(st.just("local"), st.sampled_from(["p1", "p2"]), st.frozensets(st.sampled_from(ADDRESSES), max_size=2)),
)


def _state(model: NodeModel) -> tuple:
    return (dict(model.peers), dict(model.routes), {ip: model.owner_of(ip) for ip in map(_ip, ADDRESSES)},
            model.problems())


def _check_routes(model: NodeModel, before: dict, changes) -> None:  # type: ignore[no-untyped-def]
    """The derived routes agree with themselves, and the changes name every route that changed with the kind it had
    (what the reconciler takes for the table's content when it is in sync)."""
    after = dict(model.routes.items())
    assert len(after) == len(model.routes) == sum(model.route_counts().values())
    assert all(model.routes[prefix] is kind and prefix in model.routes for prefix, kind in after.items())
    assert model.route_counts() == {kind: list(after.values()).count(kind) for kind in RouteKind}
    changed = {prefix for prefix in before.keys() | after.keys() if before.get(prefix) != after.get(prefix)}
    assert changes.previous_routes is not None
    assert changed <= changes.previous_routes.keys()
    assert all(kind == before.get(prefix) for prefix, kind in changes.previous_routes.items())


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=25), st.booleans())
def test_incremental_model_equals_a_model_built_from_scratch(steps: list[tuple], host_encryption: bool) -> None:
    incremental = NodeModel("local", [LOCAL_NODE_IP], host_encryption=host_encryption)
    remotes: dict[str, RemoteNode] = {}
    local: dict[str, frozenset[str]] = {}
    for step in steps:
        before = dict(incremental.routes.items())
        if step[0] == "remote":
            remotes[step[1].name] = step[1]
            incremental.set_remote_node(step[1])
        elif step[0] == "remove":
            remotes.pop(step[1], None)
            incremental.remove_remote_node(step[1])
        else:
            local[step[1]] = step[2]
            incremental.set_local_pod(step[1], step[2])
        _check_routes(incremental, before, incremental.take_changes())
    scratch = NodeModel("local", [LOCAL_NODE_IP], host_encryption=host_encryption)
    scratch.replace_local_pods({record: ips for record, ips in local.items() if ips})
    scratch.replace_remote_nodes(remotes)
    assert _state(incremental) == _state(scratch)
