"""The reliability campaign behind `make chaos`: a lab of its own, faults injected while pods churn, and a check of
what survived that never asks the hooks, written as a JSON report (docs/reliability.md quotes it).

Phases, each ending by waiting until the mesh is exact and then checking it:
- churn: pod ADD/DEL through the nodes' containerd (CRI, as kubelet does: the CNI chain runs) from several threads at
  once, while a random node's DaemonSet pod is killed -9 every 1-4 s (and restarted as kubelet does);
- api: churn while the hooks' API requests fail with 409, 410, 429, 500 and 503, every watch is cut, every
  connection dropped and the API server restarted losing its history (watches resume into 410 Gone);
- tamper: each kind of outside change (TAMPERING) on a random node while a pod on another node pings one on it; the
  time until the node's dataplane is as it was (bound: REPAIR_BOUND);
- restarts: DaemonSet pods killed one at a time, containerd restarted with its pods running, a node rebooted; after
  each, pod ADD/DEL through what came back.
The checks: per node, the pod records on its disk against the READY sandboxes of its containerd (lost = a sandbox
without a record, stale = a record without a sandbox); per node, `wg show` against the lab's truth (every other node
a peer under its current key, whose AllowedIPs cover exactly its node IP and its pods' IPs).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wgcni_lab import control, lab

RECORDS = str(lab.HOOK_DEFAULTS.records_dir / lab.NETWORK)  # the plugin's records of the lab's network
REPAIR_BOUND = 2.0  # seconds: issue 15's bound for every kind of tampering
CONVERGE_TIMEOUT = 90.0
ROUTE_TABLE = lab.HOOK_DEFAULTS.route_table
RULE_PRIORITY = lab.HOOK_DEFAULTS.rule_priority
WG = lab.WG_INTERFACE
NOT_RUNNING = ("does not run there", "nothing to kill")  # the lab's answers for a DaemonSet pod between two lives
API_FAULT_SEQUENCE: list[dict[str, Any]] = [
    {"kind": "error", "code": 500, "count": 5}, {"kind": "error", "code": 429, "count": 5},
    {"kind": "cut-watches"}, {"kind": "error", "code": 409, "count": 3}, {"kind": "error", "code": 410, "count": 3},
    {"kind": "drop-connections"}, {"kind": "error", "code": 503, "count": 3}, {"kind": "restart", "downtime": 2.0},
]


@dataclass(frozen=True)
class Size:
    """How much of each fault a run injects."""

    churn_ops: int
    api_churn_ops: int
    workers: int
    hook_kills: int
    containerd_restarts: int
    reboots: int


FULL = Size(churn_ops=1000, api_churn_ops=300, workers=8, hook_kills=3, containerd_restarts=2, reboots=1)
SHORT = Size(churn_ops=60, api_churn_ops=40, workers=4, hook_kills=1, containerd_restarts=1, reboots=1)


@dataclass
class Phase:
    name: str
    injected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    converged_after: float | None = None  # seconds from the phase's last fault to an exact mesh and records
    lost_records: list[str] = field(default_factory=list)
    stale_records: list[str] = field(default_factory=list)
    mesh_problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # operations that failed (a pod ADD refused, ...)
    repairs: dict[str, float | None] = field(default_factory=dict)  # tamper: kind -> seconds (None = not repaired)
    pings_lost: dict[str, int] = field(default_factory=dict)  # tamper: kind -> echo replies lost meanwhile

    @property
    def ok(self) -> bool:
        repaired = all(seconds is not None and seconds <= REPAIR_BOUND for seconds in self.repairs.values())
        return (self.converged_after is not None and not self.lost_records and not self.stale_records
                and not self.mesh_problems and not self.errors and repaired)


# ---- the independent checks ------------------------------------------------------------------------------------

def node_exec(node: lab.NodeState, *argv: str, check: bool = True) -> str:
    return lab.in_node(node, list(argv), check=check).stdout


def running_pods(state: lab.LabState) -> dict[str, list[dict[str, Any]]]:
    """Each node's READY sandboxes, from its containerd (one listing per node, for both checks)."""
    return {node.name: lab.node_pods(state, node) for node in state.nodes}


def record_problems(state: lab.LabState, pods: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(lost, stale): sandboxes without a pod record, records without a READY sandbox, as `node/sandbox-id`."""
    lost, stale = [], []
    for node in state.nodes:
        listing = node_exec(node, "ls", RECORDS, check=False).split()
        recorded = {name.split("@")[0] for name in listing if name.endswith(".json")}
        running = {pod["id"] for pod in pods[node.name] if lab.recorded(pod)}
        lost += [f"{node.name}/{sandbox}" for sandbox in sorted(running - recorded)]
        stale += [f"{node.name}/{sandbox}" for sandbox in sorted(recorded - running)]
    return lost, stale


def wg_peers(node: lab.NodeState) -> tuple[str, dict[str, set[str]]]:
    """(the device's public key, peer public key -> the addresses its AllowedIPs cover) from `wg show dump`."""
    lines = node_exec(node, "wg", "show", WG, "dump").splitlines()
    public_key = lines[0].split("\t")[1]  # field 0 is the private key: never kept
    peers = {}
    for line in lines[1:]:
        fields = line.split("\t")
        peers[fields[0]] = lab.covered(fields[3].split(",")) if fields[3] != "(none)" else set()
    return public_key, peers


def mesh_problems(state: lab.LabState, pods: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What differs between each node's device and the truth: missing or stale peers, wrong AllowedIPs."""
    try:
        devices = {node.name: wg_peers(node) for node in state.nodes}
    except (lab.LabError, IndexError) as error:
        return [f"a device cannot be read: {error}"]
    expected = lab.expected_allowed_ips(state, (pod for listed in pods.values() for pod in listed))
    keys = {name: device[0] for name, device in devices.items()}
    problems = []
    for node in state.nodes:
        peers = devices[node.name][1]
        for other in state.nodes:
            if other is node:
                continue
            covered = peers.get(keys[other.name])
            if covered is None:
                problems.append(f"{node.name}: no peer for {other.name}")
            elif covered != expected[other.name]:
                extra, missing = sorted(covered - expected[other.name]), sorted(expected[other.name] - covered)
                problems.append(f"{node.name}: peer {other.name} AllowedIPs +{extra} -{missing}")
        stale = set(peers) - {keys[other.name] for other in state.nodes if other is not node}
        problems += [f"{node.name}: stale peer {key[:8]}..." for key in sorted(stale)]
    return problems


def wait_exact(state: lab.LabState, phase: Phase, since: float) -> None:
    """Wait until records and mesh are exact (at most CONVERGE_TIMEOUT); record when (the longest wait of the
    phase), or what is still wrong."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while True:
        pods = running_pods(state)
        lost, stale = record_problems(state, pods)
        mesh = mesh_problems(state, pods)
        if not (lost or stale or mesh):
            phase.converged_after = max(phase.converged_after or 0.0, round(time.monotonic() - since, 2))
            return
        if time.monotonic() > deadline:
            phase.lost_records, phase.stale_records, phase.mesh_problems = lost, stale, mesh
            return
        time.sleep(0.2)


# ---- faults ----------------------------------------------------------------------------------------------------

class Churn:
    """Pod ADD/DEL through CRI from `workers` threads: each operation adds a pod to a random node or deletes one of
    the pods it added, keeping each node's pods within its IP pool."""

    def __init__(self, state: lab.LabState, rng: random.Random, workers: int) -> None:
        self.state, self.rng, self.workers = state, rng, workers
        self.lock = threading.Lock()
        self.added: dict[str, list[dict[str, Any]]] = {node.name: [] for node in state.nodes}
        self.sequence = 0
        self.counts = {"pod ADD": 0, "pod DEL": 0}
        self.errors: list[str] = []
        self.capacity = lab.MAX_PODS - 8  # the lab's own pods and a margin for IPs host-local frees late

    def refresh(self, state: lab.LabState) -> None:
        """The lab as it is now: after a reboot, kubelet brought the pods this churn added back in new sandboxes."""
        with self.lock:
            self.state = state
            names = {pod["name"] for pods in self.added.values() for pod in pods}
            self.added = {node.name: [pod for pod in lab.node_pods(state, node) if pod["name"] in names]
                          for node in state.nodes}

    def run(self, operations: int, until: threading.Thread | None = None) -> None:
        """`operations` operations, and more while `until` (a finite fault sequence) still runs."""
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda _: self.one(), range(operations)))
            while until is not None and until.is_alive():
                list(pool.map(lambda _: self.one(), range(self.workers)))

    def one(self) -> None:
        with self.lock:
            node = self.rng.choice(self.state.nodes)
            mine = self.added[node.name]
            delete = bool(mine) and (len(mine) >= self.capacity or self.rng.random() < 0.5)
            pod = mine.pop(self.rng.randrange(len(mine))) if delete else None
            self.sequence += 1
            name = f"{node.name}-pod{1000 + self.sequence}"
        try:
            if pod is not None:
                with lab.cri_client(self.state, node) as cri:
                    cri.stop_pod_sandbox(pod["id"])
                    cri.remove_pod_sandbox(pod["id"])
                with self.lock:
                    self.counts["pod DEL"] += 1
            else:
                added = lab.run_pod(self.state, node, name, secrets.token_hex(16))
                with self.lock:
                    self.counts["pod ADD"] += 1
                    self.added[node.name].append(added)
        except Exception as error:  # noqa: BLE001 - every failure is reported, the churn goes on
            with self.lock:
                self.errors.append(f"{'DEL' if pod is not None else 'ADD'} on {node.name}: {error}")


@contextmanager
def in_background(action: Callable[[threading.Event], None]) -> Iterator[threading.Thread]:
    """Run `action(stop)` in a thread during the block; `stop` is set when the block ends."""
    stop = threading.Event()
    thread = threading.Thread(target=action, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


Faults = Callable[[Path, lab.LabState, random.Random, dict[str, int], list[str]], Callable[[threading.Event], None]]


def kill_hooks(lab_dir: Path, state: lab.LabState, rng: random.Random, counts: dict[str, int],
               errors: list[str]) -> Callable[[threading.Event], None]:
    """A random node's DaemonSet pod killed -9 within 1 s, then every 1-4 s."""
    def loop(stop: threading.Event) -> None:
        pause = rng.uniform(0.2, 1.0)  # the first kill early: a short churn has one too
        while not stop.wait(pause):
            pause = rng.uniform(1.0, 4.0)
            node = rng.choice(state.nodes)
            try:
                control.request(lab_dir, "hook", node=node.name, action="kill")
                counts["hook kill -9"] = counts.get("hook kill -9", 0) + 1
            except lab.LabError as error:
                if not any(busy in str(error) for busy in NOT_RUNNING):  # being restarted: the next kill hits it
                    errors.append(f"hook kill on {node.name}: {error}")
    return loop


def api_faults(lab_dir: Path, state: lab.LabState, rng: random.Random, counts: dict[str, int],
               errors: list[str]) -> Callable[[threading.Event], None]:
    """API_FAULT_SEQUENCE, one fault every 0.5-1.5 s."""
    def loop(stop: threading.Event) -> None:
        for fault in API_FAULT_SEQUENCE:
            if stop.wait(rng.uniform(0.5, 1.5)):
                return
            label = f"api {fault['kind']}" + (f" {fault['code']} x{fault['count']}" if "code" in fault else "")
            try:
                control.request(lab_dir, "api-fault", **fault)
                counts[label] = counts.get(label, 0) + 1
            except lab.LabError as error:
                errors.append(f"{label}: {error}")
    return loop


def dataplane(node: lab.NodeState) -> tuple[Any, ...]:
    """What the hook owns on `node`, comparable before and after a tampering (no counters, no private key)."""
    rules = sorted(line for line in node_exec(node, "ip", "rule", "show").splitlines()
                   if f"lookup {ROUTE_TABLE}" in line)
    routes = sorted(node_exec(node, "ip", "route", "show", "table", str(ROUTE_TABLE), check=False).splitlines())
    link = node_exec(node, "ip", "-br", "address", "show", WG, check=False).split()
    try:
        public_key, peers = wg_peers(node)
    except (lab.LabError, IndexError):  # no device, or one not configured yet
        public_key, peers = "", {}
    sysctls = node_exec(node, "sysctl", "-n", "net.ipv4.conf.all.src_valid_mark", f"net.ipv4.conf.{WG}.rp_filter",
                        check=False).split()
    tables = sorted(node_exec(node, "nft", "list", "tables").splitlines())
    return rules, routes, link[1:], public_key, sorted((key, sorted(ips)) for key, ips in peers.items()), sysctls, \
        tables


def tampering(peer_ip: str, peer_key: str) -> dict[str, list[str]]:
    """Each kind of outside change issue 15 lists, as a command run on a node; `peer_ip` and `peer_key` are another
    node's IP (routed in the hook's table, host encryption being on) and public key."""
    return {
        "rule deleted": ["ip", "rule", "del", "pref", str(RULE_PRIORITY)],
        "route deleted": ["ip", "route", "flush", "table", str(ROUTE_TABLE)],
        "route changed": ["ip", "route", "replace", "blackhole", peer_ip, "table", str(ROUTE_TABLE)],
        "device down": ["ip", "link", "set", WG, "down"],
        "device deleted": ["ip", "link", "del", WG],
        "address deleted": ["ip", "address", "flush", "dev", WG],
        "peer removed": ["wg", "set", WG, "peer", peer_key, "remove"],
        "peer AllowedIPs replaced": ["wg", "set", WG, "peer", peer_key, "allowed-ips", "192.0.2.1/32"],
        "src_valid_mark reset": ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=0"],
        "rp_filter reset": ["sysctl", "-qw", f"net.ipv4.conf.{WG}.rp_filter=1"],
        "nftables table deleted": ["nft", "delete", "table", "inet", "wgcni"],
    }


def measure_repair(node: lab.NodeState, command: list[str], timeout: float = 10.0) -> float | None:
    """Seconds from `command` on `node` until its dataplane is as before (None: not within `timeout`)."""
    before = dataplane(node)
    node_exec(node, *command)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if dataplane(node) == before:
            return round(time.monotonic() - started, 3)
        time.sleep(0.01)
    return None


# ---- the phases ------------------------------------------------------------------------------------------------

def churn_phase(lab_dir: Path, churn: Churn, name: str, operations: int, faults: Faults,
                finite: bool = False) -> Phase:
    """`operations` pod operations while `faults` run (a `finite` sequence is run to its end)."""
    phase = Phase(name)
    started = time.monotonic()
    state, rng = churn.state, churn.rng
    counts, errors = dict(churn.counts), len(churn.errors)
    with in_background(faults(lab_dir, state, rng, phase.injected, phase.errors)) as injector:
        churn.run(operations, until=injector if finite else None)
    phase.injected.update({kind: count - counts[kind] for kind, count in churn.counts.items()})
    phase.errors += churn.errors[errors:]
    wait_exact(state, phase, time.monotonic())
    phase.seconds = round(time.monotonic() - started, 1)
    return phase


@contextmanager
def pinging(source_netns: str, target_ip: str, lost: list[int]) -> Iterator[None]:
    """A ping every 10 ms from `source_netns` to `target_ip` during the block; appends the replies lost."""
    ping = subprocess.Popen(["nsenter", f"--net={source_netns}", "--", "ping", "-q", "-i", "0.01", "-W", "1",
                             target_ip], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.2)
        yield
        time.sleep(0.2)
    finally:
        ping.send_signal(2)  # SIGINT: ping prints its statistics
        output = ping.communicate(timeout=10)[0]
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    lost.append(int(counts[1]) - int(counts[2]) if counts else -1)


def tamper_phase(state: lab.LabState, rng: random.Random) -> Phase:
    phase = Phase("tamper")
    started = time.monotonic()
    for kind in tampering("", ""):
        target, peer = rng.sample(state.nodes, 2)
        source = next(pod for pod in lab.node_pods(state, peer) if not pod["host_network"])
        destination = next(pod for pod in lab.node_pods(state, target) if not pod["host_network"])
        lost: list[int] = []
        with pinging(source["netns"], destination["ip"], lost):
            phase.repairs[kind] = measure_repair(target, tampering(peer.ip, wg_peers(peer)[0])[kind])
        phase.injected[kind] = 1
        phase.pings_lost[kind] = lost[0]
    wait_exact(state, phase, time.monotonic())
    phase.seconds = round(time.monotonic() - started, 1)
    return phase


def restart_phase(lab_dir: Path, churn: Churn, size: Size) -> Phase:
    phase = Phase("restarts")
    started = time.monotonic()
    faults: list[tuple[str, str, dict[str, Any]]] = [("hook kill -9", "hook", {"action": "kill"})] * size.hook_kills
    faults += [("containerd restart", "containerd", {})] * size.containerd_restarts
    faults += [("node reboot", "reboot", {})] * size.reboots
    counts, errors = dict(churn.counts), len(churn.errors)
    for label, op, arguments in faults:
        node = churn.rng.choice(churn.state.nodes)
        try:
            control.request(lab_dir, op, node=node.name, **arguments)
        except lab.LabError as error:
            phase.errors.append(f"{label} of {node.name}: {error}")
        phase.injected[label] = phase.injected.get(label, 0) + 1
        churn.refresh(lab.require_state(lab_dir))  # a rebooted node: a new mount namespace, new sandboxes
        wait_exact(churn.state, phase, time.monotonic())
        churn.run(2 * size.workers)  # pod ADD and DEL through what came back (a DEL needs the old netns mounts)
        wait_exact(churn.state, phase, time.monotonic())
    phase.injected.update({kind: count - counts[kind] for kind, count in churn.counts.items()})
    phase.errors += churn.errors[errors:]
    phase.seconds = round(time.monotonic() - started, 1)
    return phase


def campaign(lab_dir: Path, size: Size, seed: int) -> list[Phase]:
    """Every phase on the running lab at `lab_dir`."""
    rng = random.Random(seed)
    state = lab.require_state(lab_dir)
    churn = Churn(state, rng, size.workers)  # one for both phases: the pods it added count against the IP pools
    phases = [churn_phase(lab_dir, churn, "churn + hook kill -9", size.churn_ops, kill_hooks)]
    phases.append(churn_phase(lab_dir, churn, "churn + API faults", size.api_churn_ops, api_faults, finite=True))
    phases.append(tamper_phase(state, rng))
    phases.append(restart_phase(lab_dir, churn, size))
    return phases


def lab_cli(lab_dir: Path, *args: str, timeout: float = 600) -> None:
    subprocess.run([sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(lab_dir), *args], check=True,
                   timeout=timeout, stdout=subprocess.DEVNULL)


def report(phases: list[Phase], size: Size, seed: int, seconds: float) -> dict[str, Any]:
    return {"ok": all(phase.ok for phase in phases), "seed": seed, "size": asdict(size), "seconds": round(seconds, 1),
            "phases": [{**asdict(phase), "ok": phase.ok} for phase in phases]}


def summary(result: dict[str, Any]) -> str:
    """The report as the markdown table docs/reliability.md quotes."""
    lines = ["| phase | faults injected | converged after | lost / stale records | mesh problems | result |",
             "|---|---|---|---|---|---|"]
    for phase in result["phases"]:
        injected = ", ".join(f"{kind} {count}" for kind, count in phase["injected"].items())
        if phase["repairs"]:
            injected = ", ".join(
                f"{kind} {'not repaired' if seconds is None else f'{seconds:.2f} s'} "
                f"({phase['pings_lost'][kind]} pings lost)" for kind, seconds in phase["repairs"].items())
        converged = "never" if phase["converged_after"] is None else f"{phase['converged_after']:.2f} s"
        records = f"{len(phase['lost_records'])} / {len(phase['stale_records'])}"
        problems = phase["errors"] + phase["mesh_problems"] + phase["lost_records"] + phase["stale_records"]
        verdict = "ok" if phase["ok"] else "FAILED: " + "; ".join(problem[:160] for problem in problems[:3])
        lines.append(f"| {phase['name']} | {injected} | {converged} | {records} | {len(phase['mesh_problems'])} "
                     f"| {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgcni_lab.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form make test runs")
    parser.add_argument("--seed", type=int, default=None, help="the random choices' seed (default: a new one)")
    parser.add_argument("--report", type=Path, default=Path(".build/chaos/report.json"))
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up when the campaign fails")
    arguments = parser.parse_args(argv)
    size = SHORT if arguments.short else FULL
    seed = arguments.seed if arguments.seed is not None else secrets.randbelow(2**31)
    started = time.monotonic()
    parent = Path(tempfile.mkdtemp(prefix="wgl-chaos-"))  # short: the lab's socket paths must fit
    lab_dir = parent / "lab"
    phases: list[Phase] = []
    try:
        lab_cli(lab_dir, "up", "--nodes", "3", "--pods-per-node", "2", "--restart-backoff", "1",
                "--restart-backoff-max", "2")
        phases = campaign(lab_dir, size, seed)
    finally:
        if arguments.keep_lab and phases and not all(phase.ok for phase in phases):
            print(f"chaos: the lab is left up at {lab_dir} (`wgcni-lab --lab-dir {lab_dir} down` removes it)")
        else:
            lab_cli(lab_dir, "down")
            shutil.rmtree(parent, ignore_errors=True)
    result = report(phases, size, seed, time.monotonic() - started)
    arguments.report.parent.mkdir(parents=True, exist_ok=True)
    arguments.report.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"chaos: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s (seed {seed}); "
          f"report: {arguments.report}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
