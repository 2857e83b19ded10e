"""P2: peer convergence in the local lab — how long after a pod change every other node's dataplane follows.

Brings up a 3-node lab (`wgcni-lab up`, in a lab dir of its own), then measures, `ROUNDS` times each:
- add:  RunPodSandbox asked on node A -> on every other node the pod's IP is in A's peer's AllowedIPs (wireguard-go,
        `wg show dump`) and routed into the tunnel (`ip route show table 51820`);
- del:  StopPodSandbox asked on A -> the IP is in no peer and no tunnel route on any other node;
- move: the IP of a pod on A goes to a new pod on B, as when Azure moves a secondary IP between NICs: the fabric
        delivers it to B (`wgcni_lab.fabric.move_ip`) and B's IPAM pool is set to that one IP (a CNS-style conflist
        rewrite that B's `install-cni --watch` re-chains, before the clock starts), the pod on A is deleted, then
        RunPodSandbox is asked on B -> on every node but B the IP is on B's peer only. Afterwards the IP goes back
        to A.
The clock starts when kubelet would ask the runtime, so each time includes the runtime's own work and the CNI chain
(RunPodSandbox alone takes about 120 ms here).
The state of every other node is read with independent tools (nsenter + wg + ip) in a polling loop; the duration of
one poll of a node (about 7 ms here) bounds the resolution and is given in the rows' note, beside the duration of the
runtime call that starts the clock (the CNI chain runs inside it). Rows are in ms.

Target (issue 6): p99 <= 1 s for each scenario. Run through `python -m bench.run --only P2` (as root, after
`make build`), or `python -m bench.p2_convergence` for the rows as JSON.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import row
from wgcni_lab import fabric, lab
from wgcni_lab.containerd import write_conflist

TITLE = "convergence in the lab (3 nodes, userspace WireGuard, sync through the test API server): pod change on " \
        "one node -> AllowedIPs + tunnel route on every other node"
ROUNDS, QUICK_ROUNDS = 10, 1
TARGET_P99_MS = 1000.0
TIMEOUT = 30.0
ROUTE_TABLE = lab.HOOK_DEFAULTS.route_table


def dataplane(node: lab.NodeState) -> tuple[dict[str, set[str]], set[str]]:
    """(endpoint address -> addresses its peer allows, addresses routed into the tunnel) on `node`."""
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


def owned_by(ip: str, owner_ip: str | None) -> Callable[[tuple[dict[str, set[str]], set[str]]], bool]:
    def check(view: tuple[dict[str, set[str]], set[str]]) -> bool:
        peers, tunnel = view
        holders = {endpoint for endpoint, covered in peers.items() if ip in covered}
        if owner_ip is None:
            return not holders and ip not in tunnel
        return holders == {owner_ip} and ip in tunnel
    return check


def time_until(nodes: list[lab.NodeState], done: Callable, started: float,
               poll_times: list[float]) -> float:
    """Seconds from `started` until `done` holds on every node (each node's time is its first satisfied poll);
    the duration of every poll goes to `poll_times` (the resolution of the figure)."""
    pending = {node.name: node for node in nodes}
    converged: dict[str, float] = {}
    while pending:
        for name, node in list(pending.items()):
            polled = time.monotonic()
            view = dataplane(node)
            poll_times.append(time.monotonic() - polled)
            if done(view):
                converged[name] = time.monotonic() - started
                del pending[name]
        if time.monotonic() - started > TIMEOUT:
            raise lab.LabError(f"no convergence on {', '.join(pending)} within {TIMEOUT}s")
    return max(converged.values())


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


def _delete(state: lab.LabState, node: lab.NodeState, pod: dict[str, Any]) -> tuple[float, float]:
    """Delete the pod as kubelet does; returns when StopPodSandbox (whose CNI DEL drops the IP) was asked for and
    when it returned."""
    with lab.cri_client(state, node) as cri:
        asked = time.monotonic()
        cri.stop_pod_sandbox(pod["id"])
        stopped = time.monotonic()
        cri.remove_pod_sandbox(pod["id"])
    return asked, stopped


def samples(rounds: int, poll_times: list[float]) -> tuple[dict[str, list[float]], dict[str, list[float]], str]:
    """(convergence times, durations of the runtime call that started the clock), in seconds per scenario, `rounds`
    each, in a lab of its own (removed afterwards), and that lab's id (the suffix of its namespaces' names)."""
    parent = Path(tempfile.mkdtemp(prefix="wgl-bench-"))
    lab_dir = parent / "lab"
    command = [sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(lab_dir)]
    measured: dict[str, list[float]] = {"add": [], "del": [], "move": []}
    runtime: dict[str, list[float]] = {"add": [], "del": [], "move": []}
    try:
        up = subprocess.run([*command, "up", "--nodes", "3", "--pods-per-node", "1"], capture_output=True,
                            text=True, timeout=300)
        if up.returncode != 0:
            raise lab.LabError(f"wgcni-lab up failed: {up.stderr.strip()}")
        state = lab.require_state(lab_dir)
        a, b, c = state.nodes
        for _ in range(rounds):
            asked = time.monotonic()
            pod = lab.add_pod(state, a.name)
            runtime["add"].append(time.monotonic() - asked)
            measured["add"].append(time_until([b, c], owned_by(pod["ip"], a.ip), asked, poll_times))
            asked, stopped = _delete(state, a, pod)
            runtime["del"].append(stopped - asked)
            measured["del"].append(time_until([b, c], owned_by(pod["ip"], None), asked, poll_times))

            pod = lab.add_pod(state, a.name)
            time_until([b, c], owned_by(pod["ip"], a.ip), time.monotonic(), poll_times)
            fabric.move_ip(state, pod["ip"], b.name)
            set_pool(state, b, [pod["ip"]])
            _delete(state, a, pod)
            asked = time.monotonic()
            moved = lab.add_pod(state, b.name)
            runtime["move"].append(time.monotonic() - asked)
            if moved["ip"] != pod["ip"]:
                raise lab.LabError(f"the move gave {moved['ip']}, not {pod['ip']}")
            measured["move"].append(time_until([a, c], owned_by(pod["ip"], b.ip), asked, poll_times))
            _delete(state, b, moved)
            fabric.move_ip(state, pod["ip"], a.name)
            set_pool(state, b, b.pod_ips)
    finally:
        subprocess.run([*command, "down"], capture_output=True, timeout=300)
        shutil.rmtree(parent, ignore_errors=True)
    return measured, runtime, state.id


RUNTIME_CALL = {"add": "RunPodSandbox", "del": "StopPodSandbox", "move": "RunPodSandbox"}
CASES = {
    "add": "pod ADD on A -> on B and C",
    "del": "pod DEL on A -> gone on B and C",
    "move": "IP moves A -> B -> B's peer on A and C",
}


def run(quick: bool) -> list[dict]:
    poll_times: list[float] = []
    measured, runtime, lab_suffix = samples(QUICK_ROUNDS if quick else ROUNDS, poll_times)
    poll = f"one poll of a node p50 {statistics.median(poll_times) * 1000:.0f} ms"
    return [{**row(CASES[name], [seconds * 1000.0 for seconds in values], "ms", target_p99=TARGET_P99_MS,
                   note=f"of which the {RUNTIME_CALL[name]} call p50 {statistics.median(runtime[name]) * 1000:.0f} "
                        f"ms; {poll}"),
             "lab_suffix": lab_suffix}
            for name, values in measured.items()]


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
