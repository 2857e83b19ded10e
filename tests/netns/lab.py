"""A small AKS-like dataplane lab in network namespaces for the hook's real-packet tests.

- a "vnet" namespace holding a bridge (the VNet); nodes are namespaces with a veth on it, addressed from one /16
  like AKS node-subnet mode (10.240.0.4, .35, .66); pod IPs come from the same /16, scattered across nodes;
- pods are namespaces plumbed like azure-vnet transparent mode: host veth `azv<hash>` with proxy_arp and a /32
  route in the node's main table; pod side `eth0` with the pod IP, `169.254.1.1` as gateway via a static
  neighbour entry to the host veth's MAC; both veth ends MTU 1500;
- each node runs its own `wgcni-node run` on the lab's backend (userspace: wireguard-go, unique interface name as
  /var/run/wireguard is not per namespace; kernel: in the VM tier), with pod records written through
  `cni_plugin.records` and peers fed through a peers file built from the hooks' own announcements (the stand-in
  for the Kubernetes sync of the next layer).

Everything is named with a per-run random suffix and removed by `close()`, also after failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cni_plugin.records import RecordStore, utc_now_rfc3339
from node_hook.local_api import request
from tests.support.polling import TIME_SCALE, wait_until

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PREFIX_LEN = 16


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout * TIME_SCALE)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.returncode}: {result.stderr.strip()}")
    return result


def in_ns(namespace: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", namespace, *args, check=check, timeout=timeout)


@dataclass
class Pod:
    name: str
    node: "Node"
    ip: str
    netns: str
    host_veth: str
    container_id: str


@dataclass
class Node:
    name: str
    ip: str
    netns: str
    wg: str
    directory: Path
    hook: subprocess.Popen | None = None
    pods: dict[str, Pod] = field(default_factory=dict)
    pod_ips_changed_at: float = 0.0

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def socket(self) -> Path:
        return self.directory / "hook.sock"

    @property
    def config_file(self) -> Path:
        return self.directory / "config.json"

    @property
    def peers_file(self) -> Path:
        return self.directory / "peers.json"

    @property
    def announce_file(self) -> Path:
        return self.directory / "announce.json"

    @property
    def log_file(self) -> Path:
        return self.directory / "hook.log"

    def api(self, op: str, **fields: object) -> dict:
        return request(self.socket, {"op": op, **fields})

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return in_ns(self.netns, *args, check=check, timeout=timeout)


class Lab:
    def __init__(
        self, root: Path, listen_port: int = 51820, host_encryption: bool = True, backend: str = "userspace"
    ) -> None:
        self.root = root
        self.backend = backend  # the hooks' WireGuard backend: userspace (wireguard-go) or kernel
        self.suffix = secrets.token_hex(3)
        self.vnet = f"h3vnet-{self.suffix}"
        self.bridge = "vnet0"
        self.listen_port = listen_port
        self.host_encryption = host_encryption
        self.nodes: dict[str, Node] = {}
        self.namespaces: list[str] = []
        self._pod_counter = 0
        sh("ip", "netns", "add", self.vnet)
        self.namespaces.append(self.vnet)
        in_ns(self.vnet, "ip", "link", "add", self.bridge, "type", "bridge")
        in_ns(self.vnet, "ip", "link", "set", self.bridge, "up")
        in_ns(self.vnet, "ip", "link", "set", "lo", "up")

    # ---- topology ---------------------------------------------------------------------------------------

    def add_node(self, name: str, ip: str) -> Node:
        netns = f"h3{name}-{self.suffix}"
        wg = f"wg{name[:3]}{self.suffix}"[:15]
        directory = self.root / name
        directory.mkdir(parents=True)
        sh("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        node = Node(name, ip, netns, wg, directory)
        uplink = f"up{name[:4]}{self.suffix}"[:15]
        in_ns(self.vnet, "ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", netns)
        in_ns(self.vnet, "ip", "link", "set", uplink, "master", self.bridge, "up")
        node.exec("ip", "link", "set", "lo", "up")
        node.exec("ip", "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", "eth0")
        node.exec("ip", "link", "set", "eth0", "up")
        # IPv4 VNet: no IPv6 link-local chatter on the capture (the WireGuard device keeps its IPv6 link-local
        # address, as on a real node)
        node.exec("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
        node.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        node.exec("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")  # strict, as on many distros
        node.exec("sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1")
        self.nodes[name] = node
        return node

    def add_pod(self, node: Node, ip: str, name: str | None = None) -> Pod:
        self._pod_counter += 1
        name = name or f"pod{self._pod_counter}"
        netns = f"h3{name}-{self.suffix}"
        host_veth = "azv" + hashlib.sha1(f"default.{name}.{self.suffix}".encode()).hexdigest()[:11]
        sh("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        node.exec("ip", "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        node.exec("sysctl", "-qw", f"net.ipv6.conf.{host_veth}.disable_ipv6=1")  # no late link-local routes
        node.exec("ip", "link", "set", host_veth, "up")
        node.exec("sysctl", "-qw", f"net.ipv4.conf.{host_veth}.proxy_arp=1")
        node.exec("ip", "route", "add", f"{ip}/32", "dev", host_veth)
        mac = json.loads(node.exec("ip", "-j", "link", "show", host_veth).stdout)[0]["address"]
        in_ns(netns, "ip", "link", "set", "lo", "up")
        in_ns(netns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
        in_ns(netns, "ip", "link", "set", "eth0", "up")
        in_ns(netns, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        in_ns(netns, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        in_ns(netns, "ip", "neigh", "replace", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
        container_id = secrets.token_hex(16)
        pod = Pod(name, node, ip, netns, host_veth, container_id)
        node.pods[name] = pod
        self.write_record(pod)
        return pod

    def write_record(self, pod: Pod) -> None:
        store = RecordStore(str(pod.node.state_dir))
        now = utc_now_rfc3339()
        record = {
            "format": 1, "network": "azure", "containerID": pod.container_id, "ifname": "eth0",
            "netns": f"/var/run/netns/{pod.netns}", "podNamespace": "default", "podName": pod.name,
            "podUID": None, "ips": [pod.ip], "cniVersion": "0.3.0",
            "prevResult": {"cniVersion": "0.3.0", "interfaces": [{"name": "eth0", "mac": ""}],
                           "ips": [{"version": "4", "address": f"{pod.ip}/{PREFIX_LEN}", "gateway": "10.240.0.1"}]},
            "created": now, "updated": now,
        }
        with store.lock():
            store.write(record)
        pod.node.pod_ips_changed_at = time.time()
        self.notify(pod, "pod-added")

    def notify(self, pod: Pod, op: str) -> None:
        if pod.node.hook is not None and pod.node.socket.exists():
            pod.node.api(op, network="azure", containerID=pod.container_id, ifname="eth0")

    def delete_pod(self, pod: Pod) -> None:
        store = RecordStore(str(pod.node.state_dir))
        with store.lock():
            store.remove("azure", pod.container_id, "eth0")
        pod.node.pod_ips_changed_at = time.time()
        self.notify(pod, "pod-deleted")
        pod.node.exec("ip", "link", "del", pod.host_veth, check=False)
        sh("ip", "netns", "del", pod.netns, check=False)
        self.namespaces.remove(pod.netns)
        del pod.node.pods[pod.name]

    # ---- hooks ------------------------------------------------------------------------------------------

    def write_config(self, node: Node, **overrides: object) -> None:
        config = {
            "nodeName": node.name, "stateDir": str(node.state_dir), "socket": str(node.socket),
            "interface": node.wg, "listenPort": self.listen_port, "endpoint": node.ip,
            "hostEncryption": self.host_encryption, "azure": False, "peersFile": str(node.peers_file),
            "backend": self.backend,
            "announceFile": str(node.announce_file), "resyncInterval": 30, "recordRescanInterval": 2,
            "logLevel": "info", **overrides,
        }
        node.config_file.write_text(json.dumps(config, indent=1))

    def start_hook(self, node: Node) -> None:
        if not node.config_file.exists():
            self.write_config(node)
        log = open(node.log_file, "ab")
        node.hook = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, PYTHON, "-m", "node_hook.cli", "run", "--config",
             str(node.config_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        log.close()
        wait_until(lambda: node.socket.exists() or node.hook.poll() is not None, 20, what=f"{node.name} socket")
        if node.hook.poll() is not None:
            raise AssertionError(f"hook {node.name} exited: {node.log_file.read_text()[-2000:]}")
        wait_until(lambda: node.api("status")["generation"] > 0, 20, what=f"{node.name} first pass")

    def stop_hook(self, node: Node) -> None:
        if node.hook is None:
            return
        if node.hook.poll() is None:
            node.hook.send_signal(signal.SIGTERM)
            try:
                node.hook.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.hook.kill()
                node.hook.wait()
        node.hook = None

    def cleanup_node(self, node: Node) -> subprocess.CompletedProcess[str]:
        return node.exec(PYTHON, "-m", "node_hook.cli", "cleanup", "--config", str(node.config_file), check=False)

    def sync_peers(self) -> None:
        """Write each node's peers file from the other hooks' announcements and this lab's pod bookkeeping."""
        announcements = {}
        for name, node in self.nodes.items():
            if node.announce_file.exists():
                announcements[name] = json.loads(node.announce_file.read_text())
        for name, node in self.nodes.items():
            entries = []
            for other_name, other in self.nodes.items():
                if other_name == name or other_name not in announcements:
                    continue
                announcement = announcements[other_name]
                entries.append({
                    "name": other_name, "publicKey": announcement["publicKey"], "endpoint": other.ip,
                    "endpointPort": announcement["endpointPort"], "nodeIPs": [other.ip],
                    "podIPs": sorted(pod.ip for pod in other.pods.values()),
                    "podIPsChangedAt": other.pod_ips_changed_at,
                })
            temporary = node.peers_file.with_suffix(".tmp")
            temporary.write_text(json.dumps({"nodes": entries}))
            os.replace(temporary, node.peers_file)

    def wait_converged(self, timeout: float = 15.0) -> None:
        """Every hook programmed exactly the pods the lab has on the other nodes."""
        def done() -> bool:
            for name, node in self.nodes.items():
                status = node.api("status")
                if not status["dataplane_programmed"]:
                    return False
                peers = {peer["node"]: peer for peer in node.api("peers")["peers"]}
                for other_name, other in self.nodes.items():
                    if other_name == name:
                        continue
                    peer = peers.get(other_name)
                    if peer is None or not peer["programmed"]:
                        return False
                    covered = {str(ip) for prefix in peer["allowedIPs"] for ip in _hosts(prefix)}
                    if covered != {pod.ip for pod in other.pods.values()} | {other.ip}:
                        return False
            return True
        wait_until(done, timeout, "all hooks converged", interval=0.1)

    # ---- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        for node in self.nodes.values():
            self.stop_hook(node)
            if node.config_file.exists():
                self.cleanup_node(node)
        for namespace in reversed(self.namespaces):
            # a process left in a namespace keeps it alive after `ip netns del`: end ours first
            pids = sh("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", namespace, check=False)
        self.namespaces.clear()


def _hosts(prefix: str) -> list[str]:
    import ipaddress

    network = ipaddress.ip_network(prefix)
    return [str(address) for address in network] if network.prefixlen >= network.max_prefixlen - 8 else []
