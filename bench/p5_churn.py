"""P5: Kubernetes API writes per node and events per hook under pod churn, through the real sync layer.

A test API server (`wgcni_lab.apiserver`, with the WireguardNode CRD) and one `KubernetesPeerSource` per simulated
node, with the production `SyncSettings` (at most 2 writes/s per node). Every node publishes 50 pod changes per
second (two adds for every delete) for `DURATION` seconds, all nodes at once. Measured:
- writes per second each node made to the API (its WireguardNode status and its Node) during the churn, beside the
  baseline of one write per pod change (50/s) that a publisher without coalescing would make;
- deliveries per second each hook received (a complete list, or one node changed or gone: a delta);
- after the last change: how long until every hook's latest view holds exactly every other node's final pod IPs
  (at most `CONVERGENCE_TIMEOUT`), and how many IPs every hook's view lacks then, summed (lost, must be 0, a verdict
  in quick mode too) and how many removed IPs it still holds (stale).

Run: `python -m bench.p5_churn` or `python -m bench.run --only P5`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import pathlib
import statistics
import threading
import time
from collections.abc import Mapping

import yaml
from kubernetes import client

from bench import row
from node_hook.addresses import address_texts
from node_hook.cluster import KubernetesPeerSource, SyncSettings, api_client_for_url
from node_hook.model import LocalAnnouncement, Publication, RemoteNode
from wgcni_lab.apiserver.server import ApiServer
from wgcni_lab.polling import wait_until

TITLE = "API writes per node and events per hook under 50 pod changes/s per node (test API server + cluster.py)"
NODES = 6
CHANGES_PER_SECOND = 50
DURATION = 6.0
INITIAL_PODS = 20
QUICK_NODES = 3
QUICK_DURATION = 1.0
TARGET_WRITES_PER_SECOND = 2.0
CONVERGENCE_TIMEOUT = 30.0
CONF = pathlib.Path(__file__).resolve().parent.parent / "conf"
CRD = yaml.safe_load((CONF / "crd.yaml").read_text())
RBAC = [doc for doc in yaml.safe_load_all((CONF / "rbac.yaml").read_text()) if doc]  # as a cluster enforces it


class View:
    """What one hook was handed (a PeerSink): the time of every delivery and the remote nodes they make."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[float] = []
        self.latest: dict[str, RemoteNode] = {}

    def nodes_synced(self, nodes: Mapping[str, RemoteNode]) -> None:
        with self.lock:
            self.calls.append(time.monotonic())
            self.latest = dict(nodes)

    def node_changed(self, node: RemoteNode) -> None:
        with self.lock:
            self.calls.append(time.monotonic())
            self.latest[node.name] = node

    def node_gone(self, name: str) -> None:
        with self.lock:
            self.calls.append(time.monotonic())
            self.latest.pop(name, None)

    def published(self, publication: Publication) -> None:
        """This node's own publication is not what P5 measures."""

    def pods(self) -> dict[str, frozenset[str]]:
        with self.lock:
            return {name: frozenset(address_texts(node.pod_ips)) for name, node in self.latest.items()}


def node_name(index: int) -> str:
    return f"churn-{index:02d}"


def node_ip(index: int) -> str:
    return f"10.240.0.{4 + index}"


def pod_ip(index: int, serial: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.241.0.0")) + index * 65536 + serial))


def announcement(index: int, pods: set[str]) -> LocalAnnouncement:
    key = base64.b64encode(hashlib.sha256(f"p5 {index}".encode()).digest()).decode()
    return LocalAnnouncement(name=node_name(index), public_key=key, endpoint_ip=node_ip(index), endpoint_port=51820,
                             node_ips=frozenset({node_ip(index)}), pod_ips=frozenset(pods), mtu=1340, ready=True,
                             message="dataplane programmed")


def missing_and_stale(views: list[View], pods: list[set[str]]) -> tuple[int, int]:
    """(IPs a hook lacks, IPs a hook still holds that the node no longer has), summed over every hook's latest
    view of every other node (`pods[i]`: node i's pod IPs)."""
    missing = stale = 0
    for index, view in enumerate(views):
        seen = view.pods()
        for other, expected in enumerate(pods):
            if other != index:
                held = seen.get(node_name(other), frozenset())
                missing += len(expected - held)
                stale += len(held - expected)
    return missing, stale


def measure(nodes: int, duration: float) -> dict:
    settings = SyncSettings()  # production: at most 2 writes/s per node
    with ApiServer(crds=[CRD], manifests=RBAC) as server:
        admin = api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file)
        sources: list[tuple[KubernetesPeerSource, client.ApiClient]] = []
        views = [View() for _ in range(nodes)]
        try:
            core = client.CoreV1Api(admin)
            for index in range(nodes):
                core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node_name(index))))
            pods = [{pod_ip(index, serial) for serial in range(INITIAL_PODS)} for index in range(nodes)]
            serials = [INITIAL_PODS] * nodes
            for index in range(nodes):
                api_client = api_client_for_url(server.url, server.node_token(node_name(index)),
                                                ca_file=server.ca_file)
                source = KubernetesPeerSource(node_name(index), api_client, settings)
                sources.append((source, api_client))
                source.start(views[index])
                source.publish(announcement(index, pods[index]))

            def everyone_sees_everything() -> bool:
                return missing_and_stale(views, pods) == (0, 0)

            wait_until(everyone_sees_everything, CONVERGENCE_TIMEOUT, "the initial pod IPs on every hook",
                       interval=0.01, error=RuntimeError)
            started = time.monotonic()
            calls_before = [len(view.calls) for view in views]
            changes = 0
            tick = 1.0 / CHANGES_PER_SECOND
            while time.monotonic() - started < duration:
                for index in range(nodes):
                    if changes % 3 == 2:  # every third change a delete of the oldest pod
                        pods[index].discard(min(pods[index], key=lambda ip: int(ipaddress.IPv4Address(ip))))
                    else:
                        pods[index].add(pod_ip(index, serials[index]))
                        serials[index] += 1
                    sources[index][0].publish(announcement(index, set(pods[index])))
                changes += 1
                time.sleep(max(0.0, started + changes * tick - time.monotonic()))
            ended = time.monotonic()
            elapsed = ended - started
            try:
                wait_until(everyone_sees_everything, CONVERGENCE_TIMEOUT, "the final pod IPs on every hook",
                           interval=0.01)
            except TimeoutError:
                pass  # not converged: the IPs still missing (or stale) are counted and reported below
            convergence = time.monotonic() - ended
            lost, stale = missing_and_stale(views, pods)
            writes = []
            for index in range(nodes):
                name = node_name(index)
                made = [record for record in server.writes(since=started)
                        if record.at <= ended and (record.path.endswith(f"/wireguardnodes/{name}/status")
                                                   or record.path.endswith(f"/wireguardnodes/{name}")
                                                   or record.path.endswith(f"/nodes/{name}"))]
                writes.append(len(made) / elapsed)
            events = [sum(1 for at in view.calls[before:] if at <= ended) / elapsed
                      for view, before in zip(views, calls_before, strict=True)]
            return {"nodes": nodes, "seconds": elapsed, "changes_per_node": changes,
                    "changes_per_second": changes / elapsed, "writes_per_second": writes,
                    "events_per_second": events, "convergence_s": convergence, "lost_ips": lost,
                    "stale_ips": stale, "final_pods_per_node": [len(p) for p in pods]}
        finally:
            for source, api_client in sources:
                source.stop()
                api_client.close()
            admin.close()


def run(quick: bool) -> list[dict]:
    nodes, duration = (QUICK_NODES, QUICK_DURATION) if quick else (NODES, DURATION)
    result = measure(nodes, duration)
    rate = result["changes_per_second"]
    writes = result["writes_per_second"]
    label = f"{nodes} nodes, {rate:.0f} pod changes/s each for {result['seconds']:.1f} s"
    entry = row(f"{label}: API writes per node", writes, unit="writes/s",
                target_p99=None if quick else TARGET_WRITES_PER_SECOND,
                note=f"baseline one write per pod change: {rate:.0f}/s; ratio {statistics.median(writes) / rate:.3f}")
    entry["baseline_p50"], entry["ratio"] = round(rate, 2), round(statistics.median(writes) / rate, 4)
    entry["raw"] = result
    events = result["events_per_second"]
    converged = result["lost_ips"] == result["stale_ips"] == 0
    rows = [
        entry,
        row(f"{label}: deliveries per hook", events, unit="events/s",
            note=f"bound: {nodes - 1} other nodes x {TARGET_WRITES_PER_SECOND:g} writes/s"),
        row(f"{label}: last change -> every hook has every IP", [result["convergence_s"]], unit="s",
            note="" if converged else f"not converged: gave up after {CONVERGENCE_TIMEOUT:g} s"),
        row(f"{label}: IPs lost", [result["lost_ips"]], unit="IPs", target_p50=0,
            note=f"{result['stale_ips']} removed IPs still held"),
    ]
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(False), indent=2))
