"""P8: the debug CLI, the hook's local API answers and a metrics scrape on a node with 5 000 peers.

A real hook engine (appliers on the in-memory fakes, as in P3) holds 5 000 remote nodes x 30 pod IPs (the AKS default
of max pods with Azure CNI; P3's synthetic cluster of scattered /32s, 150 000 routes, handed over by the tests'
`ManualPeerSource`) and serves its local API and `/metrics` on loopback.
Measured, as wall time on the shared machine (median and p99 of repeated calls):
- local API `peers` (a page of 50 plus the summary of all), `routes` (a page of 50), `status`, `diagnose`;
- the CLI in-process (`cni_plugin.cli.run`, without the interpreter start-up that P1 measures): `wgcni peers`,
  `wgcni routes`, `wgcni check`;
- one scrape of `/metrics` with the per-peer series (15 000 of them) and without (`?per_peer=0`).
Quick mode: 200 nodes x 4 pods, 3 calls each.

Run: `python -m bench.p8_observe` (prints JSON) or through `python -m bench.run --only P8`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import row
from bench.p3_scale import synthetic_cluster
from cni_plugin.cli import run as wgcni
from cni_plugin.records import RecordStore
from node_hook.apply.fakes import FakeFirewall, FakePodRoutes, FakeRouting, FakeSysctls, FakeWireGuard
from node_hook.config import Settings
from node_hook.detect import Environment
from node_hook.engine import Appliers
from node_hook.keys import load_or_create
from node_hook.local_api import LocalApiServer, request
from node_hook.metrics import HookMetrics, MetricsServer
from node_hook.node import build_node
from wgcni_lab.harness.peer_source import ManualPeerSource

TITLE = "Debug CLI, local API and metrics at 5 000 peers (wall ms)"
NODES, PODS, REPEATS = 5000, 30, 15
QUICK_NODES, QUICK_PODS, QUICK_REPEATS = 200, 4, 3
TARGETS_MS = {  # p50 targets: an operator command answers well within a second, a scrape well within its timeout
    "api peers page": 250, "api routes page": 250, "api status": 50, "api diagnose": 2000, "cli peers": 500,
    "cli routes": 500, "cli check": 2000, "scrape /metrics": 1000, "scrape /metrics?per_peer=0": 250,
}


def _timed(samples: int, call: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _cli(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = wgcni(list(args))
    if code != 0:
        raise RuntimeError(f"wgcni {' '.join(args)} exited {code}")


def measure(nodes: int, pods: int, repeats: int) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix="wgcni-p8-"))
    settings = Settings(node_name="bench", state_dir=root / "state", socket=root / "hook.sock",
                        record_rescan_interval=10, resync_interval=600)
    conf_dir = root / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-azure.conflist").write_text(json.dumps({"cniVersion": "0.3.0", "name": "azure", "plugins": [
        {"type": "azure-vnet"}, {"type": "wgcni"}]}))
    # subnets: the node and pod ranges of synthetic_cluster, the cluster of the strict table (as on AKS)
    environment = Environment("172.31.0.1", frozenset({"172.31.0.1"}), "p8-no-such-link", 1500, False, "bench",
                              1440, "bench", frozenset({"172.16.0.0/12", "10.0.0.0/8"}))
    metrics = HookMetrics()
    wireguard = FakeWireGuard()
    source = ManualPeerSource()
    appliers = Appliers(wireguard, FakeRouting(settings.route_table), FakeFirewall(),
                        FakeSysctls({"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/wgcni0/rp_filter": "1"},
                                    settings.sysctl_originals_file))
    node = build_node(settings, load_or_create(settings.key_file), environment, source, appliers=appliers,
                      records=RecordStore(str(settings.state_dir)), pod_routes=FakePodRoutes(), monitor_netlink=False,
                      observer=metrics, cni_conf_dir=conf_dir)
    metrics.attach(node.view)
    api = LocalApiServer(settings.socket, node)
    http = MetricsServer("127.0.0.1:0", metrics)
    node.start()
    try:
        _, remote = synthetic_cluster(nodes + 1, pods, "scattered")  # P3's cluster: `nodes` others, node 0 is absent
        source.sync(*remote.values())
        api.start()
        http.start()
        deadline = time.monotonic() + 600
        # every peer on the device and the pass that put them there finished (the model fills before the pass)
        while not (wireguard.device is not None and len(wireguard.device.peers) == nodes
                   and node.view.converged):
            if time.monotonic() > deadline:
                raise RuntimeError("the hook did not program the cluster within 600 s")
            time.sleep(0.05)
        socket = str(settings.socket)
        url = "http://{}:{}/metrics".format(*http.address)
        results = {
            "api peers page": _timed(repeats, lambda: request(socket, {"op": "peers", "limit": 50})),
            "api routes page": _timed(repeats, lambda: request(socket, {"op": "routes", "limit": 50})),
            "api status": _timed(repeats, lambda: request(socket, {"op": "status"})),
            "api diagnose": _timed(repeats, lambda: request(socket, {"op": "diagnose"})),
            "cli peers": _timed(repeats, lambda: _cli("peers", "--socket", socket)),
            "cli routes": _timed(repeats, lambda: _cli("routes", "--socket", socket)),
            "cli check": _timed(repeats, lambda: _cli("check", "--socket", socket)),
            "scrape /metrics": _timed(repeats, lambda: urllib.request.urlopen(url, timeout=30).read()),
            "scrape /metrics?per_peer=0": _timed(
                repeats, lambda: urllib.request.urlopen(url + "?per_peer=0", timeout=30).read()),
        }
        return results
    finally:
        http.stop()
        api.stop()
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def run(quick: bool) -> list[dict]:
    nodes, pods, repeats = (QUICK_NODES, QUICK_PODS, QUICK_REPEATS) if quick else (NODES, PODS, REPEATS)
    results = measure(nodes, pods, repeats)
    note = f"{nodes} peers x {pods} pod IPs"
    return [row(case, samples, "ms", target_p50=None if quick else TARGETS_MS[case], note=note)
            for case, samples in results.items()]


def main() -> None:
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2))


if __name__ == "__main__":
    main()
