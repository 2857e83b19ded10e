"""KubernetesPeerSource against the test API server: publishing (coalescing, 409 storms, 500s, restarts),
watching (cut streams, 410 relist, prune only after a complete list), opt-out, node deletion and GC."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import pathlib
import threading
import time

import yaml
from kubernetes import client

from node_hook.addresses import address_texts, host_keys
from node_hook.cluster import GROUP, PLURAL, PUBLIC_KEY_ANNOTATION, VERSION, SyncSettings, expand_prefixes
from tests.sync.helpers import FAST, announcement, create_node, new_key
from wgcni_lab.harness.polling import wait_until

OWN_OBJECT = "/wireguardnodes/node-a"


def _published(source):
    return source.status.published


def object_of(custom, name):
    return custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def seen_pod_ips(recorder, name):
    latest = recorder.latest or {}
    return set(address_texts(latest[name].pod_ips)) if name in latest else None


def fast_writer_published(core, make_source):
    """node-a in the API with a peer source that has published its first announcement (10.240.0.70): source, key.
    Failed writes count against the write rate too; 50 writes/s keeps the fault tests short."""
    create_node(core, "node-a")
    source, _ = make_source("node-a", SyncSettings(**{**FAST.__dict__, "max_writes_per_second": 50.0}))
    key = new_key()
    source.publish(announcement("node-a", key, {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="first publish")
    return source, key


def two_nodes(core, make_source):
    """node-a and node-b in the API, each with a running peer source: source_a, seen_by_a, source_b, seen_by_b."""
    create_node(core, "node-a")
    create_node(core, "node-b")
    return (*make_source("node-a"), *make_source("node-b"))


def node_a_seen_by_b(core, make_source):
    """two_nodes() after node-b saw node-a's first announcement (a new key, 10.240.0.70): source_a, source_b,
    seen_by_b, key."""
    source_a, _, source_b, seen_by_b = two_nodes(core, make_source)
    key = new_key()
    source_a.publish(announcement("node-a", key, {"10.240.0.70"}))
    wait_until(lambda: seen_pod_ips(seen_by_b, "node-a") == {"10.240.0.70"}, what="first view")
    return source_a, source_b, seen_by_b, key


def test_publish_creates_owned_object_and_annotation_and_peers_see_it(core, custom, make_source):
    node_a = create_node(core, "node-a")
    create_node(core, "node-b")
    key_a, key_b = new_key(), new_key()
    source_a, seen_by_a = make_source("node-a")
    source_b, seen_by_b = make_source("node-b")
    source_a.publish(announcement("node-a", key_a, {"10.240.0.70", "10.240.0.71", "fd00::7"}))
    source_b.publish(announcement("node-b", key_b, {"10.240.0.9"}, endpoint="10.240.0.35"))
    wait_until(lambda: "node-a" in (seen_by_b.latest or {}) and "node-b" in (seen_by_a.latest or {}), what="peers")
    remote_a = seen_by_b.latest["node-a"]
    assert remote_a.public_key == key_a and remote_a.endpoint_ip == "10.240.0.4"
    assert set(address_texts(remote_a.pod_ips)) == {"10.240.0.70", "10.240.0.71", "fd00::7"}
    assert "node-a" not in seen_by_a.latest, "a node is not its own peer"
    obj = object_of(custom, "node-a")
    assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "node-a",
                                                   "uid": node_a.metadata.uid}]
    assert obj["status"]["podIPPrefixes"] == ["10.240.0.70/31", "fd00::7/128"]
    assert obj["status"]["conditions"][0]["type"] == "Ready" and obj["status"]["conditions"][0]["status"] == "True"
    assert core.read_node("node-a").metadata.annotations[PUBLIC_KEY_ANNOTATION] == key_a
    assert seen_by_b.kinds()[0] == "synced", "nothing is handed over before the complete list"
    wait_until(lambda: source_a.status.published, what="published flag")


def test_churn_is_coalesced_to_two_writes_per_second_and_every_ip_is_published(server, core, custom, make_source):
    create_node(core, "node-a")
    source, _ = make_source("node-a", SyncSettings(**{**FAST.__dict__, "max_writes_per_second": 2.0}))
    assert SyncSettings().max_writes_per_second == 2.0, "the production default is what this test checks"
    key = new_key()
    source.publish(announcement("node-a", key, set()))
    wait_until(lambda: source.status.published, what="first publish")
    started = time.monotonic()
    ips: set[str] = set()
    base = ipaddress.IPv4Address("10.240.1.0")
    for index in range(100):  # 50 pod changes per second for 2 s: adds, with every fifth a delete
        ips.add(str(base + 3 * index))
        if index % 5 == 4:
            ips.discard(str(base + 3 * (index - 2)))
        source.publish(announcement("node-a", key, ips))
        time.sleep(0.02)
    wait_until(lambda: source.status.published, what="churn published")
    published = object_of(custom, "node-a")["status"]
    assert set(address_texts(expand_prefixes(published["podIPPrefixes"], 1 << 16))) == ips
    writes = [record.at for record in server.writes(OWN_OBJECT, since=started)]
    elapsed = time.monotonic() - started
    assert len(writes) <= 2 * elapsed + 1, (len(writes), elapsed)
    gaps = [later - earlier for earlier, later in itertools.pairwise(writes)]
    assert all(gap >= 0.45 for gap in gaps), gaps  # a burst: evenly spaced writes of the latest state


def test_a_lone_change_soon_after_a_write_is_written_at_once(server, core, custom, make_source):
    """A pod's DEL 0.1 s after its ADD was written used to wait for the 0.5 s spacing; a third change within the
    second waits for the window (2 writes in any second)."""
    create_node(core, "node-a")
    source, _ = make_source("node-a", SyncSettings(**{**FAST.__dict__, "max_writes_per_second": 2.0}))
    key = new_key()
    source.publish(announcement("node-a", key, {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="first publish")
    time.sleep(1.1)  # quiet: the window is empty again
    started = time.monotonic()
    source.publish(announcement("node-a", key, {"10.240.0.70", "10.240.0.71"}))
    wait_until(lambda: source.status.published, what="the ADD")
    time.sleep(0.1)
    source.publish(announcement("node-a", key, {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="the DEL")
    source.publish(announcement("node-a", key, {"10.240.0.72"}))
    wait_until(lambda: source.status.published, what="the third change")
    writes = [record.at for record in server.writes(OWN_OBJECT, since=started)]
    assert len(writes) == 3, writes
    assert writes[1] - writes[0] < 0.45, writes  # at once (0.1 s and the requests), not 0.5 s after the ADD
    assert writes[2] - writes[0] >= 1.0 - 0.02, writes  # the window, with the server clock's rounding margin
    assert object_of(custom, "node-a")["status"]["podIPPrefixes"] == ["10.240.0.72/32"]


def test_conflict_storm_and_server_errors_never_lose_the_update(server, core, custom, make_source):
    source, key = fast_writer_published(core, make_source)
    server.fail_next(12, code=409, methods={"PUT"}, path_contains=OWN_OBJECT)
    server.fail_next(6, code=500, methods={"PUT", "GET"}, path_contains=OWN_OBJECT)
    source.publish(announcement("node-a", key, {"10.240.0.70", "10.240.0.71"}))
    wait_until(lambda: source.status.published, timeout=20, what="publish through the storm")
    status = object_of(custom, "node-a")["status"]
    # .70 was claimed before .71: published in two claim groups (podIPClaimRevisions), each aggregated
    assert address_texts(expand_prefixes(status["podIPPrefixes"], 8)) == ["10.240.0.70", "10.240.0.71"]
    assert len(status["podIPClaimRevisions"]) == len(status["podIPPrefixes"]) == 2
    assert int(status["podIPClaimRevisions"][0]) < int(status["podIPClaimRevisions"][1])
    assert source.status.write_errors >= 1


def test_someone_elses_edit_of_the_object_is_repaired(core, custom, make_source):
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="first publish")
    custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-a",
                                              {"status": {"podIPPrefixes": ["10.240.0.0/24"], "podIPCount": 256}})
    wait_until(lambda: object_of(custom, "node-a")["status"]["podIPPrefixes"] == ["10.240.0.70/32"],
               what="the hook's own state written back")
    assert object_of(custom, "node-a")["status"]["podIPCount"] == 1


def test_cut_watch_and_410_relist_keep_peers_exact(server, core, make_source):
    source_a, source_b, seen_by_b, key = node_a_seen_by_b(core, make_source)
    server.cut_watches()
    source_a.publish(announcement("node-a", key, {"10.240.0.71"}))
    wait_until(lambda: seen_pod_ips(seen_by_b, "node-a") == {"10.240.0.71"}, what="view after cut")
    relists = source_b.status.relists
    # Watches go down and stay down while node-a changes and the history is compacted: resuming is 410 Gone.
    server.fail_next(10_000, code=503, methods={"GET"}, path_contains="/wireguardnodes")
    server.cut_watches()
    source_a.publish(announcement("node-a", key, {"10.240.0.72"}))
    wait_until(lambda: source_a.status.published, what="publish during outage")
    server.compact()
    server.clear_faults()
    wait_until(lambda: seen_pod_ips(seen_by_b, "node-a") == {"10.240.0.72"}, what="view after 410")
    assert source_b.status.relists > relists


def test_restart_during_publish_converges(server, core, custom, make_source):
    source_a, _, seen_by_b, key = node_a_seen_by_b(core, make_source)
    server.stop()
    source_a.publish(announcement("node-a", key, {"10.240.0.90"}))
    time.sleep(0.5)  # the writer fails against a closed port and keeps the announcement
    server.store.compact()
    server.start()
    wait_until(lambda: seen_pod_ips(seen_by_b, "node-a") == {"10.240.0.90"}, timeout=15, what="view after restart")
    assert source_a.status.write_errors >= 1


def test_peers_are_handed_over_only_after_a_complete_list(server, core, custom, make_source):
    for name in ("node-a", "node-b", "node-c"):
        create_node(core, name)
    for name in ("node-b", "node-c"):
        source, _ = make_source(name)
        source.publish(announcement(name, new_key(), {f"10.240.0.{10 + len(name)}"}))
        wait_until(functools.partial(_published, source), what=f"{name} published")
    server.fail_next(4, code=500, methods={"GET"}, path_contains="/wireguardnodes")
    _, seen_by_a = make_source("node-a")
    wait_until(lambda: seen_by_a.calls, what="first hand-over")
    kind, first_nodes = seen_by_a.calls[0]
    assert kind == "synced" and set(first_nodes) == {"node-b", "node-c"}  # type: ignore[arg-type]


def test_opt_out_label_publishes_no_key_and_peers_go_plaintext(core, custom, make_source):
    source_a, _, _, seen_by_b = two_nodes(core, make_source)
    key_a = new_key()
    source_a.publish(announcement("node-a", key_a, {"10.240.0.70"}))
    wait_until(lambda: (seen_by_b.latest or {}).get("node-a") and seen_by_b.latest["node-a"].public_key == key_a,
               what="key seen")
    core.patch_node("node-a", {"metadata": {"labels": {"wgcni.io/wireguard": "disabled"}}})
    wait_until(lambda: seen_by_b.latest["node-a"].public_key == "", what="opted-out node seen without key")
    status = object_of(custom, "node-a")["status"]
    assert status["encryption"] == "OptedOut" and status["podIPPrefixes"] == ["10.240.0.70/32"]
    wait_until(lambda: PUBLIC_KEY_ANNOTATION not in (core.read_node("node-a").metadata.annotations or {}),
               what="annotation removed")
    assert source_a.status.opted_out
    core.patch_node("node-a", {"metadata": {"labels": {"wgcni.io/wireguard": None}}})
    wait_until(lambda: seen_by_b.latest["node-a"].public_key == key_a, what="key back")


def test_opted_out_node_hands_its_hook_no_remote_keys(core, make_source):
    create_node(core, "node-a", labels={"wgcni.io/wireguard": "disabled"})
    create_node(core, "node-b")
    source_b, _ = make_source("node-b")
    source_b.publish(announcement("node-b", new_key(), {"10.240.0.9"}, endpoint="10.240.0.35"))
    _, seen_by_a = make_source("node-a")
    wait_until(lambda: "node-b" in (seen_by_a.latest or {}), what="node-b seen")
    assert seen_by_a.latest["node-b"].public_key == ""
    assert seen_by_a.latest["node-b"].pod_ips == host_keys({"10.240.0.9"}, "test")


def test_node_deletion_garbage_collects_object_and_peer_disappears(core, custom, make_source):
    source_a, _, source_b, seen_by_b = two_nodes(core, make_source)
    source_a.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: "node-a" in (seen_by_b.latest or {}), what="node-a seen")
    assert seen_by_b.kinds()[-1] == "changed" and source_b.status.remote_nodes == 1  # a delta, counted
    core.delete_node("node-a")
    wait_until(lambda: "node-a" not in seen_by_b.latest, what="node-a gone")
    assert seen_by_b.kinds()[-1] == "gone" and source_b.status.remote_nodes == 0
    assert [o["metadata"]["name"] for o in custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]] == []


def test_own_object_deleted_is_recreated(core, custom, make_source):
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: source.status.published, what="published")
    custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a")
    wait_until(lambda: _exists_with_ips(custom, "node-a", ["10.240.0.70/32"]), what="recreated")


def _exists_with_ips(custom, name, prefixes):
    try:
        return object_of(custom, name).get("status", {}).get("podIPPrefixes") == prefixes
    except client.ApiException:
        return False


def test_publish_waits_for_its_node_to_exist(core, custom, make_source, tokens):
    source, _ = make_source("node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: source.status.write_errors >= 1, what="a failed attempt without a Node")
    create_node(core, "node-a")
    tokens.write("node-a")  # the kubelet's next token is bound to the Node; the hook re-reads the file
    wait_until(lambda: _exists_with_ips(custom, "node-a", ["10.240.0.70/32"]), what="object once the Node exists")


def test_invalid_objects_are_ignored_and_reported(core, custom, make_source):
    create_node(core, "node-b")
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "WireguardNode", "metadata": {"name": "node-x"}})
    bad = object_of(custom, "node-x")
    # the CRD's schema refuses a malformed key, so this one is what the schema allows but no peer can be made of
    bad["status"] = {"publicKey": new_key(), "podIPPrefixes": ["10.240.0.5/32"]}
    custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, "node-x", bad)
    source_b, seen_by_b = make_source("node-b")
    wait_until(lambda: seen_by_b.calls, what="hand-over")
    assert "node-x" not in seen_by_b.latest
    assert source_b.status.invalid_objects["node-x"] == "a node with a key needs an endpoint address and port"


def test_ip_moving_between_nodes_carries_a_later_claim(core, make_source):
    for name in ("node-a", "node-b", "node-c"):
        create_node(core, name)
    source_a, _ = make_source("node-a")
    source_b, _ = make_source("node-b")
    _, seen_by_c = make_source("node-c")
    key_a, key_b = new_key(), new_key()
    source_a.publish(announcement("node-a", key_a, {"10.240.0.70"}))
    source_b.publish(announcement("node-b", key_b, set(), endpoint="10.240.0.35"))
    wait_until(lambda: seen_pod_ips(seen_by_c, "node-a") == {"10.240.0.70"}, what="A owns the IP")
    source_b.publish(announcement("node-b", key_b, {"10.240.0.70"}, endpoint="10.240.0.35"))  # reused on B first
    wait_until(lambda: seen_pod_ips(seen_by_c, "node-b") == {"10.240.0.70"}, what="B claims the IP")
    latest = seen_by_c.latest
    assert latest["node-b"].pod_ips_changed_at > latest["node-a"].pod_ips_changed_at


def test_stop_is_prompt_even_with_open_watches(make_source, core):
    create_node(core, "node-a")
    source, recorder = make_source("node-a", SyncSettings(**{**FAST.__dict__, "watch_timeout_seconds": 300}))
    wait_until(lambda: recorder.calls, what="synced")
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 2.0


def test_a_source_that_has_published_stops_at_once_and_sends_nothing_more(server, make_source, core):
    create_node(core, "node-a")
    source, _ = make_source("node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    wait_until(lambda: _published(source), what="published")
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 2.0
    answered = len(server.requests)
    time.sleep(1.0)
    assert len(server.requests) == answered


RBAC = [doc for doc in yaml.safe_load_all((pathlib.Path(__file__).parents[2] / "conf" / "rbac.yaml").read_text())]


def _granted() -> set[tuple[str, str]]:
    role = next(doc for doc in RBAC if doc["kind"] == "ClusterRole")
    return {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


def _verb(record) -> tuple[str, str]:
    parts = [part for part in record.path.split("/") if part]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    resource = rest[0] + ("/" + rest[2] if len(rest) == 3 else "")
    if record.method == "GET":
        verb = "watch" if record.watch else ("get" if len(rest) >= 2 else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[record.method]
    return resource, verb


def test_rbac_grants_exactly_what_the_sync_uses(server, core, custom, make_source):
    node = create_node(core, "node-a")
    create_node(core, "node-b")
    # node-a's object exists already (a hook restart): status written; node-b's does not: created
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "WireguardNode",
        "metadata": {"name": "node-a", "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": node.metadata.uid}]}})
    test_client_requests = len(server.requests)
    source_a, _ = make_source("node-a")
    source_b, _ = make_source("node-b")
    source_a.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    source_b.publish(announcement("node-b", new_key(), {"10.240.0.9"}, endpoint="10.240.0.35"))
    wait_until(lambda: source_a.status.published and source_b.status.published, what="both published")
    owners = object_of(custom, "node-a")["metadata"]["ownerReferences"]
    assert [owner["uid"] for owner in owners] == [node.metadata.uid]
    used = {_verb(record) for record in list(server.requests)[test_client_requests:]
            if record.code < 500 and not (record.method == "GET" and "/status" in record.path)}
    assert used <= _granted(), used - _granted()
    assert _granted() <= used, f"granted but never used: {_granted() - used}"



def test_periodic_relist_is_a_safety_net(core, make_source):
    create_node(core, "node-a")
    create_node(core, "node-b")
    source_b, _ = make_source("node-b")
    source_b.publish(announcement("node-b", new_key(), {"10.240.0.9"}, endpoint="10.240.0.35"))
    source_a, seen_by_a = make_source("node-a", SyncSettings(**{**FAST.__dict__, "resync_interval": 1.0}))
    wait_until(lambda: seen_pod_ips(seen_by_a, "node-b") == {"10.240.0.9"}, what="first view")
    synced = seen_by_a.kinds().count("synced")
    relists = source_a.status.relists
    wait_until(lambda: source_a.status.relists >= relists + 4, timeout=10, what="relists every second")
    assert seen_by_a.kinds().count("synced") > synced, "each relist hands the complete set over again"
    assert seen_by_a.latest["node-b"].pod_ips == host_keys({"10.240.0.9"}, "test")
    assert source_a.status.watch_errors == 0


def test_real_conflicts_from_a_concurrent_writer_are_retried(server, core, custom, make_source):
    source, key = fast_writer_published(core, make_source)
    stop = threading.Event()

    def meddle() -> None:
        """Another writer in bursts: bumping the object's resourceVersion as fast as it can for 0.3 s, then quiet
        for 0.3 s. A writer that never pauses starves any optimistic-concurrency writer, in a real API server too;
        the bursts make conflicts certain and leave the retries a window, as a busy controller does."""
        index = 0
        while not stop.is_set():
            burst_ends = time.monotonic() + 0.3
            while time.monotonic() < burst_ends and not stop.is_set():
                index += 1
                custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "node-a",
                                                   {"metadata": {"labels": {"touched": str(index)}}})
            stop.wait(0.3)

    meddler = threading.Thread(target=meddle)
    meddler.start()
    started = time.monotonic()
    try:
        base = ipaddress.IPv4Address("10.240.2.0")
        for index in range(1, 31):
            source.publish(announcement("node-a", key, {str(base + n) for n in range(index)}))
            time.sleep(0.03)
        wait_until(lambda: source.status.published, timeout=60, what="published despite the concurrent writer")
    finally:
        stop.set()
        meddler.join()
    status = object_of(custom, "node-a")["status"]
    assert set(address_texts(expand_prefixes(status["podIPPrefixes"], 1 << 16))) == {str(base + n) for n in range(30)}
    conflicts = [r for r in server.requests if r.at >= started and r.code == 409 and r.method == "PUT"]
    assert conflicts, "the concurrent writer caused no conflict: the test did not test what it says"


def test_what_the_api_holds_of_this_node_is_reported_back(core, server, make_source):
    """The hook trusts its publication only as far as the API holds it: a refused write is `denied` with the API's
    reason and nothing held; once writes pass, `written` with the key and every IP the object lists."""
    create_node(core, "node-a")
    server.fail_next(count=10_000, code=403, methods={"POST", "PUT", "PATCH"}, user_agent_prefix="wgcni-node/node-a")
    source, seen = make_source("node-a", SyncSettings(**{**FAST.__dict__, "max_writes_per_second": 50.0}))
    reports = seen.publications
    key = new_key()
    source.publish(announcement("node-a", key, {"10.240.0.70", "10.240.0.71"}))
    wait_until(lambda: reports and reports[-1].state == "denied", what="the refusal to be reported")
    assert reports[-1].public_key == "" and reports[-1].ips == frozenset()
    assert "API error 403" in reports[-1].reason
    server.clear_faults()
    wait_until(lambda: reports[-1].state == "written", what="the write to be held")
    assert reports[-1].public_key == key
    assert reports[-1].ips == {"10.240.0.4", "10.240.0.70", "10.240.0.71"}
    source.publish(announcement("node-a", key, {"10.240.0.70", "10.240.0.71", "10.240.0.72"}))
    wait_until(lambda: reports[-1].state == "written" and "10.240.0.72" in reports[-1].ips, what="the new pod IP")


def test_a_node_name_with_no_node_is_denied_and_says_what_to_check(make_source):
    source, seen = make_source("node-typo")
    reports = seen.publications
    source.publish(announcement("node-typo", new_key(), {"10.240.0.70"}))
    wait_until(lambda: reports and reports[-1].state == "denied", what="the refusal to be reported")
    assert "Node node-typo does not exist (is nodeName / NODE_NAME this node's Node name?)" in reports[-1].reason


def test_a_write_the_admission_policy_refuses_is_reported_with_its_message(core, make_source, tokens):
    """A hook whose token carries no node name (a kubelet without ServiceAccountTokenPodNodeInfo) has its writes
    refused by conf/rbac.yaml's policy: `denied`, with the policy's message, until its next token carries it."""
    source, seen = make_source("node-a")  # before its Node exists: the token is not bound to a node
    create_node(core, "node-a")
    source.publish(announcement("node-a", new_key(), {"10.240.0.70"}))
    reports = seen.publications
    wait_until(lambda: reports and reports[-1].state == "denied", what="the refusal to be reported")
    assert ("denied request: wgcni-node may only write the Node and the WireguardNode of the node it runs on"
            in reports[-1].reason)
    tokens.write("node-a")
    wait_until(lambda: reports[-1].state == "written", what="the write once the token is bound to the node")
