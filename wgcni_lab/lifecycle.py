"""The lab's nodes through their life, as kubelet and AKS handle them: boot, reboot, reimage, scale up and down, and
wgcni's DaemonSet pod on each node supervised as kubelet runs it. Used by the lab daemon (wgcni_lab.daemon), which
owns every long-lived lab process; `wgcni-lab` commands reach it through the control channel (wgcni_lab.control).

- `Cluster.boot_node(node)` is the one way a node starts, at bring-up, after a reboot or reimage and on node-add:
  its network namespace attached to the VNet (`lab.create_node_network`), a new mount namespace with an empty tmpfs
  `/run` over its OS disk, its containerd, the DaemonSet pod when wgcni is installed, then its pods.
- **Reboot** (`Cluster.reboot`): every process of the node is killed (no CRI call, no CNI DEL: the power is cut),
  its network namespace deleted (links, routes, rules, nftables, sysctls gone) and `/run` lost; the OS disk stays
  (`<lab dir>/nodes/<name>/disk`: `/etc`, `/opt`, `/var/lib`, `/var/log`, and containerd's root). containerd comes
  back and finds the old sandboxes NOTREADY; the DaemonSet's init container runs again, then its containers; then,
  as kubelet does for each pod bound to the node, the old sandbox is stopped (CNI DEL without a netns), a new one
  made for the same pod (same name and uid, attempt + 1: CNI ADD) and the old one removed. **Reimage** is the same
  with the OS disk and containerd's root wiped and re-provisioned (`lab.prepare_node_cni`, a new WireGuard key); the
  node's pods are made again from their specs (kubelet reads them from the API server).
- **DaemonSet pod**: from the wgcni image through the node's containerd, as kubelet runs conf/daemonset.yaml
  (`wgcni_lab.kubelet.ImageDaemonSetPod`, when `up` found or built the image: `LabState.daemonset_image`), or as
  bare processes (`DaemonSetPod`, `up --daemonset-runtime processes` or no image tools), described here: the init
  container `install-cni --wait`, then the containers `wgcni-node run`
  and `install-cni --watch`, each started in the pod's cgroup (cgroup v2 hierarchy), so wireguard-go, which the hook
  starts in a session of its own, is part of the pod too. stop = SIGSTOP to every process of the pod, start =
  SIGCONT, kill = SIGKILL. The supervision loop (`Cluster.supervise`) restarts the pod when one of its containers
  exits, on its own or killed: all its processes are killed, the init container runs again, then the containers,
  and the restart count goes up by one. The lab restarts the pod as a whole (as kubelet does when a pod's sandbox
  dies); kubelet would restart a lone crashed container alone, without the init container. The restart delay is
  kubelet's crash-loop backoff: the first restart at once, then `initial` seconds (kubelet: 10), doubling up to
  `cap` (kubelet: 300), forgotten after 10 minutes of running; `wgcni-lab up --restart-backoff` shortens it.
- **node-add** makes the next node (a node IP and a pod IP pool beyond every address in use), its Node object, and
  boots it (optionally with pods that start before its DaemonSet pod, as on an AKS scale-up without a startup taint);
  **node-del** stops its pods (CNI DEL), kills its processes, removes its namespaces and directories and
  deletes its Node object (the API server's garbage collection deletes its WireguardNode with it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wgcni_lab import lab, services
from wgcni_lab.apiserver.resources import NODES
from wgcni_lab.apiserver.server import ApiServer, NamespacedListener
from wgcni_lab.cleanup import (
    CGROUP_ROOT,
    kill_processes,
    process_state,
    process_table,
    reap_children,
    remove_tree,
    with_descendants,
)
from wgcni_lab.containerd import Containerd, ContainerdError
from wgcni_lab.control import one_line as control_line
from wgcni_lab.cri import CriError
from wgcni_lab.image import daemonset_image
from wgcni_lab.kubelet import FreezablePod, ImageDaemonSetPod, load_template

CGROUP_V2 = CGROUP_ROOT / "unified"  # the cgroup v2 hierarchy beside the v1 controllers on these hosts
DAEMONSET_CGROUP = "wgcni-node-daemonset"
BACKOFF_RESET_AFTER = 600.0  # seconds of running after which kubelet forgets a container's crash-loop backoff
HOOK_CONTAINER = "wgcni-node"
WATCH_CONTAINER = "install-cni-watch"
MERGE_PATCH = "application/merge-patch+json"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

Progress = Callable[[str], None]


# ---- the Node object and its labels --------------------------------------------------------------------------------

def node_object(node: lab.NodeState) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                                                   "kubernetes.azure.com/role": "agent"}},
        "status": {"addresses": [*({"type": "InternalIP", "address": ip} for ip in node.ips),
                                 {"type": "Hostname", "address": node.name}],
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "message": "the lab booted the node"}],
                   # every field a kubelet reports: the clients' Node models require them all
                   "nodeInfo": {"kubeletVersion": "v1.31.0-lab", "kubeProxyVersion": "v1.31.0-lab",
                                "osImage": "wgcni lab node (network namespace)", "operatingSystem": "linux",
                                "architecture": "amd64", "kernelVersion": os.uname().release,
                                "containerRuntimeVersion": "containerd://lab", "machineID": node.name,
                                "systemUUID": node.name, "bootID": node.netns}},
    }


def parse_label(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` (set) or `KEY-` (remove), checked as Kubernetes checks label keys and values."""
    if text.endswith("-") and "=" not in text:
        key, value = text[:-1], None
    elif "=" in text:
        key, value = text.split("=", 1)
    else:
        raise lab.LabError(f"label {text!r}: give KEY=VALUE to set it or KEY- to remove it")
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (prefix and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix))):
        raise lab.LabError(f"label key {key!r} is not valid (an optional DNS prefix and '/', then up to 63 of "
                           "A-Za-z0-9-_. starting and ending alphanumeric)")
    if value and not _LABEL_NAME.match(value):
        raise lab.LabError(f"label value {value!r} is not valid (up to 63 of A-Za-z0-9-_. starting and ending "
                           "alphanumeric, or empty)")
    return key, value


# ---- addressing of added nodes --------------------------------------------------------------------------------------

def next_node(state: lab.LabState) -> lab.NodeState:
    """The node node-add makes: the next AKS node slot beyond every node IP and pod IP in use (its 30 secondary IPs
    are its pod pool, disjoint from every other node's; in overlay mode its pool is the next /24 of the pod CIDR),
    named after the slot; dual-stack, with the IPv6 twin of its IP."""
    node = _next_node_ipv4(state)
    if state.dual_stack:
        node.ipv6 = lab.ipv6_twin(node.ip)
    return node


def _next_node_ipv4(state: lab.LabState) -> lab.NodeState:
    if state.mode == "overlay":
        slots = [(int(ipaddress.ip_address(node.ip)) - int(ipaddress.ip_address(lab.node_ip(0)))) // (lab.MAX_PODS + 1)
                 for node in state.nodes]
        index = max(slots, default=-1) + 1
        blocks = {ipaddress.ip_network(f"{node.pod_ips[0]}/24", strict=False) for node in state.nodes}
        block = next(block for block in lab.OVERLAY_POD_CIDR.subnets(new_prefix=24) if block not in blocks)
        return lab.NodeState(name=f"node-{index + 1}", ip=lab.node_ip(index), netns=f"wgl-{state.id}-node-{index + 1}",
                             pod_ips=lab.overlay_pool(block))
    used = [ipaddress.ip_address(ip) for node in state.nodes for ip in (node.ip, *node.pod_ips)]
    first = ipaddress.ip_address(lab.node_ip(0))
    index = max(((int(ip) - int(first)) // (lab.MAX_PODS + 1) for ip in used), default=-1) + 1
    last_pod_ip = ipaddress.ip_address(lab.node_ip(index)) + lab.MAX_PODS
    if last_pod_ip not in lab.VNET or last_pod_ip == lab.VNET.broadcast_address:
        raise lab.LabError(f"the VNet {lab.VNET} has no room for another node")
    ip = lab.node_ip(index)
    return lab.NodeState(name=f"node-{index + 1}", ip=ip, netns=f"wgl-{state.id}-node-{index + 1}",
                         pod_ips=[str(ipaddress.ip_address(ip) + offset) for offset in range(1, lab.MAX_PODS + 1)])


# ---- the DaemonSet pod ----------------------------------------------------------------------------------------------

@dataclass
class RestartBackoff:
    """kubelet's crash-loop backoff: no delay before the first restart, then `initial` seconds doubling up to
    `cap`; a container that ran for BACKOFF_RESET_AFTER seconds starts over."""

    initial: float
    cap: float
    delay: float = 0.0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= BACKOFF_RESET_AFTER:
            self.delay = 0.0
        current = self.delay
        self.delay = self.initial if current == 0 else min(self.cap, current * 2)
        return current


@dataclass
class DaemonSetPod(FreezablePod):
    """wgcni's DaemonSet pod on one node, run and supervised as kubelet runs it (see the module docstring)."""

    state: lab.LabState
    node: lab.NodeState
    backoff: RestartBackoff
    api: ApiServer  # issues the pod's service-account token, as TokenRequest does for the kubelet
    restarts: int = 0
    phase: str = "pending"  # pending -> running <-> stopped; -> restarting (waiting for its backoff) -> running
    last_termination: str = ""
    restart_at: float = 0.0
    started_at: float = 0.0
    created_at: float = 0.0  # wall clock, for AGE
    containers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token_issued_at: float = 0.0

    @property
    def cgroup(self) -> Path:
        return CGROUP_V2 / self.state.cgroup_parent(self.node).strip("/") / DAEMONSET_CGROUP

    def pids(self) -> set[int]:
        try:
            return {int(pid) for pid in (self.cgroup / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def start(self, runtime: Containerd) -> None:
        """The ConfigMap and credentials mounted, the init container run to completion, then the containers; returns
        once the hook is ready and containerd has loaded the conflist with wgcni in it."""
        lab.write_node_config(self.state, self.node, self.api.tls.ca_pem)
        self.rotate_token()
        lab.install_cni(self.state, self.node)
        self.cgroup.mkdir(parents=True, exist_ok=True)
        config = str(lab.NODE_CONFIG_DIR / "config.yaml")
        hook_env = dict(lab.node_env(), KUBECONFIG=str(lab.NODE_CONFIG_DIR / "kubeconfig"), NODE_NAME=self.node.name)
        self.containers = {
            HOOK_CONTAINER: self._start_container([self.state.hook, "run", "--config", config], "wgcni-node.log",
                                                  hook_env),
            WATCH_CONTAINER: self._start_container([self.state.hook, "install-cni", "--watch", "--config", config,
                                                    "--plugin", self.state.plugin], "install-cni-watch.log",
                                                   lab.node_env()),
        }
        self.node.hook_pid = self.containers[HOOK_CONTAINER].pid
        lab.wait_hook_ready(self.state, self.node, self.containers[HOOK_CONTAINER])
        lab.wait_chained(runtime)
        self.phase, self.started_at = "running", time.monotonic()
        self.created_at = self.created_at or time.time()
        self.publish()

    def rotate_token(self) -> None:
        """A new service-account token bound to the node's Node in the pod's token file (the kubelet does this at
        start and once 80% of the token's lifetime is over; the hook re-reads the file when it changes)."""
        lab.write_node_token(self.node, self.api.node_token(self.node.name, lab.TOKEN_TTL))
        self.token_issued_at = time.monotonic()

    def _start_container(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `argv` in the node, its process (and so every descendant) in the pod's cgroup before it execs."""
        join_cgroup = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        with open(self.node.directory(self.state.path) / log_name, "ab") as log:
            return subprocess.Popen(["sh", "-c", join_cgroup, str(self.cgroup), *lab.node_enter_argv(self.node),
                                     *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True)

    def kill(self) -> None:
        """SIGKILL every process of the pod and wait until they are gone (the supervision loop restarts it)."""
        if self.phase not in ("running", "stopped"):
            raise lab.LabError(f"{self.node.name}: the DaemonSet pod is {self.phase}: nothing to kill")
        self.fail("killed (SIGKILL)")

    def supervise(self, runtime: Containerd) -> None:
        """One look, as kubelet's pod worker takes: a container that exited fails the pod; a pod whose backoff is
        over is restarted."""
        if self.phase in ("running", "stopped"):
            exited = [f"{name} exited with {process.returncode}" for name, process in self.containers.items()
                      if process.poll() is not None]
            if exited:
                self.fail("; ".join(exited))
            elif time.monotonic() - self.token_issued_at >= 0.8 * lab.TOKEN_TTL:
                self.rotate_token()
        elif self.phase == "restarting" and time.monotonic() >= self.restart_at:
            self.restarts += 1
            try:
                self.start(runtime)
            except lab.LabError as error:
                self.fail(str(error))

    def fail(self, why: str) -> None:
        """The pod failed (`why`): kill what is left of it and schedule its restart after the backoff."""
        kill_processes(self.pids())
        for process in self.containers.values():
            process.poll()
        ran_for = time.monotonic() - self.started_at if self.started_at else 0.0
        delay = self.backoff.next_delay(ran_for)
        self.phase, self.last_termination, self.restart_at = "restarting", why, time.monotonic() + delay
        self.node.hook_pid = 0
        self.publish()

    def report(self) -> dict[str, Any]:
        """The pod as `status --json` shows it (kubectl's STATUS and RESTARTS, plus the process ids); the keys of
        kubelet.ImageDaemonSetPod.report that apply to bare processes."""
        live = {name: process.pid for name, process in self.containers.items()
                if process.poll() is None and self.phase in ("running", "stopped")}
        waiting = max(0.0, self.restart_at - time.monotonic()) if self.phase == "restarting" else 0.0
        status = {"running": "Running", "stopped": "Running", "pending": "Init:0/1"}.get(self.phase, "Error")
        return {"runtime": "processes", "state": self.phase, "restarts": self.restarts,
                "pid": live.get(HOOK_CONTAINER, 0), "containers": live, "last_termination": self.last_termination,
                "status": "CrashLoopBackOff" if waiting else status,
                "ready": f"{len(live) if self.phase == 'running' else 0}/{len(self.containers) or 2}",
                "created_at": self.created_at, "reason": "CrashLoopBackOff" if waiting else "",
                "restart_in_seconds": round(waiting, 1)}

    def publish(self) -> None:
        """Write the pod's report into the state file, where `wgcni-lab status` reads it."""
        self.node.daemonset = self.report()
        self.state.save()


# ---- the cluster -----------------------------------------------------------------------------------------------------

API_FAULTS = ("error", "cut-watches", "drop-connections", "restart")
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_ERROR_METHODS: dict[int, frozenset[str] | None] = {409: WRITES, 410: frozenset({"GET"}), 429: None, 500: None,
                                                       503: None}
HOOK_USER_AGENT_PREFIX = "wgcni-node/"


def unless_gone(call: Callable[[str], object], sandbox_id: str) -> None:
    """A CRI stop or remove of a sandbox, which containerd may have dropped already while it recovered after a
    reboot (NOT_FOUND): kubelet takes that as done."""
    try:
        call(sandbox_id)
    except CriError as error:
        if error.code.name != "NOT_FOUND":
            raise


def node_process_ids(state: lab.LabState, node: lab.NodeState) -> set[int]:
    """Every live process of the node: in its network namespace or its cgroups (pods, DaemonSet pod), its mount
    namespace's holder, its containerd and shims, and their descendants."""
    table = process_table()
    roots = lab.netns_pids(node.netns) | lab.cgroup_pids(state.cgroup_parent(node))
    if node.holder_pid and process_state(node.holder_pid) not in (None, "Z"):
        roots.add(node.holder_pid)
    markers = {str(node.containerd_dir(state.path)).encode()}
    roots |= {info.pid for info in table.values() if any(marker in arg for arg in info.argv for marker in markers)}
    return {pid for pid in with_descendants(roots, table) if pid in table and table[pid].live}


class Cluster:
    """The running lab in the daemon: the state, the API server, each node's containerd and DaemonSet pod. Every
    operation holds `lock` (the control channel's threads and the supervision loop share it)."""

    def __init__(self, state: lab.LabState, api: ApiServer, progress: Progress) -> None:
        self.state = state
        self.api = api
        self.progress = progress
        self.lock = threading.RLock()
        self.runtimes: dict[str, Containerd] = {}
        self.daemonsets: dict[str, DaemonSetPod | ImageDaemonSetPod] = {}
        self.write_denied: set[str] = set()  # nodes whose hook's writes the API server refuses (`api deny`)

    # ---- boot and power-off ----------------------------------------------------------------------------------------

    def boot_node(self, node: lab.NodeState, *, fresh_disk: bool, pods: list[dict[str, Any]] | None = None,
                  pods_before_daemonset: int = 0, daemonset_restarts: int = 0) -> None:
        """Start the node from its OS disk: network, mounts, containerd, `pods_before_daemonset` new pods (a node's
        first pods can start before the DaemonSet's init container has chained wgcni: they get no record), the
        DaemonSet pod (once wgcni is installed), then `pods` back as kubelet brings them back (see the module
        docstring). `fresh_disk`: provision the disk as AKS does first (the CNI plugins and the azure conflist)."""
        lab.create_node_network(self.state, node)
        lab.start_node_mounts(self.state, node)
        services.program_node(self.state, node)  # kube-proxy's chains, before any pod of the node runs
        self.api.add_listener(NamespacedListener(node.netns, "127.0.0.1", lab.API_PORT_IN_NODE))
        if node.name == self.state.apiserver_node:  # a host-network API server: behind the node's own routing
            self.api.add_listener(NamespacedListener(node.netns, node.ip, lab.API_PORT_IN_NODE))
        if fresh_disk:
            lab.prepare_node_cni(self.state, node)
        runtime = lab.node_containerd(self.state, node)
        runtime.start()
        self.runtimes[node.name] = runtime
        self.progress(f"{node.name}: netns {node.netns}, eth0 {node.ip}/{lab.VNET.prefixlen}, containerd (CRI) up")
        if self.state.daemonset_image and not runtime.has_image(daemonset_image()):  # kept across a reboot
            try:
                runtime.import_image(Path(self.state.daemonset_image), "the wgcni image")
            except ContainerdError as error:
                raise lab.LabError(control_line(str(error))) from None
        for _ in range(pods_before_daemonset):
            pod = lab.add_pod(self.state, node.name, predates_install=True)
            self.progress(f"{node.name}: pod {pod['name']} {pod['ip']} (before wgcni: no pod record)")
        if self.state.daemonset_installed:
            self.start_daemonset(node, daemonset_restarts)
        self.restore_pods(node, pods or [])

    def start_daemonset(self, node: lab.NodeState, restarts: int = 0) -> None:
        first, cap = self.state.restart_backoff
        pod: DaemonSetPod | ImageDaemonSetPod
        if self.state.daemonset_image:
            pod = ImageDaemonSetPod(self.state, node, load_template(), lambda: RestartBackoff(first, cap), self.api,
                                    restarts=restarts)
        else:
            pod = DaemonSetPod(self.state, node, RestartBackoff(first, cap), self.api, restarts=restarts)
        self.daemonsets[node.name] = pod
        try:
            pod.start(self.runtimes[node.name])
        except lab.LabError as error:  # kubelet keeps trying: the supervision loop restarts it after its backoff
            pod.fail(str(error))
            raise
        how = (f"from {pod.template.containers[0].image} through containerd, as in conf/daemonset.yaml"
               if isinstance(pod, ImageDaemonSetPod) else "as bare processes")
        self.progress(f"{node.name}: wgcni-node ready ({lab.WG_INTERFACE}, UDP {lab.WG_PORT}; {how}), "
                      f"wgcni installed after azure-vnet in /etc/cni/net.d")

    def restore_pods(self, node: lab.NodeState, pods: list[dict[str, Any]]) -> None:
        """For each pod bound to the node, what kubelet does when it finds its sandbox dead: stop the old sandbox
        (CNI DEL, without a netns after a reboot), run a new one for the same pod (attempt + 1), remove the old."""
        if not pods:
            return
        with lab.cri_client(self.state, node) as cri:
            try:
                sandboxes = cri.list_pod_sandboxes(labels=lab.POD_LABELS)
                for pod in pods:
                    previous = [sandbox for sandbox in sandboxes if sandbox.name == pod["name"]]
                    for sandbox in previous:
                        unless_gone(cri.stop_pod_sandbox, sandbox.id)
                    attempt = max((sandbox.attempt for sandbox in previous), default=-1) + 1
                    lab.run_pod(self.state, node, pod["name"], pod["uid"], attempt=attempt,
                                host_network=pod["host_network"])
                    for sandbox in previous:
                        unless_gone(cri.remove_pod_sandbox, sandbox.id)
            except CriError as error:
                raise lab.LabError(f"{node.name}: bringing its pods back failed: {error.details or error}") from None
        self.progress(f"{node.name}: {len(pods)} pods back (new sandboxes, CNI ADD)")

    def power_off(self, node: lab.NodeState) -> None:
        """Everything volatile of the node gone: its processes killed, containerd's state, its mount namespace (and
        so its /run), its network namespace; the OS disk stays."""
        pod = self.daemonsets.pop(node.name, None)
        if isinstance(pod, ImageDaemonSetPod):
            pod.stop_probes()
        kill_processes(node_process_ids(self.state, node))
        reap_children()  # the daemon is their reaper: a zombie would keep the node's cgroups from being removed
        runtime = self.runtimes.pop(node.name, None) or lab.node_containerd(self.state, node)
        runtime.power_off()
        self.api.remove_listener(node.netns)
        lab.remove_node_network(self.state, node)
        node.holder_pid = node.hook_pid = 0
        node.daemonset = {}
        self.state.save()

    # ---- operations of the control channel ---------------------------------------------------------------------

    def reboot(self, name: str, *, reimage: bool = False) -> dict[str, Any]:
        started = time.monotonic()
        with self.lock:
            node = self.state.node(name)
            pods = self._pods_bound_to(node)
            previous = self.daemonsets.get(name)
            self.power_off(node)
            if reimage:
                remove_tree(node.disk_dir(self.state.path))
                remove_tree(node.containerd_dir(self.state.path))
            restarts = 0 if reimage or previous is None else previous.restarts + 1
            self.boot_node(node, fresh_disk=reimage, pods=pods, daemonset_restarts=restarts)
        return {"node": name, "pods": len(pods), "seconds": round(time.monotonic() - started, 2)}

    def _pods_bound_to(self, node: lab.NodeState) -> list[dict[str, Any]]:
        """The pods kubelet will bring back on the node (on AKS it reads them from the API server; here the node's
        containerd is asked before the power goes)."""
        try:
            return lab.node_pods(self.state, node)
        except lab.LabError as error:
            self.progress(f"{node.name}: its pods cannot be listed, they will not come back: {error}")
            return []

    def add_node(self, pods_before_daemonset: int = 0) -> dict[str, Any]:
        started = time.monotonic()
        with self.lock:
            node = next_node(self.state)
            self.state.nodes.append(node)
            self.state.save()  # before anything is made: teardown finds it
            self.api.store.create(NODES, node_object(node))
            self.boot_node(node, fresh_disk=True, pods_before_daemonset=pods_before_daemonset)
        return {"node": node.name, "ip": node.ip, "seconds": round(time.monotonic() - started, 2)}

    def delete_node(self, name: str) -> dict[str, Any]:
        with self.lock:
            node = self.state.node(name)
            if len(self.state.nodes) == 1:
                raise lab.LabError(f"{name} is the lab's last node: `wgcni-lab down` removes the lab")
            for pod in self._pods_bound_to(node):  # drained: kubelet stops and removes each pod (CNI DEL)
                lab.delete_pod(self.state, pod["name"])
            self.power_off(node)
            remove_tree(node.directory(self.state.path))
            self.api.store.delete(NODES, name, {})
            self.state.nodes.remove(node)
            self.state.save()
        return {"node": name}

    def api_access(self, name: str, action: str) -> dict[str, Any]:
        """`deny`: the API server answers every write of NAME's hook (create, update, patch, delete) with 403, as
        RBAC or an admission policy refusing it would; `allow` lifts that. NAME need not exist yet (a node about
        to be added)."""
        if action not in ("deny", "allow"):
            raise lab.LabError(f"api: {action!r} is neither deny nor allow")
        with self.lock:
            if action == "deny":
                self.write_denied.add(name)
            else:
                self.write_denied.discard(name)
            self.api.clear_faults()
            for denied in sorted(self.write_denied):
                self.api.fail_next(count=sys.maxsize, code=403, methods={"POST", "PUT", "PATCH", "DELETE"},
                                   user_agent=f"wgcni-node/{denied}")
            return {"writeDenied": sorted(self.write_denied)}

    def restart_containerd(self, name: str) -> dict[str, Any]:
        """`systemctl restart containerd` on NAME: the pods (and the DaemonSet pod) run on, the new containerd
        recovers them."""
        started = time.monotonic()
        with self.lock:
            self.state.node(name)
            runtime = self.runtimes.get(name)
            if runtime is None:
                raise lab.LabError(f"{name}: its containerd does not run (the node is booting)")
            try:
                runtime.restart()
            except ContainerdError as error:
                raise lab.LabError(f"{name}: containerd did not come back: {control_line(str(error))}") from None
        return {"node": name, "seconds": round(time.monotonic() - started, 2)}

    def api_fault(self, kind: str, code: int = 500, count: int = 1, downtime: float = 0.0) -> dict[str, Any]:
        """A fault of the API server as the hooks meet it on AKS (API_FAULTS): `error` answers the hooks' next
        `count` requests that can get `code` with it (409 only writes, 410 only reads: a list or watch from a
        compacted revision), `cut-watches` aborts every watch stream, `drop-connections` every connection,
        `restart` stops the server for `downtime` seconds and loses its history (watches resume into 410 Gone)."""
        if kind not in API_FAULTS:
            raise lab.LabError(f"api-fault: {kind!r} is none of {', '.join(API_FAULTS)}")
        if kind == "error":
            if code not in API_ERROR_METHODS:
                raise lab.LabError(f"api-fault: code {code} is none of {', '.join(map(str, API_ERROR_METHODS))}")
            methods = API_ERROR_METHODS[code]
            self.api.fail_next(count=count, code=code, methods=set(methods) if methods else None,
                               user_agent_prefix=HOOK_USER_AGENT_PREFIX)
        elif kind == "cut-watches":
            self.api.cut_watches()
        elif kind == "drop-connections":
            self.api.drop_connections()
        else:
            self.api.restart(downtime=downtime)
        return {"fault": kind, "pendingErrors": self.api.pending_faults()}

    def label(self, name: str, key: str, value: str | None) -> dict[str, Any]:
        with self.lock:
            self.state.node(name)
            patched = self.api.store.patch(NODES, name, MERGE_PATCH, {"metadata": {"labels": {key: value}}}, None)
        return {"node": name, "labels": patched["metadata"].get("labels", {})}

    def daemonset(self, name: str, action: str) -> dict[str, Any]:
        with self.lock:
            self.state.node(name)
            pod = self.daemonsets.get(name)
            if pod is None:
                raise lab.LabError(f"{name}: wgcni's DaemonSet pod does not run there (not installed yet)")
            {"stop": pod.freeze, "start": pod.thaw, "kill": pod.kill}[action]()
            return {"node": name, **pod.report()}

    def supervise(self) -> None:
        with self.lock:
            for name, pod in list(self.daemonsets.items()):
                pod.supervise(self.runtimes[name])
