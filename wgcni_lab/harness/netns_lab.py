"""A small AKS-like dataplane lab in network namespaces for the hook's real-packet tests.

- a "vnet" namespace holding a bridge (the VNet); nodes are namespaces with a veth on it, addressed from one /16
  like AKS node-subnet mode (10.240.0.4, .35, .66); pod IPs come from the same /16, scattered across nodes;
- pods are namespaces plumbed like azure-vnet transparent mode: host veth `azv<hash>` with proxy_arp and a /32
  route in the node's main table; pod side `eth0` with the pod IP, `169.254.1.1` as gateway via a static
  neighbour entry to the host veth's MAC; both veth ends MTU 1500;
- the VNet delivers a pod IP sent in plaintext to the pod's node, as Azure's fabric does: every other node holds a
  permanent neighbour entry mapping the pod IP to that node's NIC (no node answers ARP for its pods' IPs), and with
  an IPv6 underlay the same for a dual-stack pod's IPv6 address, with a /128 route;
- each node runs its own `wgcni-node run` on the lab's backend (userspace: wireguard-go, unique interface name as
  /var/run/wireguard is not per namespace; kernel: in the VM tier), with pod records written through
  `cni_plugin.records` and peers fed through a peers file built from the hooks' own announcements (the stand-in
  for the Kubernetes sync of the next layer).

Everything is named with a per-run random suffix and removed by `close()`, also after failures.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cni_plugin.records import RecordStore, utc_now_rfc3339
from wgcni_lab.harness.netns import PYTHON, HookNode, Namespaces, in_ns, new_bridge_namespace, plug_into_bridge
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.harness.tempdir import short_temp_dir

PREFIX_LEN = 16
IPV6_VNET_PREFIX = "fd00:240::"  # an IPv6 underlay's /64: node 10.240.A.B is fd00:240::A:B


@dataclass
class Pod:
    name: str
    node: Node
    ip: str
    netns: str
    host_veth: str
    container_id: str
    ipv6: str | None = None  # a dual-stack pod's IPv6 address

    @property
    def ips(self) -> list[str]:
        return [self.ip, *([self.ipv6] if self.ipv6 else [])]


@dataclass
class Node(HookNode):
    """A lab node; its hook reads peers from `peers_file` and writes its announcement to `announce_file`."""

    pods: dict[str, Pod] = field(default_factory=dict)
    pod_ips_changed_at: float = 0.0
    ipv6: str | None = None  # with an IPv6 underlay: the node's IPv6 address on the VNet, its WireGuard endpoint

    @property
    def endpoint(self) -> str:
        return self.ipv6 or self.ip

    @property
    def node_ips(self) -> list[str]:
        return [self.ip, *([self.ipv6] if self.ipv6 else [])]

    @property
    def peers_file(self) -> Path:
        return self.directory / "peers.json"

    @property
    def announce_file(self) -> Path:
        return self.directory / "announce.json"


class Lab:
    def __init__(
        self, root: Path, listen_port: int = 51820, host_encryption: bool = True, backend: str = "userspace",
        underlay: str = "ipv4",
    ) -> None:
        self.root = root
        self.backend = backend  # the hooks' WireGuard backend: userspace (wireguard-go) or kernel
        self.suffix = secrets.token_hex(3)
        self.vnet = f"h3vnet-{self.suffix}"
        self.bridge = "vnet0"
        self.listen_port = listen_port
        self.host_encryption = host_encryption
        if underlay not in ("ipv4", "ipv6"):
            raise ValueError(f"underlay {underlay!r} is neither ipv4 nor ipv6")
        self.underlay = underlay  # ipv6: nodes also have an IPv6 address on the VNet, and WireGuard runs over it
        self.nodes: dict[str, Node] = {}
        self.namespaces = Namespaces()
        self._pod_counter = 0
        try:
            new_bridge_namespace(self.namespaces, self.vnet, self.bridge, ipv4_only=underlay == "ipv4")
        except BaseException:
            self.namespaces.close()  # a half-built VNet namespace is removed, not left behind
            raise

    # ---- topology ---------------------------------------------------------------------------------------

    def add_node(self, name: str, ip: str) -> Node:
        netns = f"h3{name}-{self.suffix}"
        wg = f"wg{name[:3]}{self.suffix}"[:15]
        directory = self.root / name
        directory.mkdir(parents=True)
        self.namespaces.add(netns)
        third, fourth = ip.split(".")[2:]
        ipv6 = str(ipaddress.IPv6Address(f"{IPV6_VNET_PREFIX}{third}:{fourth}")) if self.underlay == "ipv6" else None
        node = Node(name, ip, netns, wg, directory, ipv6=ipv6)
        # IPv4 VNet: no IPv6 link-local chatter on the capture (the WireGuard device keeps its IPv6 link-local
        # address, as on a real node)
        plug_into_bridge(self.vnet, self.bridge, f"up{name[:4]}{self.suffix}"[:15], netns, f"{ip}/{PREFIX_LEN}",
                         ipv4_only=ipv6 is None)
        if ipv6 is not None:
            node.exec("ip", "-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad")
        node.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        node.exec("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")  # strict, as on many distros
        node.exec("sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1")
        self.nodes[name] = node
        for other in self.nodes.values():
            for pod in other.pods.values():
                self._deliver(pod, to=[node])
        return node

    def _deliver(self, pod: Pod, to: list[Node] | None = None, deliver: bool = True) -> None:
        """The VNet delivering `pod`'s IP to its node's NIC (or, `deliver=False`, no longer) as seen from `to`
        (default: every other node)."""
        mac = json.loads(pod.node.exec("ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
        for node in to if to is not None else self.nodes.values():
            if node is pod.node:
                continue
            if deliver:
                node.exec("ip", "neigh", "replace", pod.ip, "lladdr", mac, "dev", "eth0", "nud", "permanent")
            else:
                node.exec("ip", "neigh", "del", pod.ip, "dev", "eth0", check=False)
            if pod.ipv6 and self.underlay == "ipv6":  # the pods' IPv6 range is not on the VNet's link: a route too
                if deliver:
                    node.exec("ip", "-6", "neigh", "replace", pod.ipv6, "lladdr", mac, "dev", "eth0", "nud",
                              "permanent")
                    node.exec("ip", "-6", "route", "replace", f"{pod.ipv6}/128", "dev", "eth0")
                else:
                    node.exec("ip", "-6", "route", "del", f"{pod.ipv6}/128", "dev", "eth0", check=False)
                    node.exec("ip", "-6", "neigh", "del", pod.ipv6, "dev", "eth0", check=False)

    def add_pod(self, node: Node, ip: str, name: str | None = None, record: bool = True,
                ipv6: str | None = None) -> Pod:
        """Plumb a pod as azure-vnet does; `record=False` leaves out the pod record (a pod that predates wgcni);
        `ipv6` makes it dual-stack (a /128 route on the host, `fe80::1` as its gateway, as azure-vnet's IPv6)."""
        self._pod_counter += 1
        name = name or f"pod{self._pod_counter}"
        netns = f"h3{name}-{self.suffix}"
        host_veth = "azv" + hashlib.sha1(f"default.{name}.{self.suffix}".encode()).hexdigest()[:11]
        self.namespaces.add(netns)
        node.exec("ip", "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        if ipv6 is None:
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
        if ipv6 is not None:
            node.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            node.exec("ip", "-6", "route", "add", f"{ipv6}/128", "dev", host_veth)
            in_ns(netns, "ip", "-6", "addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad")
            in_ns(netns, "ip", "-6", "neigh", "replace", "fe80::1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
            in_ns(netns, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        container_id = secrets.token_hex(16)
        pod = Pod(name, node, ip, netns, host_veth, container_id, ipv6)
        node.pods[name] = pod
        self._deliver(pod)
        if record:
            self.write_record(pod)
        return pod

    def write_record(self, pod: Pod) -> None:
        store = RecordStore(str(pod.node.state_dir))
        now = utc_now_rfc3339()
        record = {
            "format": 1, "network": "azure", "containerID": pod.container_id, "ifname": "eth0",
            "netns": f"/var/run/netns/{pod.netns}", "podNamespace": "default", "podName": pod.name,
            "podUID": None, "ips": pod.ips, "cniVersion": "0.3.0",
            "prevResult": {"cniVersion": "0.3.0", "interfaces": [{"name": "eth0", "mac": ""}],
                           "ips": [{"version": "4", "address": f"{pod.ip}/{PREFIX_LEN}", "gateway": "10.240.0.1"},
                                   *([{"version": "6", "address": f"{pod.ipv6}/128", "gateway": "fe80::1"}]
                                     if pod.ipv6 else [])]},
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
        self._deliver(pod, deliver=False)
        pod.node.exec("ip", "link", "del", pod.host_veth, check=False)
        self.namespaces.delete(pod.netns)
        del pod.node.pods[pod.name]

    # ---- hooks ------------------------------------------------------------------------------------------

    def write_config(self, node: Node, **overrides: object) -> None:
        config = {
            "nodeName": node.name, "stateDir": str(node.state_dir), "socket": str(node.socket),
            "interface": node.wg, "listenPort": self.listen_port, "endpoint": node.endpoint,
            "hostEncryption": self.host_encryption, "azure": False, "peersFile": str(node.peers_file),
            "backend": self.backend,
            "announceFile": str(node.announce_file), "resyncInterval": 30, "recordRescanInterval": 2,
            "logLevel": "info", **overrides,
        }
        node.config_file.write_text(json.dumps(config, indent=1))

    def start_hook(self, node: Node) -> None:
        """Start the node's hook (on the lab's default config unless one was written) and wait for its first pass."""
        if not node.config_file.exists():
            self.write_config(node)
        node.start_hook()
        wait_until(lambda: node.api("status")["generation"] > 0, 20, what=f"{node.name} first pass")
        # the announcement follows the first pass: sync_peers right after would miss this node
        wait_until(node.announce_file.exists, 20, what=f"{node.name} announcement")

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
                    "name": other_name, "publicKey": announcement["publicKey"], "endpoint": other.endpoint,
                    "endpointPort": announcement["endpointPort"], "nodeIPs": other.node_ips,
                    "podIPs": sorted(ip for pod in other.pods.values() for ip in pod.ips),
                    "podIPsChangedAt": other.pod_ips_changed_at,
                    **{field: announcement[field] for field in ("nextPublicKey", "keySwitchAt")
                       if field in announcement},
                })
            temporary = node.peers_file.with_suffix(".tmp")
            temporary.write_text(json.dumps({"nodes": entries}))
            os.replace(temporary, node.peers_file)

    def rotate_key(self, node: Node) -> tuple[str, str]:
        """`wgcni-node rotate-key` on `node`, its peers told as the API would tell them (the announcement before the
        switch time, then the new key); (old, new public key) once every device holds the new key and none the
        old."""
        def keys_on(other: Node) -> set[str]:
            dump = other.exec("wg", "show", other.wg, "dump").stdout.splitlines()
            return {dump[0].split("\t")[1]} | {line.split("\t")[0] for line in dump[1:]}

        old = node.exec("wg", "show", node.wg, "public-key").stdout.strip()
        node.exec(PYTHON, "-m", "node_hook.cli", "rotate-key", "--no-wait", "--config", str(node.config_file))
        new = node.api("status")["keyRotation"]["nextPublicKey"]
        if new in (None, old):
            raise AssertionError(f"{node.name}: rotate-key announced no next key")
        wait_until(lambda: json.loads(node.announce_file.read_text()).get("nextPublicKey") == new, 5,
                   what=f"{node.name}'s announcement of its next key", interval=0.01)
        self.sync_peers()
        wait_until(lambda: keys_on(node) & {old, new} == {new}, 15, what=f"{node.name} switched to its next key",
                   interval=0.02)
        self.sync_peers()
        wait_until(lambda: all(keys_on(other) & {old, new} == {new} for other in self.nodes.values()), 15,
                   what=f"every peer of {node.name} on its new key only", interval=0.05)
        return old, new

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
                    if covered != {ip for pod in other.pods.values() for ip in pod.ips} | set(other.node_ips):
                        return False
            return True

        def state() -> str:
            """What each hook reports and the end of its log, for a lab that does not converge."""
            parts = []
            for name, node in self.nodes.items():
                try:
                    status = node.api("status")
                    peers = {peer["node"]: (peer["programmed"], peer["allowedIPs"])
                             for peer in node.api("peers")["peers"]}
                    parts.append(f"{name}: programmed={status['dataplane_programmed']} inSync={status['inSync']} "
                                 f"lastError={status['lastError']!r} errors={status['errors']} peers={peers}")
                except Exception as error:  # noqa: BLE001 - the hook may be the problem
                    parts.append(f"{name}: no status ({error})")
                log = node.log_file.read_text(errors="replace") if node.log_file.exists() else ""
                parts.append(f"{name} log tail: {log[-1500:]}")
            return "\n".join(parts)

        wait_until(done, timeout, "all hooks converged", interval=0.1, detail=state)

    def wait_sessions(self, timeout: float = 15.0) -> float:
        """Every device has a WireGuard session with every peer (the greeting's handshake, or WireGuard's retry 5 s
        later when the greeting reached a node that did not know the sender yet); the seconds it took."""
        started = time.monotonic()

        def missing() -> list[str]:
            lacking = []
            for name, node in self.nodes.items():
                for line in node.exec("wg", "show", node.wg, "latest-handshakes").stdout.splitlines():
                    key, _, when = line.partition("\t")
                    if when.strip() == "0":
                        lacking.append(f"{name} -> {key}")
            return lacking

        wait_until(lambda: not missing(), timeout, "a session between every pair of nodes", interval=0.1,
                   detail=lambda: "no handshake yet: " + ", ".join(missing()))
        return time.monotonic() - started

    # ---- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop_hook()
            if node.config_file.exists():
                node.cleanup()
        self.namespaces.close()


@contextmanager
def running_lab(nodes: dict[str, str], pods: dict[str, list[str]], prepare: Callable[[Lab], None] = lambda lab: None,
                **options: object) -> Iterator[Lab]:
    """A lab (`options` as Lab takes them) with these nodes (name -> IP) and pods (node name -> pod IPs), `prepare`
    run on it before the hooks start, then every hook running with the peers synced and converged. Closed and its
    directory removed afterwards, also when set-up or the test fails."""
    with short_temp_dir("h3lab-") as root:
        lab = Lab(root, **options)  # type: ignore[arg-type]
        try:
            for name, ip in nodes.items():
                lab.add_node(name, ip)
            for name, ips in pods.items():
                for ip in ips:
                    lab.add_pod(lab.nodes[name], ip)
            prepare(lab)
            for node in lab.nodes.values():
                lab.start_hook(node)
            lab.sync_peers()
            lab.wait_converged()
            took = lab.wait_sessions()  # the first packet between nodes that just met may otherwise wait out a retry
            if took > 1.0:
                print(f"netns lab: a session between every pair after {took:.1f} s (a greeting was not answered)")
            yield lab
        finally:
            lab.close()


def _hosts(prefix: str) -> list[str]:
    network = ipaddress.ip_network(prefix)
    return [str(address) for address in network] if network.prefixlen >= network.max_prefixlen - 8 else []
