"""The daemon on fakes: record notifications and rescans, peer lists (no pruning before complete), outside events,
the local API answers (including malformed requests), publishing, and the static peer source."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import socketserver
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cni_plugin.records import RecordStore, utc_now_rfc3339
from node_hook import engine as engine_module
from node_hook import view as view_module
from node_hook.addresses import address_texts
from node_hook.apply.fakes import FakeFirewall, FakePodRoutes, FakeRouting, FakeSysctls, FakeWireGuard
from node_hook.config import Settings
from node_hook.contracts import WireGuardChange
from node_hook.detect import Environment
from node_hook.engine import Appliers
from node_hook.keys import load_or_create
from node_hook.local_api import LocalApiServer, answer, request
from node_hook.model import LocalAnnouncement, Publication, RemoteNode
from node_hook.node import build_node
from node_hook.static_peers import PeersFileError, StaticPeerSource, parse_peers
from tests.support.peer_sink import RecordingSink
from wgcni_lab.harness.peer_source import ManualPeerSource
from wgcni_lab.harness.polling import wait_until

KEY_B = "B" * 43 + "="


def node_b(pods: set[str]) -> RemoteNode:
    return RemoteNode("b", KEY_B, "10.240.0.35", 51820, frozenset({"10.240.0.35"}), frozenset(pods), 1.0)


def write_record(store: RecordStore, container_id: str, ips: list[str]) -> None:
    now = utc_now_rfc3339()
    with store.lock():
        store.write({"format": 1, "network": "azure", "containerID": container_id, "ifname": "eth0",
                     "netns": "/var/run/netns/x", "podNamespace": "default", "podName": container_id,
                     "podUID": None, "ips": ips, "cniVersion": "0.3.0", "prevResult": {}, "created": now,
                     "updated": now})


class Harness:
    def __init__(self, tmp: Path, **settings: object) -> None:
        self.settings = Settings(**{"node_name": "a", "state_dir": tmp / "state", "socket": tmp / "hook.sock",
                                    "record_rescan_interval": 0.2, "resync_interval": 60, **settings})
        self.key = load_or_create(self.settings.key_file)
        self.environment = Environment("10.240.0.4", frozenset({"10.240.0.4"}), "eth0", 1500, True,
                                       "test", 1340, "test")
        self.wg = FakeWireGuard()
        self.routing = FakeRouting(self.settings.route_table)
        self.sysctls = FakeSysctls({"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/wgcni0/rp_filter": "1"},
                                   self.settings.sysctl_originals_file)
        self.source = ManualPeerSource()
        self.pod_routes = FakePodRoutes()
        self.store = RecordStore(str(self.settings.state_dir))
        self.node = build_node(self.settings, self.key, self.environment, self.source,
                               appliers=Appliers(self.wg, self.routing, FakeFirewall(), self.sysctls),
                               records=self.store, pod_routes=self.pod_routes, monitor_netlink=False)
        self.engine, self.view = self.node.engine, self.node.view

    def settle(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        wait_until(predicate, timeout, "the daemon's state", interval=0.01,
                   detail=lambda: f"status {self.view.status()}")


@contextmanager
def running_harness(tmp: Path, accept_writes: bool = True, **settings: object) -> Iterator[Harness]:
    """A started Harness (with these settings), stopped afterwards; with `accept_writes` False its API refuses
    every write from the start (set later, the report of a publication already in flight could still arrive)."""
    harness = Harness(tmp, **settings)
    harness.source.accept_writes = accept_writes
    harness.node.start()
    try:
        yield harness
    finally:
        harness.node.stop()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with running_harness(tmp_path) as harness:
        yield harness


@pytest.fixture
def refused_harness(tmp_path: Path) -> Iterator[Harness]:
    """A harness whose API has never held a write: the test reports what it holds."""
    with running_harness(tmp_path, accept_writes=False) as harness:
        yield harness


def routes(h: Harness) -> dict[str, str]:
    return {str(prefix): kind for prefix, kind in h.routing.routes.items()}


def test_notification_applies_the_record_at_once(harness: Harness) -> None:
    write_record(harness.store, "c1", ["10.240.0.9"])
    harness.engine.pod_changed("azure", "c1", "eth0", wait=5)
    assert routes(harness)["10.240.0.9/32"] == "throw"
    assert harness.view.check(["10.240.0.9"]) == {"programmed": True, "missing": [], "message": "programmed"}
    with harness.store.lock():
        harness.store.remove("azure", "c1", "eth0")
    harness.engine.pod_changed("azure", "c1", "eth0", wait=5)
    assert "10.240.0.9/32" not in routes(harness)
    assert harness.view.check(["10.240.0.9"])["missing"] == ["10.240.0.9"]


def test_records_are_found_by_the_rescan_without_a_notification(harness: Harness) -> None:
    write_record(harness.store, "c2", ["10.240.0.10"])
    harness.settle(lambda: routes(harness).get("10.240.0.10/32") == "throw")
    assert harness.view.pods()[0]["podName"] == "c2"


def test_invalid_record_is_reported_and_never_programmed(harness: Harness) -> None:
    directory = harness.settings.records_dir / "azure"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bad@eth0.json").write_text("{not json")
    harness.settle(lambda: harness.engine.record_errors != [])
    assert "bad@eth0.json" in harness.engine.record_errors[0]
    assert routes(harness) == {}


def test_peers_are_not_pruned_before_a_complete_list(harness: Harness) -> None:
    harness.source.change(node_b({"10.240.0.70"}))  # a delta before the first complete list
    harness.settle(lambda: KEY_B in (harness.wg.device.peers if harness.wg.device else {}))
    harness.source.gone("c")  # a delta about another node: b stays
    time.sleep(0.1)
    assert KEY_B in harness.wg.device.peers  # type: ignore[union-attr]
    assert not harness.view.status()["peersComplete"]
    harness.source.sync()  # complete and empty: b goes
    harness.settle(lambda: KEY_B not in harness.wg.device.peers)  # type: ignore[union-attr]
    assert harness.view.status()["peersComplete"]


def test_publishes_local_pods_key_and_readiness(harness: Harness) -> None:
    write_record(harness.store, "c3", ["10.240.0.11"])
    harness.engine.pod_changed("azure", "c3", "eth0", wait=5)
    harness.settle(lambda: bool(harness.source.published) and
                   address_texts(harness.source.published[-1].pod_ips) == ["10.240.0.11"])
    last = harness.source.published[-1]
    assert last.public_key == harness.key.public_key and last.ready and last.mtu == 1340


def test_failure_is_retried_and_reported_then_clears(harness: Harness) -> None:
    harness.settle(lambda: harness.view.status()["ready"])
    harness.routing.fail_next.add("apply")
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.settle(lambda: harness.routing.routes.get(ipaddress.ip_network("10.240.0.70/32")) == "dev")
    harness.settle(lambda: harness.view.status()["ready"])
    assert harness.engine.reconciler.errors == 1 and harness.view.status()["lastError"] is None


def test_outside_deletion_of_the_device_is_repaired_with_the_same_key(harness: Harness) -> None:
    harness.settle(lambda: harness.view.status()["ready"])
    before = harness.wg.device.public_key  # type: ignore[union-attr]
    harness.wg.device = None
    harness.engine._enqueue(out_of_sync=("device",))  # what the netlink monitor does on RTM_DELLINK
    harness.settle(lambda: harness.wg.device is not None)
    assert harness.wg.device.public_key == before == harness.key.public_key  # type: ignore[union-attr]


def test_routes_seen_are_rechecked_and_a_flood_reads_the_table_back(harness: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.settle(lambda: harness.view.status()["ready"] and "10.240.0.70/32" in routes(harness))
    pod = ipaddress.ip_network("10.240.0.70/32")
    harness.routing.routes[pod] = "foreign"  # what the monitor reports as a changed route
    harness.routing.reads.clear()
    harness.engine.routes_seen({pod: "foreign", ipaddress.ip_network("10.240.0.35/32"): "dev"})  # one of ours
    harness.settle(lambda: harness.routing.routes[pod] == "dev")
    assert harness.routing.reads == []  # rechecked alone
    monkeypatch.setattr(engine_module, "ROUTES_SEEN_LIMIT", 2)
    harness.routing.routes[pod] = "foreign"
    harness.engine.routes_seen({ipaddress.ip_network(f"10.9.0.{i}/32"): None for i in range(3)})
    harness.settle(lambda: harness.routing.routes[pod] == "dev")  # found by reading the table back
    assert True in harness.routing.reads


def test_a_foreign_write_of_a_peers_allowed_ip_rechecks_that_peer(harness: Harness,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.settle(lambda: harness.view.status()["ready"] and "10.240.0.70/32" in routes(harness))
    rechecked: list[set[str]] = []
    monkeypatch.setattr(harness.engine.reconciler, "recheck_peers", lambda keys: rechecked.append(set(keys)))
    other = "X" * 43 + "="
    harness.engine.wireguard_changed(WireGuardChange(
        peer_keys=frozenset({other}),
        allowed_ips=frozenset(ipaddress.ip_network(ip) for ip in ("10.240.0.70/32", "10.240.0.4/32", "10.9.0.1/32"))))
    harness.settle(lambda: bool(rechecked))
    assert rechecked == [{other, KEY_B}]  # b holds 10.240.0.70; the local and the unowned address name no peer


def test_local_api_over_the_socket(harness: Harness) -> None:
    server = LocalApiServer(harness.settings.socket, harness.node)
    server.start()
    try:
        assert os.stat(harness.settings.socket).st_mode & 0o777 == 0o600
        write_record(harness.store, "c4", ["10.240.0.12"])
        assert request(harness.settings.socket, {"op": "pod-added", "network": "azure", "containerID": "c4",
                                                 "ifname": "eth0"}) == {"ok": True}
        harness.settle(lambda: request(harness.settings.socket, {"op": "check", "ips": ["10.240.0.12"]})["programmed"])
        status = request(harness.settings.socket, {"op": "status"})
        assert status["ok"] and status["node"] == "a" and status["counts"]["localPods"] == 1
        (route,) = request(harness.settings.socket, {"op": "routes"})["routes"]
        assert (route["prefix"], route["kind"], route["owner"]) == ("10.240.0.12/32", "throw", "local")
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(harness.settings.socket))
            raw.sendall(b"this is not json\n")
            reply = json.loads(raw.makefile().readline())
        assert reply == {"ok": False, "error": "request is not one line of JSON"}
        assert request(harness.settings.socket, {"op": "status"})["ok"]  # still serving
        with pytest.raises(Exception, match="already serving"):
            LocalApiServer(harness.settings.socket, harness.node).start()
    finally:
        server.stop()
    assert not harness.settings.socket.exists()


@pytest.mark.parametrize("request_,error", [
    ([], 'request must be a JSON object with an "op" string'),
    ({"op": "pod-added", "network": "azure"}, "pod-added: 'containerID' must be a non-empty string"),
    ({"op": "check", "ips": "10.0.0.1"}, "check: 'ips' must be a list of strings"),
    ({"op": "frobnicate"}, "unknown op 'frobnicate'"),
])
def test_bad_requests_get_actionable_errors(harness: Harness, request_: object, error: str) -> None:
    reply = answer(harness.node, request_)
    assert reply["ok"] is False and error in reply["error"]


def test_static_peers_file_parsing_and_errors(tmp_path: Path) -> None:
    text = json.dumps({"nodes": [{"name": "b", "publicKey": KEY_B, "endpoint": "10.240.0.35",
                                  "nodeIPs": ["10.240.0.35"], "podIPs": ["10.240.0.70"], "podIPsChangedAt": 5}]})
    assert parse_peers(text, "f")["b"] == RemoteNode("b", KEY_B, "10.240.0.35", 51820, frozenset({"10.240.0.35"}),
                                                   frozenset({"10.240.0.70"}), 5.0)
    for bad, needle in (("[]", "expected"), ('{"nodes": [{"name": "b", "podIPs": ["x"]}]}', "podIPs"),
                        ('{"nodes": [{}]}', "name"), ("{", "not JSON")):
        with pytest.raises(PeersFileError, match=needle):
            parse_peers(bad, "f")


def test_static_source_rereads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    peers = tmp_path / "peers.json"
    seen = RecordingSink()
    source = StaticPeerSource(peers, tmp_path / "announce.json", poll_interval=0.02)
    source.start(seen)
    try:
        assert seen.calls == [] and "no such file" in (source.error or "")
        peers.write_text(json.dumps({"nodes": [{"name": "b", "publicKey": KEY_B, "endpoint": "10.240.0.35"}]}))
        wait_until(lambda: seen.calls, 5, "the peers file read", interval=0.01)
        assert seen.kinds() == ["synced"] and set(seen.latest or {}) == {"b"}
        peers.write_text("{broken")
        wait_until(lambda: source.error, 5, "the broken peers file reported", interval=0.01)
        assert len(seen.calls) == 1 and "not JSON" in (source.error or "")
        source.publish(LocalAnnouncement("a", "K", "10.240.0.4", 51820, frozenset({"10.240.0.4"}),
                                         frozenset({"10.240.0.9"}), 1340, True, "ok"))
        assert json.loads((tmp_path / "announce.json").read_text())["podIPs"] == ["10.240.0.9"]
        assert seen.publications == [Publication("written", "K", frozenset({"10.240.0.4", "10.240.0.9"}))]
    finally:
        source.stop()


def test_local_api_takes_a_burst_of_plugin_connections_before_accepting(tmp_path: Path) -> None:
    """kubelet starts many pods at once: connections queued before the server accepts are not refused."""
    from node_hook.local_api import _Server

    path = tmp_path / "hook.sock"
    server = _Server(str(path), socketserver.StreamRequestHandler)  # listening, never accepting
    clients = []
    try:
        for _ in range(200):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            client.connect(str(path))  # BlockingIOError here once the backlog is full
    finally:
        for client in clients:
            client.close()
        server.server_close()


def test_a_pod_without_a_record_is_local_and_published_from_its_host_route(harness: Harness) -> None:
    """A pod that predates wgcni has no record, only azure-vnet's host route: it must be local (throw route, never
    given to a peer) and published, or its replies enter the tunnel with a source no peer allows."""
    harness.source.sync(node_b({"10.240.0.70", "10.240.0.20"}))
    harness.pod_routes.routes["azv0123456789a"] = frozenset({"10.240.0.20"})
    harness.engine.pod_routes_changed()  # what the netlink monitor does on RTM_NEWROUTE in the main table
    harness.settle(lambda: routes(harness).get("10.240.0.20/32") == "throw")
    harness.settle(lambda: address_texts(harness.source.published[-1].pod_ips) == ["10.240.0.20"])
    assert harness.view.check(["10.240.0.20"])["programmed"]
    peer_b = harness.wg.device.peers[KEY_B]  # type: ignore[union-attr]
    assert ipaddress.ip_network("10.240.0.20/32") not in peer_b.allowed_ips  # local wins over b's claim
    (pod,) = harness.view.pods()
    assert pod["sources"] == ["route"] and pod["hostInterface"] == "azv0123456789a" and pod["podName"] is None
    assert harness.view.status()["counts"]["podsWithoutRecord"] == 1

    write_record(harness.store, "c5", ["10.240.0.20"])  # the pod is recreated with wgcni in the chain
    harness.engine.pod_changed("azure", "c5", "eth0", wait=5)
    (pod,) = harness.view.pods()
    assert pod["sources"] == ["record", "route"] and pod["podName"] == "c5"
    assert harness.view.unrecorded_pods() == []

    del harness.pod_routes.routes["azv0123456789a"]  # the pod is local while either source still names it
    harness.engine.pod_routes_changed()
    harness.settle(lambda: harness.view.pods()[0]["sources"] == ["record"])
    assert routes(harness)["10.240.0.20/32"] == "throw"  # still local: the record names it
    with harness.store.lock():
        harness.store.remove("azure", "c5", "eth0")
    harness.engine.pod_changed("azure", "c5", "eth0", wait=5)
    harness.settle(lambda: routes(harness).get("10.240.0.20/32") == "dev")  # now b's
    assert harness.view.pods() == []


def test_pod_routes_that_cannot_be_read_keep_what_was_learned(harness: Harness) -> None:
    harness.pod_routes.routes["azvaaaaaaaaaaa"] = frozenset({"10.240.0.21"})
    harness.engine.pod_routes_changed()
    harness.settle(lambda: routes(harness).get("10.240.0.21/32") == "throw")
    harness.pod_routes.fail_next.add("read")
    harness.pod_routes.routes.clear()
    harness.engine.pod_routes_changed()
    harness.settle(lambda: "read" not in harness.pod_routes.fail_next)
    assert routes(harness)["10.240.0.21/32"] == "throw"  # a failed read forgets nothing
    harness.settle(lambda: "10.240.0.21/32" not in routes(harness))  # the rescan reads again


def tunnel_rules(harness: Harness) -> set[int]:
    return {rule.family for rule in harness.routing.rules if rule.source is None}


def bypass_sources(harness: Harness) -> set[str]:
    return {str(rule.source.network_address) for rule in harness.routing.rules if rule.source is not None}


def test_a_node_whose_publication_the_api_does_not_hold_is_never_a_black_hole(refused_harness: Harness) -> None:
    """Writes refused (RBAC, admission, a wrong Node name): no peer has this node's key, so the tunnel rule goes
    and traffic stays in the main table; once the API holds the key, only IPs it does not list yet bypass."""
    harness = refused_harness
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.source.report(Publication("denied", "", frozenset(), "API error 403 Forbidden"))
    harness.settle(lambda: harness.view.publication_status()["state"] == "denied" and tunnel_rules(harness) == set()
                   and harness.view.status()["ready"])
    publication = harness.view.publication_status()
    assert publication["state"] == "denied" and not publication["tunnel"]
    assert "API error 403 Forbidden; until the API holds it, all its traffic leave(s) in plaintext" in \
        publication["message"]

    write_record(harness.store, "c6", ["10.240.0.22"])
    harness.engine.pod_changed("azure", "c6", "eth0", wait=5)
    held = frozenset({"10.240.0.4"})  # the key and node IP are written, the new pod's IP is not yet
    harness.source.report(Publication("pending", harness.key.public_key, held))
    harness.settle(lambda: tunnel_rules(harness) == {4, 6} and bypass_sources(harness) == {"10.240.0.22"})
    assert harness.view.publication_status()["state"] == "pending"
    assert harness.view.publication_status()["unpublished"] == ["10.240.0.22"]

    harness.source.report(Publication("written", harness.key.public_key, held | {"10.240.0.22"}))
    harness.settle(lambda: bypass_sources(harness) == set())
    assert tunnel_rules(harness) == {4, 6} and harness.view.publication_status()["state"] == "confirmed"

    harness.source.report(Publication("written", "C" * 43 + "=", held | {"10.240.0.22"}))  # someone else's key
    harness.settle(lambda: tunnel_rules(harness) == set())
    assert harness.view.publication_status()["state"] == "stale"


def test_an_overdue_publication_is_a_finding_and_not_ready(refused_harness: Harness,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_module, "PUBLICATION_GRACE_SECONDS", 0.2)
    harness = refused_harness
    harness.source.sync()
    harness.source.report(Publication("unreachable", harness.key.public_key, frozenset({"10.240.0.4"}),
                                      "publishing was refused or failed: MaxRetryError"))
    write_record(harness.store, "c7", ["10.240.0.23"])
    harness.engine.pod_changed("azure", "c7", "eth0", wait=5)
    harness.settle(lambda: harness.view.publication_status()["overdue"])
    status = harness.view.publication_status()
    assert status["state"] == "unreachable" and status["unpublished"] == ["10.240.0.23"]
    (finding,) = [f for f in harness.view.diagnose()["findings"] if f["check"] == "publication"]
    assert finding["severity"] == "error" and "unreachable" in finding["message"]
    assert "reaches the API server" in finding["fix"]
