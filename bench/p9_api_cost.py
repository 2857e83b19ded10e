"""P9: what the design costs the Kubernetes API at 5 000 nodes x 250 pod IPs (scattered: every IP a /32).

Measured, with the hook's own code (`published_status`, `list_pages`, `remote_node_from_object`) and the test API
server (HTTPS, RBAC, schema, pagination):
- one WireguardNode watch event as the API server sends it (compact JSON), so one pod event - one coalesced write of
  a node's object - costs the server that many bytes times every hook watching (all of them), plus the PUT it
  receives;
- a relist of every WireguardNode in pages of 500 (`SyncSettings.list_page_size`), through the real client: wall
  time, bytes, requests;
- the hook's CPU to decode and parse one watch event (JSON, then the RemoteNode with its 250 pod IPs); applying it to
  the model is P3's "remote node gaining one pod IP";
- a node pool upgrade, every hook starting at once: every one lists every WireguardNode (the relist above) and every
  Node, then opens its watches and writes its object.
Counts of requests and the cluster-wide figures are the measured per-object sizes multiplied out (no machine here
holds 5 000 hooks); the quick mode measures at 200 nodes.

Run: `python -m bench.p9_api_cost` or `python -m bench.run --only P9`.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import time

import yaml
from kubernetes import client

from bench import row
from node_hook.cluster import (
    VERSION,
    SyncSettings,
    api_client_for_url,
    list_pages,
    published_status,
    remote_node_from_object,
)
from node_hook.model import LocalAnnouncement
from wgcni_lab.apiserver.resources import NODES
from wgcni_lab.apiserver.server import ApiServer

TITLE = "what the design costs the Kubernetes API at 5 000 nodes x 250 pod IPs (test API server, hook code)"
CRD_FILE = pathlib.Path(__file__).resolve().parent.parent / "conf" / "crd.yaml"
NODES_FULL, NODES_QUICK, POD_IPS = 5000, 200, 250
PAGE = 500
BASE = ipaddress.ip_address("10.0.0.0")
KEY = "A" * 43 + "="
# Targets: the API server's egress for WireguardNode events at 5 000 nodes stays within what one 10 Gbit/s NIC
# (1.25 GB/s) carries at the cluster's sustained write rate, taken as 25 coalesced node writes per second (pod churn
# of a busy 5 000-node cluster: 0.005 writes/s per node); a relist of everything within 30 s; a watch event decoded
# within 5 ms of CPU; a node pool upgrade's lists within 1 TB served.
TARGET_EVENT_MB = 1250 / 25
TARGET_RELIST_S = 30.0
TARGET_DECODE_MS = 5.0
TARGET_UPGRADE_GB = 1000.0
TARGET_RESYNC_MB_S = 100.0  # every hook's periodic safety-net relist, averaged: under a tenth of that NIC


def pod_ips(index: int, nodes: int) -> frozenset[str]:
    """Node `index`'s 250 pod IPs, scattered as in P3 (base + j*N + i, in 10.0.0.0/8): every one a /32."""
    return frozenset(str(BASE + 1 + j * nodes + index) for j in range(POD_IPS))


def wireguard_node(index: int, nodes: int, uid: str) -> dict:
    name = f"aks-nodepool1-12345678-vmss{index:06d}"
    announcement = LocalAnnouncement(name=name, public_key=KEY, endpoint_ip=f"172.16.{index // 256}.{index % 256}",
                                     endpoint_port=51820, node_ips=frozenset({f"172.16.{index // 256}.{index % 256}"}),
                                     pod_ips=frozenset(pod_ips(index, nodes)), mtu=1340, ready=True,
                                     message="dataplane programmed")
    claims = {ip: 10_000_000 + i for i, ip in enumerate(sorted(announcement.pod_ips))}  # steady state: one each
    return {"apiVersion": f"wgcni.io/{VERSION}", "kind": "WireguardNode",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "wgcni-node"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
            "status": published_status(announcement, False, time.time(), None, time.time(), claims)}


def measure(nodes: int) -> dict:
    crd = yaml.safe_load(CRD_FILE.read_text())
    with ApiServer(crds=[crd], history_window=100) as server:
        rtype = server.store.types[("wgcni.io", VERSION, "wireguardnodes")]
        for index in range(nodes):
            node = server.store.create(NODES, {"metadata": {"name": f"aks-nodepool1-12345678-vmss{index:06d}"}})
            obj = wireguard_node(index, nodes, node["metadata"]["uid"])
            status = obj.pop("status")
            server.store.create(rtype, obj)
            server.store.update(rtype, obj["metadata"]["name"], {"status": status}, "status", None)
        sample = server.store.get(rtype, "aks-nodepool1-12345678-vmss000000")
        event = json.dumps({"type": "MODIFIED", "object": sample}, separators=(",", ":")).encode()
        put = json.dumps(sample, separators=(",", ":")).encode()
        node_object = json.dumps(server.store.get(NODES, "aks-nodepool1-12345678-vmss000000")).encode()
        api_client = api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file)
        custom = client.CustomObjectsApi(api_client)
        pages: list[int] = []

        def page(**kwargs: object) -> dict:
            response = custom.list_cluster_custom_object("wgcni.io", VERSION, "wireguardnodes",
                                                         _preload_content=False, **kwargs)
            pages.append(len(response.data))
            return json.loads(response.data)

        started = time.monotonic()
        listing = list_pages(page, PAGE)
        relist_s = time.monotonic() - started
        api_client.close()
        assert len(listing["items"]) == nodes
    decode_ms = []
    for _ in range(200):
        cpu = time.process_time()
        remote_node_from_object(json.loads(event)["object"], 65536)
        decode_ms.append((time.process_time() - cpu) * 1000)
    return {"nodes": nodes, "event_bytes": len(event), "put_bytes": len(put), "relist_s": relist_s,
            "relist_bytes": sum(pages), "relist_requests": len(pages), "decode_ms": decode_ms,
            "node_object_bytes": len(node_object)}


def run(quick: bool) -> list[dict]:
    nodes = NODES_QUICK if quick else NODES_FULL
    m = measure(nodes)
    scale = NODES_FULL / nodes  # the relist grows with the cluster: its cost at 5 000 nodes, from the measured one
    event_mb = m["event_bytes"] * NODES_FULL / 1e6
    relist_bytes = m["relist_bytes"] * scale
    # A real Node object is ~10x the lab's minimal one (images, conditions, labels): counted as 15 KB each.
    upgrade_gb = NODES_FULL * (relist_bytes + NODES_FULL * 15_000) / 1e9
    label = f"{NODES_FULL} nodes x {POD_IPS} scattered pod IPs"
    resync = SyncSettings().resync_interval * 0.875  # the mean of the jittered interval
    resync_mb_s = NODES_FULL * relist_bytes / resync / 1e6
    measured_at = "" if nodes == NODES_FULL else (f"; at {NODES_FULL}: {relist_bytes / 1e6:.0f} MB, "
                                                  f"{-(-NODES_FULL // PAGE)} requests")
    return [
        row(f"{label}: bytes sent per pod event (event x {NODES_FULL} watchers)", [event_mb], unit="MB",
            target_p50=None if quick else TARGET_EVENT_MB,
            note=f"one event {m['event_bytes']} B, the PUT received {m['put_bytes']} B; 1 request in, "
                 f"{NODES_FULL} watch deliveries out"),
        row(f"{label}: relist of every WireguardNode (pages of {PAGE})", [m["relist_s"] * scale], unit="s",
            target_p50=None if quick else TARGET_RELIST_S,
            note=f"measured at {nodes} objects: {m['relist_s']:.2f} s, {m['relist_bytes'] / 1e6:.1f} MB, "
                 f"{m['relist_requests']} requests{measured_at}"),
        row(f"{label}: every hook's periodic relist, averaged", [resync_mb_s], unit="MB/s",
            target_p50=None if quick else TARGET_RESYNC_MB_S,
            note=f"{NODES_FULL} x {relist_bytes / 1e6:.0f} MB every {resync:.0f} s on average "
                 f"(resync_interval {SyncSettings().resync_interval:.0f} s, jittered 75-100%)"),
        row(f"{label}: hook CPU to decode one watch event", m["decode_ms"], unit="ms",
            target_p99=None if quick else TARGET_DECODE_MS, note="JSON + RemoteNode with 250 pod IPs"),
        row(f"{label}: node pool upgrade, every hook lists at once", [upgrade_gb], unit="GB",
            target_p50=None if quick else TARGET_UPGRADE_GB,
            note=f"{NODES_FULL} x (WireguardNodes {relist_bytes / 1e6:.0f} MB + Nodes at 15 KB each), "
                 f"{NODES_FULL * 2 * -(-NODES_FULL // PAGE)} list requests, then {NODES_FULL * 3} watches"),
    ]


if __name__ == "__main__":
    print(json.dumps(run(False), indent=2))
