"""P3: the hook's model + planner + reconciler (appliers on fakes) at 50 / 500 / 5 000 nodes x 250 pod IPs.

A synthetic cluster (no namespaces, no API server) drives the real `NodeModel`, planner and `Reconciler` over the
fakes of every applier, exactly as the daemon does. The WireGuard device and routing table fakes - the kernel's
memory in production - run in a child process (`bench/kernel_process.py`, reached through a pipe in bounded chunks,
as netlink batches and dumps are), so the measured process holds only the hook. Each size runs in its own
subprocess so that its peak RSS is its own (`VmHWM`: `ru_maxrss` would carry over the peak of the process that
forked it, which Linux folds in at exec). Measured per size:
- full plan from scratch: the model takes the complete node list and the local pods, then the first reconcile pass
  reads the (empty) fakes, plans every peer and route and applies them — what a hook does when it starts;
- one pod event (the median of many): a local pod added / deleted; a remote node gaining / losing one pod IP, both as
  a single-node update and as the sync layer delivers it (the complete node list with one node changed); an IP
  moving from one remote node to another;
- one node joining (250 pod IPs) / leaving;
- a full resync pass with nothing changed (every aspect read back from the fakes and diffed as it streams in: the
  periodic safety net; Calico runs its equivalent every 90 s), with issue 17's targets at 5 000 nodes: <= 2 s CPU
  and a peak RSS, read-back included, <= 300 MB;
- peak RSS of the process, beside the RSS of the same interpreter with the modules imported (the baseline).
Times are CPU seconds of the (single-threaded) hook process, including the encoding of what it sends to the kernel
process (as a real applier encodes netlink messages) - the machine is shared with other builds, so wall time would
measure their load too; wall time is in the notes. The kernel process's state is checked against the model by
digest after the full plan, after the events and after the resync; each remote pod event and pod IP move is checked
on the device and table as it happens (`covers`: the IP on its node's peer and routed into the tunnel; once deleted
or moved away, not on the old node's peer). A wrong result fails the benchmark.

Pod IP layouts (docs/shared azure-cni.md): `scattered` — node-subnet mode at its worst: every pod IP a /32 that
aggregates with nothing (node i's j-th pod is base + j*N + i), 1.25 M AllowedIPs and routes at 5 000 nodes;
`batch16` — dynamic pod subnet: each node gets its IPs in batches of 16 contiguous addresses, batches of different
nodes interleaved; `overlay` — Azure CNI Overlay: node i's pods from its own /24 of the pod CIDR (.4 upwards).

Run: `python -m bench.p3_scale` (all sizes, prints JSON) or through `python -m bench.run --only P3`.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench import row
from bench.kernel_process import KernelProcess, peak_rss_mb, state_digest
from node_hook.apply.fakes import FakeFirewall, FakeSysctls
from node_hook.contracts import DeviceSpec, FirewallSpec
from node_hook.keys import public_key_of
from node_hook.model import NodeModel, RemoteNode, RouteKind
from node_hook.planner import desired_rules
from node_hook.reconciler import Reconciler, Targets

TITLE = "hook model + planner + reconciler on fakes at scale (synthetic cluster)"
SIZES = (50, 500, 5000)
PODS_PER_NODE = 250
EVENT_REPEATS = 25
QUICK_SIZES = (12, 30)
QUICK_PODS = 10
QUICK_REPEATS = 3
TARGET_FULL_S = 10.0
TARGET_EVENT_MS = 5.0
TARGET_RSS_MB = 300.0  # issue 6: the full plan and events; issue 17: also with a full resync's read-back
TARGET_RESYNC_S = 2.0  # issue 17, at 5 000 x 250
BASELINE_5000 = {"resync_s": 3.6, "rss_resync_mb": 424.2}  # before issue 17 (make bench, 5 000 x 250 scattered)

POD_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
OVERLAY_BASE = int(ipaddress.IPv4Address("10.64.0.0"))  # the overlay pod CIDR: a /24 per node (5 000 fit in a /11)
NODE_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
SPARE_BASE = int(ipaddress.IPv4Address("100.64.0.0"))  # addresses for pods created during the run
PORT = 51820
FWMARK = 0x100000
TABLE = 51820
INTERFACE = "wgcni0"


def public_key(index: int) -> str:
    return base64.b64encode(hashlib.sha256(f"node-{index}".encode()).digest()).decode()


def pod_address(node: int, pod: int, nodes: int, layout: str) -> int:
    if layout == "scattered":
        return POD_BASE + pod * nodes + node
    if layout == "batch16":
        batch, offset = divmod(pod, 16)
        return POD_BASE + (batch * nodes + node) * 16 + offset
    if layout == "overlay":
        if pod >= 250:
            raise ValueError("a /24 holds 250 pods from .4")
        return OVERLAY_BASE + node * 256 + 4 + pod
    raise ValueError(f"unknown layout {layout!r}")


def remote_node(index: int, nodes: int, pods: int, layout: str) -> RemoteNode:
    node_ip = str(ipaddress.IPv4Address(NODE_BASE + index))
    return RemoteNode(
        name=f"node-{index:05d}",
        public_key=public_key(index),
        endpoint_ip=node_ip,
        endpoint_port=PORT,
        node_ips=frozenset({node_ip}),
        pod_ips=frozenset(str(ipaddress.IPv4Address(pod_address(index, pod, nodes, layout))) for pod in range(pods)),
        pod_ips_changed_at=1.0,
    )


def synthetic_cluster(nodes: int, pods: int, layout: str) -> tuple[dict[str, list[str]], dict[str, RemoteNode]]:
    """(local pod records of node 0, the other nodes as the sync layer hands them to the hook)."""
    local = {f"k8s-pod-network/pod{pod:03d}@eth0": [str(ipaddress.IPv4Address(pod_address(0, pod, nodes, layout)))]
             for pod in range(pods)}
    remote = {node.name: node for node in (remote_node(index, nodes, pods, layout) for index in range(1, nodes))}
    return local, remote


class Hook:
    """The daemon's worker loop without threads: a model, a reconciler and the kernel process it programs."""

    def __init__(self, state_dir: Path, kernel: KernelProcess) -> None:
        self.model = NodeModel("node-00000", local_node_ips=[str(ipaddress.IPv4Address(NODE_BASE))])
        self.kernel = kernel
        sysctls = {"net/ipv4/conf/all/src_valid_mark": "1", f"net/ipv4/conf/{INTERFACE}/rp_filter": "2"}
        private = hashlib.sha256(b"node-0 private").digest()
        targets = Targets(
            DeviceSpec(INTERFACE, private, public_key_of(private), PORT, FWMARK, 1340),
            desired_rules(99, FWMARK, TABLE),
            FirewallSpec("wgcni", FWMARK, INTERFACE, ("azv",), PORT),
            sysctls,
        )
        self.reconciler = Reconciler(self.model, targets, kernel.wireguard, kernel.routing, FakeFirewall(),
                                     FakeSysctls({name: "0" for name in sysctls}, state_dir / "sysctls.json"))

    def reconcile(self) -> dict[str, int]:
        result = self.reconciler.reconcile()
        if result.error is not None:
            raise RuntimeError(f"reconcile pass failed: {result.error}")
        return result.applied

    def verify(self) -> None:
        """The kernel process holds exactly what the model wants (compared by digest, nothing copied)."""
        model = self.model
        want = state_digest({key: peer.allowed_ips for key, peer in model.peers.items()},
                            ((prefix, kind._value_) for prefix, kind in model.routes.items()))
        have = self.kernel.digest()
        assert have == want, f"the device and table differ from the model ({have} vs {want}: peers, -, routes, -)"

    def covers(self, node: RemoteNode, address: str) -> bool:
        """Whether `node`'s peer on the device allows `address` and the table routes it into the tunnel."""
        return self.kernel.covers(node.public_key, ipaddress.ip_network(address))


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of `action()`."""
    cpu, wall = time.process_time(), time.perf_counter()
    action()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure_size(nodes: int, pods: int, layout: str, repeats: int) -> dict:
    """Everything for one cluster size, in this process (run it in a fresh one for a meaningful peak RSS)."""
    gc.collect()
    out: dict = {"nodes": nodes, "pods_per_node": pods, "layout": layout, "repeats": repeats,
                 "rss_imports_mb": _current_rss_mb()}
    kernel = KernelProcess(INTERFACE, TABLE)  # forked first: it holds none of the hook's state
    try:
        _measure_with(kernel, nodes, pods, layout, repeats, out)
        out["kernel_rss_peak_mb"], out["kernel_cpu_s"] = kernel.usage()
    finally:
        kernel.close()
    return out


def _measure_with(kernel: KernelProcess, nodes: int, pods: int, layout: str, repeats: int, out: dict) -> None:
    local, remote = synthetic_cluster(nodes, pods, layout)
    out["rss_inputs_mb"] = _current_rss_mb()
    with tempfile.TemporaryDirectory(prefix="wgcni-p3-") as state_dir:
        hook = Hook(Path(state_dir), kernel)

        def build() -> None:
            hook.model.replace_local_pods(local)
            hook.model.replace_remote_nodes(remote)

        out["full_model_cpu_s"], out["full_model_wall_s"] = _timed(build)
        applied: dict[str, int] = {}
        out["full_pass_cpu_s"], out["full_pass_wall_s"] = _timed(lambda: applied.update(hook.reconcile()))
        hook.verify()
        out["full_applied"] = applied
        out["allowed_ips"] = sum(len(peer.allowed_ips) for peer in hook.model.peers.values())
        out["routes"] = len(hook.model.routes)
        out["rss_after_full_mb"] = _current_rss_mb()
        assert len(hook.model.peers) == nodes - 1, "every remote node is a peer"

        events: dict[str, list[tuple[float, float]]] = {}

        def event(name: str, action: Callable[..., object], *args: object) -> None:
            events.setdefault(name, []).append(_timed(lambda: (action(*args), hook.reconcile())))

        def set_remote_nodes(*changed: RemoteNode) -> None:
            for changed_node in changed:
                hook.model.set_remote_node(changed_node)

        names = sorted(remote)
        for attempt in range(repeats):
            spare = str(ipaddress.IPv4Address(SPARE_BASE + attempt))
            event("local pod added", hook.model.set_local_pod, f"net/new{attempt}@eth0", [spare])
            assert hook.model.routes[ipaddress.ip_network(spare)] is RouteKind.THROW
            event("local pod deleted", hook.model.remove_local_pod, f"net/new{attempt}@eth0")

            node = remote[names[attempt * 7919 % len(names)]]
            grown = replace(node, pod_ips=node.pod_ips | {spare}, pod_ips_changed_at=2.0 + attempt)
            event("remote pod added", hook.model.set_remote_node, grown)
            assert hook.covers(grown, spare), "the new remote pod IP is on its node's peer"
            event("remote pod deleted", hook.model.set_remote_node, node)
            assert not hook.covers(node, spare)

            delivered = dict(remote)
            delivered[node.name] = grown
            event("remote pod added (whole node list delivered)", hook.model.replace_remote_nodes, delivered)
            assert hook.covers(grown, spare)
            event("remote pod deleted (whole node list delivered)", hook.model.replace_remote_nodes, remote)

            target = remote[names[(attempt * 7919 + 1) % len(names)]]
            moving_key = sorted(node.pod_ips)[0]
            moving = str(moving_key.network_address)
            source_without = replace(node, pod_ips=node.pod_ips - {moving_key}, pod_ips_changed_at=3.0 + attempt)
            target_with = replace(target, pod_ips=target.pod_ips | {moving_key}, pod_ips_changed_at=3.0 + attempt)
            event("pod IP moved between remote nodes", set_remote_nodes, source_without, target_with)
            assert hook.covers(target, moving) and not hook.covers(node, moving), "the moved IP follows its node"
            hook.model.set_remote_node(node)
            hook.model.set_remote_node(target)
            hook.reconcile()

            joining = remote_node(nodes + attempt, nodes + repeats, pods, layout)
            joining = replace(joining, pod_ips=frozenset(
                str(ipaddress.IPv4Address(SPARE_BASE + 65536 + attempt * pods + pod)) for pod in range(pods)))
            event("node joined", hook.model.set_remote_node, joining)
            assert hook.model.node_of_key(joining.public_key) == joining.name
            event("node left", hook.model.remove_remote_node, joining.name)
            assert joining.public_key not in hook.model.peers
        hook.verify()
        out["rss_peak_events_mb"] = peak_rss_mb()  # full plan and events; the resync's read-back comes next

        resync: list[tuple[float, float]] = []
        for _ in range(1 if nodes * pods > 200_000 else repeats):
            hook.reconciler.mark_out_of_sync()
            cpu_wall = _timed(lambda: applied.update({"resync": sum(hook.reconcile().values())}))
            assert applied["resync"] == 0, "a resync with nothing changed applies nothing"
            resync.append(cpu_wall)
        hook.verify()
    out["events_ms"] = {name: [round(cpu * 1000, 4) for cpu, _ in samples] for name, samples in events.items()}
    out["events_wall_ms"] = {name: [round(wall * 1000, 4) for _, wall in samples] for name, samples in events.items()}
    out["resync_cpu_s"] = [cpu for cpu, _ in resync]
    out["resync_wall_s"] = [wall for _, wall in resync]
    out["rss_peak_mb"] = peak_rss_mb()


def measure_in_subprocess(nodes: int, pods: int, layout: str, repeats: int) -> dict:
    command = [sys.executable, "-m", "bench.p3_scale", "--worker", "--nodes", str(nodes), "--pods", str(pods),
               "--layout", layout, "--repeats", str(repeats)]
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"P3 worker for {nodes} nodes failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


EVENT_ROWS = {  # table row -> the measured events it pools (every event's own samples are in the JSON)
    "one local pod event (add, delete)": ("local pod added", "local pod deleted"),
    "one remote pod event (add, delete)": ("remote pod added", "remote pod deleted"),
    "one remote pod event, whole node list delivered": ("remote pod added (whole node list delivered)",
                                                        "remote pod deleted (whole node list delivered)"),
    "pod IP moved between remote nodes": ("pod IP moved between remote nodes",),
    "node joined": ("node joined",),
    "node left": ("node left",),
}


def rows_for(sizes: list[dict], quick: bool, brief: bool = False) -> list[dict]:
    """Table rows; `brief` keeps the full plan, one remote pod event and RSS only."""
    rows = []
    smallest = sizes[0]
    for size in sizes:
        label = f"{size['nodes']} nodes x {size['pods_per_node']} {size['layout']}"
        full = size["full_model_cpu_s"] + size["full_pass_cpu_s"]
        wall = size["full_model_wall_s"] + size["full_pass_wall_s"]
        rows.append(row(f"{label}: full plan from scratch", [full], unit="s",
                        target_p50=None if quick else TARGET_FULL_S,
                        note=f"model {size['full_model_cpu_s']:.2f} + first pass {size['full_pass_cpu_s']:.2f} s cpu; "
                             f"{size['allowed_ips']} AllowedIPs, {size['routes']} routes; wall {wall:.2f} s"))
        for title, names in EVENT_ROWS.items():
            if brief and title != "one remote pod event (add, delete)":
                continue
            samples = [sample for name in names for sample in size["events_ms"][name]]
            walls = [sample for name in names for sample in size["events_wall_ms"][name]]
            base = [sample for name in names for sample in smallest["events_ms"][name]]
            ratio = statistics.median(samples) / max(statistics.median(base), 1e-9)
            rows.append(row(f"{label}: {title}", samples, unit="ms",
                            target_p50=TARGET_EVENT_MS if "pod" in title and not quick else None,
                            note=f"x{ratio:.2f} vs {smallest['nodes']} nodes; "
                                 f"wall p50 {statistics.median(walls):.2f} ms"))
        at_limit = size["nodes"] >= 5000 and not quick
        if not brief:
            rows.append(row(f"{label}: full resync, nothing changed", size["resync_cpu_s"], unit="s",
                            target_p50=TARGET_RESYNC_S if at_limit else None,
                            note=f"wall p50 {statistics.median(size['resync_wall_s']):.2f} s"
                                 + (f"; baseline {BASELINE_5000['resync_s']:g} s" if at_limit else "")))
        rows.append(row(f"{label}: peak RSS of the hook, full plan and events", [size["rss_peak_events_mb"]],
                        unit="MB", target_p50=None if quick else TARGET_RSS_MB,
                        note=f"baseline: interpreter + modules {size['rss_imports_mb']:.0f} MB; the RemoteNode inputs "
                             f"{size['rss_inputs_mb'] - size['rss_imports_mb']:.0f} MB; after the full plan "
                             f"{size['rss_after_full_mb']:.0f} MB; the kernel process (device + table fakes) "
                             f"{size['kernel_rss_peak_mb']:.0f} MB, {size['kernel_cpu_s']:.1f} s CPU"))
        if not brief:
            rows.append(row(f"{label}: peak RSS of the hook, with the resync's read-back", [size["rss_peak_mb"]],
                            unit="MB", target_p50=TARGET_RSS_MB if at_limit else None,
                            note="the device and the table diffed as they stream in"
                                 + (f"; baseline {BASELINE_5000['rss_resync_mb']:g} MB" if at_limit else "")))
    return rows


def run(quick: bool) -> list[dict]:
    if quick:
        sizes = [measure_in_subprocess(nodes, QUICK_PODS, "scattered", QUICK_REPEATS) for nodes in QUICK_SIZES]
        sizes += [measure_in_subprocess(QUICK_SIZES[-1], QUICK_PODS, layout, QUICK_REPEATS)
                  for layout in ("batch16", "overlay")]
    else:
        sizes = [measure_in_subprocess(nodes, PODS_PER_NODE, "scattered", EVENT_REPEATS) for nodes in SIZES]
        sizes += [measure_in_subprocess(SIZES[-1], PODS_PER_NODE, layout, EVENT_REPEATS)
                  for layout in ("batch16", "overlay")]
    rows = rows_for([size for size in sizes if size["layout"] == "scattered"], quick)
    for layout in ("batch16", "overlay"):
        rows += rows_for([size for size in sizes if size["layout"] == layout], quick, brief=True)
    rows[0]["raw"] = sizes  # every size's measurements and every event's samples, for the JSON
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.p3_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="measure one size in this process, print JSON")
    parser.add_argument("--nodes", type=int, default=SIZES[0])
    parser.add_argument("--pods", type=int, default=PODS_PER_NODE)
    parser.add_argument("--layout", choices=("scattered", "batch16", "overlay"), default="scattered")
    parser.add_argument("--repeats", type=int, default=EVENT_REPEATS)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(measure_size(options.nodes, options.pods, options.layout, options.repeats)))
    else:
        print(json.dumps(run(options.quick), indent=2))


if __name__ == "__main__":
    main()
