"""P2: peer convergence in the local lab — how long after a pod change every other node's dataplane follows.

Brings up a lab (`wgcni-lab up`, in a lab dir of its own) of 3 nodes and one of 10, then measures, `ROUNDS` times
each:
- add:  RunPodSandbox asked on node A -> on every other node the pod's IP is in A's peer's AllowedIPs (wireguard-go)
        and routed into the tunnel (table 51820);
- del:  StopPodSandbox asked on A -> the IP is in no peer and no tunnel route on any other node;
- move: the IP of a pod on A goes to a new pod on B, as when Azure moves a secondary IP between NICs: the fabric
        delivers it to B (`wgcni_lab.fabric.move_ip`) and B's IPAM pool is set to that one IP (a CNS-style conflist
        rewrite that B's `install-cni --watch` re-chains, before the clock starts), the pod on A is deleted, then
        RunPodSandbox is asked on B -> on every node but B the IP is on B's peer only. Afterwards the IP goes back
        to A.
The clock starts when kubelet would ask the runtime, so each time includes the runtime's own work and the CNI chain
(the runtime call's duration is in the rows' note). A second clock starts at the change's first trace on the node:
for an ADD (and the move's ADD on B) azure-vnet's host route for the pod's IP, which the chain makes before wgcni
runs (the node's main table dumped every poll interval while the call runs); for a DEL the removal of wgcni's
record (the record directory's mtime, the kernel's coarse file clock: a tick, 1-4 ms), which comes before
azure-vnet's DEL. No traffic of the pod can depend on the change before that - the pod has its network only after
the chain returns - so it measures the window issue 17 is about: a new pod unreachable (strict) or reached in
plaintext (default), a deleted one's IP still routed to its old node.
Each case is a lone change: it starts after a quiet write window of the node it is on (`QUIET`, 1 s), as issue 17
asks (the first change after a quiet period is written at once; bursts are P5's, paced to 2 writes/s per node, and
a change right after two writes of its node waits up to 0.5 s for the window).
The other nodes are watched from the runtime call's start, while it runs (`NodeProbe`): wireguard-go's UAPI socket
is read every `POLL_INTERVAL` seconds and the tunnel table is dumped whenever the node's kernel announces a route
change (a netlink subscription in its namespace) - no process is started per look, so the figure's resolution is a
few ms, not the ~10 ms of an `nsenter wg show` per node and poll. Once converged, every node's state is checked
again with the independent tools (`nsenter` + `wg show dump` + `ip route show table 51820`); a disagreement fails
the benchmark.

Target (issue 17): p99 <= 250 ms for each scenario, at 3 and at 10 nodes. Run through `python -m bench.run --only
P2` (as root, after `make build`), or `python -m bench.p2_convergence` for the rows as JSON.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE

from bench import row
from node_hook.cluster import SyncSettings
from wgcni_lab import fabric, lab
from wgcni_lab.containerd import write_conflist

TITLE = "convergence in the lab (3 and 10 nodes, userspace WireGuard, sync through the test API server): pod " \
        "change on one node -> AllowedIPs + tunnel route on every other node"
ROUNDS, QUICK_ROUNDS = 12, 1
SIZES, QUICK_SIZES = (3, 10), (3,)
TARGET_P99_MS = 250.0
BASELINE_P99_MS = {"add": 465.0, "del": 504.0, "move": 171.0}  # issue 17's starting point (3 nodes, make bench)
TIMEOUT = 30.0
QUIET = SyncSettings().write_burst / SyncSettings().max_writes_per_second  # seconds: the hooks' write window
POLL_INTERVAL = 0.004  # seconds between two reads of every pending node's wireguard-go
ROUTE_TABLE = lab.HOOK_DEFAULTS.route_table
MAIN_TABLE = 254
View = tuple[dict[str, set[str]], set[str]]  # (endpoint address -> addresses its peer allows, tunnel-routed addresses)


def dataplane(node: lab.NodeState) -> View:
    """The node's view read with the independent tools, one `nsenter` (the cross-check after convergence)."""
    script = f"wg show {lab.WG_INTERFACE} dump; echo ---; ip -j route show table {ROUTE_TABLE}"
    output = lab.in_node(node, ["sh", "-c", script]).stdout
    dump, routes = output.split("---\n", 1)
    peers = {}
    for line in dump.splitlines()[1:]:
        _key, _psk, endpoint, allowed, *_ = line.split("\t")
        peers[endpoint.rsplit(":", 1)[0]] = lab.covered(allowed.split(",")) if allowed != "(none)" else set()
    tunnel = {address for route in json.loads(routes or "[]")
              if route.get("dev") == lab.WG_INTERFACE and route.get("type", "unicast") == "unicast"
              for address in lab.covered([route["dst"] if "/" in route["dst"] else route["dst"] + "/32"])}
    return peers, tunnel


class NodeProbe:
    """One node's view without starting a process: wireguard-go's UAPI socket through the node's mount namespace,
    and the tunnel table through a netlink socket in its network namespace, dumped again only after the kernel
    announced a route change there (a second socket subscribed to IPv4 route events)."""

    def __init__(self, node: lab.NodeState) -> None:
        self.name = node.name
        self.uapi = f"/proc/{node.holder_pid}/root/run/wireguard/{lab.WG_INTERFACE}.sock"
        self.routes = IPRoute(netns=node.netns)
        self.events = IPRoute(netns=node.netns)
        self.events.bind(groups=RTMGRP_IPV4_ROUTE)
        self.tunnel: set[str] = set()
        self.stale = True  # the tunnel set must be dumped before it is used
        self.host_routes_added: dict[str, float] = {}  # IP -> when a main-table /32 for it was first seen
        self._known_host_routes: set[str] = set()

    def close(self) -> None:
        self.routes.close()
        self.events.close()

    def fileno(self) -> int:
        return self.events.fileno()

    def route_changed(self) -> None:
        """The events socket is readable: drop what it announced (the next view dumps the table)."""
        self.events.get()
        self.stale = True

    def _host_routes(self) -> set[str]:
        return {route.get_attr("RTA_DST") for route in self.routes.get_routes(table=MAIN_TABLE)
                if route["dst_len"] == 32 and (route.get_attr("RTA_TABLE") or route["table"]) == MAIN_TABLE}

    def watch_host_routes(self) -> None:
        """Start noting new host routes of the main table (azure-vnet's per pod): those there now are not new."""
        self.host_routes_added = {}
        self._known_host_routes = self._host_routes()

    def note_host_routes(self) -> None:
        """One look at the main table: a dump of a few routes per pod, well under a poll interval."""
        now = time.monotonic()
        for ip in self._host_routes() - self._known_host_routes:
            self.host_routes_added.setdefault(ip, now)

    def view(self) -> View:
        if self.stale:
            self.stale = False
            index = self.routes.link_lookup(ifname=lab.WG_INTERFACE)
            self.tunnel = {route.get_attr("RTA_DST") for route in self.routes.get_routes(table=ROUTE_TABLE)
                           if route["dst_len"] == 32 and route.get_attr("RTA_OIF") in index
                           and route["type"] == 1}  # RTN_UNICAST; the lab's pods are single /32s
        return self._peers(), self.tunnel

    def _peers(self) -> dict[str, set[str]]:
        """endpoint address -> the addresses its AllowedIPs cover, from a UAPI `get` (the private key in the
        answer is skipped, never kept)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(self.uapi)
            connection.sendall(b"get=1\n\n")
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                answer += chunk
        peers: dict[str, list[str]] = {}
        allowed: list[str] = []
        for line in answer.decode().splitlines():
            key, _, value = line.partition("=")
            if key == "public_key":
                allowed = []
            elif key == "endpoint":
                peers[value.rsplit(":", 1)[0]] = allowed  # the same list, filled by the lines that follow
            elif key == "allowed_ip":
                allowed.append(value)
        return {endpoint: lab.covered(prefixes) for endpoint, prefixes in peers.items()}


def owned_by(ip: str, owner_ip: str | None) -> Callable[[View], bool]:
    def check(view: View) -> bool:
        peers, tunnel = view
        holders = {endpoint for endpoint, covered in peers.items() if ip in covered}
        if owner_ip is None:
            return not holders and ip not in tunnel
        return holders == {owner_ip} and ip in tunnel
    return check


def records_changed_at(node: lab.NodeState) -> float:
    """The monotonic time of the last change of the node's pod record directory (its mtime, a wall-clock time)."""
    directory = node.root / str(lab.HOOK_DEFAULTS.records_dir).lstrip("/") / lab.NETWORK
    return os.stat(directory).st_mtime_ns / 1e9 - (time.time() - time.monotonic())


def time_until(probes: list[NodeProbe], nodes: list[lab.NodeState], done: Callable[[View], bool], started: float,
               action: Callable[[], Any], origin: NodeProbe | None = None) -> tuple[float, float, Any, float]:
    """Run `action` (the runtime call) on a thread while watching `probes`, and the host routes of `origin` (the node
    the action is on: `NodeProbe.note_host_routes`); returns (seconds from `started` until `done` holds on every
    probe's node, seconds the action took, what it returned, the monotonic time it converged). Each node's time is
    its first satisfied look; afterwards every node of `nodes` is checked with `dataplane` too."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # noqa: BLE001 - re-raised on the measuring thread
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    caller = threading.Thread(target=call, name="p2-runtime-call")
    caller.start()
    pending = {probe.name: probe for probe in probes}
    converged: dict[str, float] = {}
    try:
        while pending:
            readable, _, _ = select.select(list(pending.values()), [], [], POLL_INTERVAL)
            for probe in readable:
                probe.route_changed()
            if origin is not None:
                origin.note_host_routes()
            for name, probe in list(pending.items()):
                if done(probe.view()):
                    converged[name] = time.monotonic() - started
                    del pending[name]
            if time.monotonic() - started > TIMEOUT:
                raise lab.LabError(f"no convergence on {', '.join(pending)} within {TIMEOUT}s")
    finally:
        caller.join()
    if "error" in outcome:
        raise outcome["error"]
    for node in nodes:
        if not done(dataplane(node)):
            raise lab.LabError(f"{node.name}: the probe saw convergence, `wg show`/`ip route` do not")
    return max(converged.values()), outcome["seconds"], outcome["value"], started + max(converged.values())


def set_pool(state: lab.LabState, node: lab.NodeState, pool: list[str]) -> None:
    """Azure CNS rewrites the node's conflist (here with a new IPAM pool, and without wgcni, as CNS writes it); the
    node's `install-cni --watch` chains wgcni in again; wait until containerd has loaded exactly that."""
    conflist = lab.base_conflist(pool)
    ranges = conflist["plugins"][0]["ipam"]["ranges"]
    write_conflist(node.root / "etc/cni/net.d", conflist)
    with lab.cri_client(state, node) as cri:
        deadline = time.monotonic() + TIMEOUT
        while True:
            loaded = cri.status(verbose=True)["info"].get("cniconfig", {})
            sources = [json.loads(plugin["Source"]) for network in loaded.get("Networks") or []
                       if (network.get("Config") or {}).get("Name") == lab.NETWORK
                       for plugin in network["Config"].get("Plugins") or [] if plugin.get("Source")]
            if [source.get("type") for source in sources] == ["azure-vnet", "wgcni", "portmap"] and \
                    sources[0].get("ipam", {}).get("ranges") == ranges:
                return
            if time.monotonic() > deadline:
                raise lab.LabError(f"{node.name}: containerd did not load the rewritten conflist with wgcni")
            time.sleep(0.02)


def _delete(state: lab.LabState, node: lab.NodeState, pod: dict[str, Any]) -> None:
    """Delete the pod as kubelet does: StopPodSandbox (whose CNI DEL drops the IP), then RemovePodSandbox."""
    with lab.cri_client(state, node) as cri:
        cri.stop_pod_sandbox(pod["id"])
        cri.remove_pod_sandbox(pod["id"])


def samples(nodes: int, rounds: int
            ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]], str]:
    """(convergence times from the runtime call, durations of that call, convergence times from the change's first
    trace on the node), in seconds per scenario, `rounds` each, in a lab of `nodes` nodes of its own (removed
    afterwards), and that lab's id (the suffix of its namespaces' names)."""
    parent = Path(tempfile.mkdtemp(prefix="wgl-bench-"))
    lab_dir = parent / "lab"
    command = [sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(lab_dir)]
    measured: dict[str, list[float]] = {"add": [], "del": [], "move": []}
    runtime: dict[str, list[float]] = {"add": [], "del": [], "move": []}
    from_trace: dict[str, list[float]] = {"add": [], "del": [], "move": []}
    probes: dict[str, NodeProbe] = {}
    try:
        up = subprocess.run([*command, "up", "--nodes", str(nodes), "--pods-per-node", "1"], capture_output=True,
                            text=True, timeout=600)
        if up.returncode != 0:
            raise lab.LabError(f"wgcni-lab up failed: {up.stderr.strip()}")
        state = lab.require_state(lab_dir)
        a, b = state.nodes[:2]
        probes = {node.name: NodeProbe(node) for node in state.nodes}
        but_a = [node for node in state.nodes if node is not a]
        but_b = [node for node in state.nodes if node is not b]

        def watch(case: str, on: lab.NodeState, among: list[lab.NodeState], done: Callable[[View], bool],
                  action: Callable[[], Any]) -> Any:
            """Measure one case: `action` on node `on`, convergence on `among`; returns what `action` returned."""
            time.sleep(QUIET)  # a lone change: the node's earlier writes are out of the pacer's window
            origin = probes[on.name]
            origin.watch_host_routes()
            seconds, called, value, converged_at = time_until([probes[node.name] for node in among], among, done,
                                                              time.monotonic(), action, origin)
            measured[case].append(seconds)
            runtime[case].append(called)
            if case == "del":
                first_trace = records_changed_at(on)
            else:
                if value["ip"] not in origin.host_routes_added:
                    raise lab.LabError(f"{on.name}: no host route for {value['ip']} was seen while it converged")
                first_trace = origin.host_routes_added[value["ip"]]
            from_trace[case].append(converged_at - first_trace)
            return value

        for _ in range(rounds):
            pending_ip: dict[str, str] = {}

            def add_on_a(pending_ip: dict[str, str] = pending_ip) -> dict[str, Any]:
                pod = lab.add_pod(state, a.name)
                pending_ip["ip"] = pod["ip"]
                return pod

            # the IP is the next one of A's pool, known only once the runtime answers: watch for any new IP on A's
            # peer, then check it is that one
            known = _peer_ips(probes[b.name], a.ip)
            pod = watch("add", a, but_a, _new_ip_owned_by(a.ip, known, pending_ip), add_on_a)
            watch("del", a, but_a, owned_by(pod["ip"], None), lambda pod=pod: _delete(state, a, pod))

            pod = lab.add_pod(state, a.name)
            time_until([probes[node.name] for node in but_a], but_a, owned_by(pod["ip"], a.ip), time.monotonic(),
                       lambda: None)
            fabric.move_ip(state, pod["ip"], b.name)
            set_pool(state, b, [pod["ip"]])
            _delete(state, a, pod)
            moved = watch("move", b, but_b, owned_by(pod["ip"], b.ip), lambda: lab.add_pod(state, b.name))
            if moved["ip"] != pod["ip"]:
                raise lab.LabError(f"the move gave {moved['ip']}, not {pod['ip']}")
            _delete(state, b, moved)
            fabric.move_ip(state, pod["ip"], a.name)
            set_pool(state, b, b.pod_ips)
    finally:
        for probe in probes.values():
            probe.close()
        subprocess.run([*command, "down"], capture_output=True, timeout=300)
        shutil.rmtree(parent, ignore_errors=True)
    return measured, runtime, from_trace, state.id


def _peer_ips(probe: NodeProbe, owner_ip: str) -> set[str]:
    peers, _ = probe.view()
    return set(peers.get(owner_ip, set()))


def _new_ip_owned_by(owner_ip: str, known: set[str], pending_ip: dict[str, str]) -> Callable[[View], bool]:
    """Done when the pod's IP (known once the runtime call returned) is owned by `owner_ip`; until then, when some
    IP not in `known` is (the answer then confirms it is the pod's)."""
    def check(view: View) -> bool:
        if "ip" in pending_ip:
            return owned_by(pending_ip["ip"], owner_ip)(view)
        peers, tunnel = view
        return any(ip in tunnel for ip in peers.get(owner_ip, set()) - known)
    return check


RUNTIME_CALL = {"add": "RunPodSandbox", "del": "StopPodSandbox", "move": "RunPodSandbox"}
CASES = {
    "add": "pod ADD on A -> on every other node",
    "del": "pod DEL on A -> gone on every other node",
    "move": "IP moves A -> B -> B's peer on every other node",
}


def run(quick: bool) -> list[dict]:
    rows = []
    for nodes in QUICK_SIZES if quick else SIZES:
        measured, runtime, from_trace, lab_suffix = samples(nodes, QUICK_ROUNDS if quick else ROUNDS)
        for name, values in measured.items():
            entry = row(f"{nodes} nodes: {CASES[name]}", [seconds * 1000.0 for seconds in values], "ms",
                        target_p99=TARGET_P99_MS,
                        note=f"the {RUNTIME_CALL[name]} call p50 {statistics.median(runtime[name]) * 1000:.0f} ms; "
                             f"baseline p99 (3 nodes) {BASELINE_P99_MS[name]:g} ms")
            entry["baseline_p99"] = BASELINE_P99_MS[name]
            entry["samples"] = [round(seconds * 1000.0, 1) for seconds in values]
            entry["runtime_call_ms"] = [round(seconds * 1000.0, 1) for seconds in runtime[name]]
            entry["lab_suffix"] = lab_suffix
            rows.append(entry)
            record = row(f"{nodes} nodes: {CASES[name]}, from its first trace on the node",
                         [seconds * 1000.0 for seconds in from_trace[name]], "ms", target_p99=TARGET_P99_MS,
                         note="the window a pod's traffic can see; from azure-vnet's host route (ADD) or wgcni's "
                              "record removal (DEL)")
            record["samples"] = [round(seconds * 1000.0, 1) for seconds in from_trace[name]]
            rows.append(record)
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
