"""The hook's Kubernetes sync against what a real API server does that the first test server never did: paginated
relists and expired continue tokens, 429s with Retry-After, schema pruning, asynchronous garbage collection, and
service-account tokens that expire and are rotated by the kubelet."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace

from kubernetes import client
from kubernetes.client.rest import ApiException

from node_hook.addresses import address_texts
from node_hook.cluster import GROUP, PLURAL, VERSION, SyncSettings
from node_hook.model import NodeModel
from tests.sync.helpers import FAST, announcement, create_node, new_key
from wgcni_lab.harness.polling import wait_until

PAGED = SyncSettings(**{**FAST.__dict__, "list_page_size": 2})


def object_of(custom, name):
    return custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def publish_peers(core, make_source, count):
    """`count` nodes whose hooks published one pod IP each; returns their keys by name."""
    keys, sources = {}, []
    for index in range(count):
        name = f"peer-{index}"
        create_node(core, name)
        source, _ = make_source(name)
        keys[name] = new_key()
        source.publish(announcement(name, keys[name], {f"10.240.1.{index + 10}"}, endpoint=f"10.240.0.{index + 4}"))
        sources.append(source)
    wait_until(lambda: all(source.status.published for source in sources), what="every peer published")
    return keys


def test_relists_are_paginated_and_an_expired_continue_relists_from_the_start(server, core, make_source):
    keys = publish_peers(core, make_source, 5)
    # the history moved on mid-list (only the peers' list: the Nodes' relist is paged too)
    server.fail_next(1, code=410, methods={"GET"}, path_contains="/wireguardnodes?continue=")
    create_node(core, "node-a")
    since = len(server.requests)
    _, seen = make_source("node-a", PAGED)
    wait_until(lambda: seen.calls and {name: node.public_key for name, node in seen.latest.items()} == keys,
               what="every peer through pages of two")
    lists = [(r.query, r.code) for r in list(server.requests)[since:] if r.method == "GET" and not r.watch
             and r.path == "/apis/wgcni.io/v1alpha1/wireguardnodes" and "user" not in r.query]
    assert [code for _, code in lists[:5]] == [200, 410, 200, 200, 200], lists  # page, 410, then three pages
    assert all("limit=2" in query for query, _ in lists[:5]) and "continue=" in lists[1][0], lists
    assert not server.pending_faults()


def test_a_429_on_a_write_is_retried_after_retry_after(server, core, custom, make_source):
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    server.fail_next(1, code=429, retry_after=1, methods={"PATCH"}, user_agent="wgcni-node/node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="the write after the 429")
    patches = [r for r in server.requests if r.method == "PATCH" and r.path.endswith("/nodes/node-a")]
    assert [r.code for r in patches] == [429, 200]
    assert patches[1].at - patches[0].at >= 0.9, "the retry came before Retry-After, not after FAST's 0.05 s backoff"


def test_what_the_hook_writes_survives_pruning_unchanged(server, core, custom, make_source):
    """Anything the CRD's schema does not name is pruned; the hook must write nothing of the kind, or it would
    find its object differing from what it wants and rewrite it forever."""
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70", "10.240.0.71"}))
    wait_until(lambda: source.status.published, what="published")
    writes = source.status.writes
    time.sleep(1.0)
    assert source.status.writes == writes, "the hook keeps rewriting its object"
    status = object_of(custom, "node-a")["status"]
    assert set(status) <= set(server.store.types[(GROUP, VERSION, PLURAL)].schema["properties"]["status"][
        "properties"])


def test_a_recreated_node_gets_an_object_owned_by_it_despite_a_lagging_garbage_collector(server, core, custom,
                                                                                         make_source, tokens):
    """Reimage: the Node is deleted and created again under the same name; its old WireguardNode is removed by the
    garbage collector only later. The hook ends with an object owned by the new Node."""
    server.gc_delay = 1.0
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    key = new_key()
    source.publish(announcement("node-a", key, {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="published")
    core.delete_node("node-a")
    new = create_node(core, "node-a")
    tokens.write("node-a")  # the kubelet's token for the new Node (the old one's is refused: another uid)

    def owned_by_the_new_node_with_the_key() -> bool:
        try:
            obj = object_of(custom, "node-a")
        except ApiException as error:
            if error.status == 404:  # between the garbage collector's delete and the hook's create
                return False
            raise
        owners = [owner["uid"] for owner in obj["metadata"].get("ownerReferences", [])]
        return owners == [new.metadata.uid] and obj.get("status", {}).get("publicKey") == key

    wait_until(owned_by_the_new_node_with_the_key, 15, "an object owned by the new Node, with the key")


def test_an_expired_token_is_refused_until_the_kubelet_rotates_it(server, core, make_source, tokens):
    create_node(core, "node-a")
    source, seen = make_source("node-a")
    tokens.write("node-a", ttl=1.0)  # the hook re-reads the file: from now on this short-lived token
    time.sleep(1.2)
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    reports = seen.publications
    wait_until(lambda: reports and reports[-1].state == "denied" and "401" in reports[-1].reason,
               what="the write refused with the expired token")
    assert any(r.code == 401 for r in server.requests)
    tokens.write("node-a")
    wait_until(lambda: reports[-1].state == "written", what="the write with the rotated token")


def test_claims_are_decided_per_ip_by_the_apis_ordering_not_the_nodes_clocks(core, make_source):
    """node-a's clock is an hour ahead and it keeps a stale claim of .70 after the IP moved to node-b; node-a then
    adds a pod. Per-IP claim revisions keep .70 with node-b on every observer; node-a's new pod IP is its own."""
    for name in ("node-a", "node-b", "node-c"):
        create_node(core, name)
    source_a, _ = make_source("node-a", clock=lambda: time.time() + 3600)
    source_b, _ = make_source("node-b")
    _, seen_by_c = make_source("node-c")
    key_a, key_b = new_key(), new_key()
    source_a.publish(announcement("node-a", key_a, {"10.240.0.70"}, endpoint="10.240.0.4"))
    wait_until(lambda: "10.240.0.70" in pod_ips_of(seen_by_c, "node-a"), what="node-a's claim")
    source_b.publish(announcement("node-b", key_b, {"10.240.0.70"}, endpoint="10.240.0.35"))
    wait_until(lambda: "10.240.0.70" in pod_ips_of(seen_by_c, "node-b"), what="node-b's claim")
    source_a.publish(announcement("node-a", key_a, {"10.240.0.70", "10.240.0.80"}, endpoint="10.240.0.4"))
    wait_until(lambda: "10.240.0.80" in pod_ips_of(seen_by_c, "node-a"), what="node-a's new pod")
    latest = seen_by_c.latest
    assert latest["node-a"].pod_ips_changed_at > latest["node-b"].pod_ips_changed_at  # the clocks would say node-a
    model = NodeModel("node-c")
    for remote in latest.values():
        model.set_remote_node(remote)
    assert model.owner_of(ipaddress.ip_address("10.240.0.70")) == "node-b"
    assert model.owner_of(ipaddress.ip_address("10.240.0.80")) == "node-a"


def pod_ips_of(seen, name):
    node = (seen.latest or {}).get(name)
    return set(address_texts(node.pod_ips)) if node is not None else set()


def node_with_addresses(core, name, *addresses):
    return core.create_node(client.V1Node(
        metadata=client.V1ObjectMeta(name=name),
        status=client.V1NodeStatus(addresses=[client.V1NodeAddress(type="InternalIP", address=address)
                                              for address in addresses])))


def test_a_peers_endpoint_and_node_ips_are_taken_only_if_they_are_its_nodes_addresses(core, make_source):
    """A compromised node-b announces node-a's address as its own, then an endpoint it does not have: neither is
    programmed anywhere; once what it announces is among its Node's status.addresses (as the kubelet and Azure
    report them), it is a peer."""
    node_with_addresses(core, "node-a", "10.240.0.4")
    node_with_addresses(core, "node-b", "10.240.0.35")
    source_a, _ = make_source("node-a")
    source_b, _ = make_source("node-b")
    _, seen_by_c = make_source("node-c")
    key_b = new_key()
    stolen = replace(announcement("node-b", key_b, {"10.240.0.70"}, endpoint="10.240.0.35"),
                     node_ips=frozenset({"10.240.0.35", "10.240.0.4"}))
    source_b.publish(stolen)
    wait_until(lambda: "node-b" in source_a.status.invalid_objects, what="node-b's node IP claim refused")
    assert source_a.status.invalid_objects["node-b"] == (
        "node IPs 10.240.0.4 are not addresses of Node node-b (10.240.0.35)")
    source_b.publish(announcement("node-b", key_b, {"10.240.0.70"}, endpoint="10.240.0.99"))
    wait_until(lambda: source_a.status.invalid_objects.get("node-b", "").startswith("endpoint 10.240.0.99 is not"),
               what="node-b's endpoint refused")
    assert "node-b" not in (seen_by_c.latest or {})
    core.patch_node_status("node-b", {"status": {"addresses": [{"type": "ExternalIP", "address": "10.240.0.99"}]}})
    wait_until(lambda: "node-b" in (seen_by_c.latest or {}) and "node-b" not in source_a.status.invalid_objects,
               what="node-b a peer once its Node lists the address")
    assert seen_by_c.latest["node-b"].endpoint_ip == "10.240.0.99"
