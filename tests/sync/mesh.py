"""A multi-node mesh for the sync tests: simulated AKS nodes whose hooks find each other only through the test
Kubernetes API server, with pods created the way kubelet creates them.

- a "vnet" network namespace holds a bridge (the VNet, 10.240.0.0/16) and the API server's second listener
  (10.240.255.254:6443, reached by every node); the test process talks to the same server on loopback;
- each node is a network namespace on the bridge (10.240.0.4, .5, ...; proxy ARP on its uplink stands in for the
  VNet delivering a pod IP to its VM) with a Node object in the API, its own
  containerd (CRI) whose CNI chain is AKS-shaped — `ptp` + `host-local` standing in for azure-vnet (a veth and
  a /32 host route per pod, pod IPs from the node subnet's /16), then `wgcni` (the built plugin, dist/bin/wgcni,
  as kubelet would run it), then `portmap` — and its own
  `wgcni-node run` on the userspace backend (unique interface name: /var/run/wireguard is shared), pointed at
  the API server by a kubeconfig and without a peers file, so `node_hook.cluster` is its peer source;
- assertions use independent tools: `wg show ... dump` and `ip route show table ...` in the node namespaces,
  ping from the pods' namespaces, tcpdump on the bridge.

Everything carries a per-run random suffix and is removed by `close()`, also after failures.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from node_hook.cluster import GROUP, PLURAL, VERSION, api_client_for_url
from tests.support.binaries import built_binary
from tests.sync.helpers import CRD, RBAC
from wgcni_lab.apiserver.server import ApiServer, NamespacedListener
from wgcni_lab.containerd import Containerd, Pod, link_cni_plugins, write_conflist
from wgcni_lab.harness.netns import HookNode, Namespaces, in_ns, new_bridge_namespace, plug_into_bridge, sh
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.harness.tempdir import short_temp_dir

SUBNET = ipaddress.IPv4Network("10.240.0.0/16")
API_ADDRESS = "10.240.255.254"
API_PORT = 6443
POD_GATEWAY = "10.240.255.1"  # ptp puts the IPAM gateway on every host veth; outside every node's pod range
ROUTE_TABLE = 51820
LISTEN_PORT = 51820
NETWORK = "azure"
SETUP_TIMEOUT = 60.0  # seconds a mesh may take to publish every key (3 hooks starting on a loaded 2-core machine)


@dataclass
class MeshPod:
    name: str
    node: MeshNode
    sandbox: Pod

    @property
    def ip(self) -> str:
        return self.sandbox.ip

    def ping(self, ip: str, count: int = 1, timeout: float = 2) -> bool:
        result = subprocess.run(
            ["nsenter", f"--net={self.sandbox.netns_proc_path}", "--", "ping", "-n", "-q", "-c", str(count),
             "-W", str(int(timeout)), ip], capture_output=True, text=True, timeout=timeout * count + 10)
        return result.returncode == 0


@dataclass
class MeshNode(HookNode):
    """A mesh node: its pods come from `pod_range` through its own containerd's CNI chain."""

    pod_range: tuple[str, str] = field(kw_only=True)  # first and last pod address
    containerd: Containerd | None = None
    pods: dict[str, MeshPod] = field(default_factory=dict)

    def wg_peers(self) -> dict[str, set[str]]:
        """Public key -> every address its AllowedIPs cover, as `wg show dump` reports them (not the hook)."""
        lines = sh("wg", "show", self.wg, "dump", check=False).stdout.splitlines()[1:]
        peers = {}
        for line in lines:
            fields = line.split("\t")
            allowed = fields[3]
            peers[fields[0]] = set() if allowed == "(none)" else _addresses(allowed.split(","))
        return peers

    def wg_routes(self) -> dict[str, str]:
        """Address -> route type ('unicast' through the WireGuard device, 'throw', ...) in the hook's table."""
        result = subprocess.run(["ip", "-n", self.netns, "-j", "route", "show", "table", str(ROUTE_TABLE)],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            if "does not exist" in result.stderr:  # no route in the table (yet)
                return {}
            raise RuntimeError(f"ip route show table {ROUTE_TABLE} in {self.netns}: {result.stderr.strip()}")
        routes = json.loads(result.stdout or "[]")
        return {address: route.get("type", "unicast") for route in routes
                for address in _addresses([route["dst"]])}


def programmed_everywhere(nodes: list[MeshNode], key: str, ip: str) -> bool:
    """`ip` is an AllowedIP of the peer with public key `key` and has a route on every one of `nodes`."""
    return all(ip in node.wg_peers().get(key, set()) and ip in node.wg_routes() for node in nodes)


def _addresses(prefixes: list[str]) -> set[str]:
    return {str(address) for prefix in prefixes for address in ipaddress.ip_network(prefix)}


class Mesh:
    """See the module docstring. `add_node` and `run_pod` build it; `expected_*` say what must be programmed."""

    def __init__(self, root: Path, bookmark_interval: float = 1.0):
        self.root = root
        self.suffix = secrets.token_hex(3)
        self.vnet = f"s4vnet-{self.suffix}"
        self.bridge = "br0"
        self.nodes: dict[str, MeshNode] = {}
        self.namespaces = Namespaces()
        self.server: ApiServer | None = None
        self._uid_counter = 0
        try:
            new_bridge_namespace(self.namespaces, self.vnet, self.bridge)
            in_ns(self.vnet, "ip", "addr", "add", f"{API_ADDRESS}/{SUBNET.prefixlen}", "dev", self.bridge)
            self.server = ApiServer(crds=[CRD], manifests=RBAC, bookmark_interval=bookmark_interval,
                                    also_listen=[NamespacedListener(self.vnet, API_ADDRESS, API_PORT)]).start()
            self.api_client = api_client_for_url(self.server.url, self.server.admin_token,
                                                 ca_file=self.server.ca_file)
            self.core = client.CoreV1Api(self.api_client)
            self.custom = client.CustomObjectsApi(self.api_client)
            self.plugin = Path(built_binary("wgcni"))
        except BaseException:  # what was made before the failure is removed, not left behind
            if self.server is not None:
                self.server.stop()
            self.namespaces.close()
            raise

    # ---- nodes ------------------------------------------------------------------------------------------

    def add_node(self, name: str, index: int, labels: dict[str, str] | None = None) -> MeshNode:
        """Node `index` gets 10.240.0.(4+index) and the pod range 10.240.(1+index).10-.250."""
        ip = str(SUBNET.network_address + 4 + index)
        pod_range = (f"10.240.{1 + index}.10", f"10.240.{1 + index}.250")
        netns = f"s4{name}-{self.suffix}"
        directory = self.root / name
        directory.mkdir()
        self.namespaces.add(netns)
        node = MeshNode(name, ip, netns, f"wgs{index}{self.suffix}"[:15], directory, pod_range=pod_range)
        self.nodes[name] = node
        plug_into_bridge(self.vnet, self.bridge, f"s4u{index}{self.suffix}"[:15], netns, f"{ip}/{SUBNET.prefixlen}")
        # The Azure VNet delivers a pod IP to the VM that holds it; here the node answers ARP on the bridge for
        # the pods it routes (their /32 routes point at veths), which is what plaintext (opted-out) paths need.
        node.exec("sysctl", "-qw", "net.ipv4.conf.eth0.proxy_arp=1")
        self.core.create_node(client.V1Node(
            metadata=client.V1ObjectMeta(name=name, labels=labels),
            status=client.V1NodeStatus(addresses=[client.V1NodeAddress(type="InternalIP", address=ip)])))
        self._start_containerd(node)
        self.write_hook_config(node)
        node.start_hook(env={"KUBECONFIG": str(self.write_kubeconfig(node))}, timeout=30)
        return node

    def write_kubeconfig(self, node: MeshNode) -> Path:
        """The node's kubeconfig: the cluster CA and the token file the kubelet keeps for wgcni's pod, a
        service-account token bound to the node's Node."""
        assert self.server is not None
        kubeconfig = self.server.kubeconfig(server=f"https://{API_ADDRESS}:{API_PORT}")
        kubeconfig["users"][0]["user"] = {"tokenFile": str(self.rotate_token(node))}
        path = node.directory / "kubeconfig"
        path.write_text(json.dumps(kubeconfig))
        return path

    def rotate_token(self, node: MeshNode) -> Path:
        """A new token bound to the node's Node as it is now (the kubelet's next one; the hook re-reads the file)."""
        assert self.server is not None
        token = node.directory / "token"
        token.write_text(self.server.node_token(node.name))
        token.chmod(0o600)
        return token

    def _start_containerd(self, node: MeshNode) -> None:
        node.containerd = Containerd(node.directory / "ctrd", name=node.name, netns=node.netns)
        link_cni_plugins(node.containerd.cni_bin_dir, {"wgcni": self.plugin})
        self.write_conflist(node, *node.pod_range)
        node.containerd.start()
        node.containerd.wait_cni_config()

    def write_conflist(self, node: MeshNode, range_start: str, range_end: str) -> None:
        """AKS-shaped chain (name "azure", cniVersion 1.0.0): ptp + host-local for azure-vnet, wgcni, portmap."""
        conflist = {
            "cniVersion": "1.0.0", "name": NETWORK,
            "plugins": [
                {"type": "ptp", "ipMasq": False, "mtu": 1500, "ipam": {
                    "type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": str(SUBNET), "rangeStart": range_start, "rangeEnd": range_end,
                                 "gateway": POD_GATEWAY}]]}},
                {"type": "wgcni", "stateDir": str(node.state_dir), "hookSocket": str(node.socket),
                 "logFile": str(node.directory / "plugin.log")},
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            ],
        }
        node.containerd.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        write_conflist(node.containerd.cni_conf_dir, conflist)

    def use_pod_range(self, node: MeshNode, range_start: str, range_end: str) -> None:
        """Rewrite the node's conflist with another host-local range and wait until containerd loaded it."""
        self.write_conflist(node, range_start, range_end)

        def loaded(config: dict) -> bool:
            return range_start in json.dumps(config)

        node.containerd.wait_cni_config(loaded)

    def write_hook_config(self, node: MeshNode) -> None:
        node.config_file.write_text(json.dumps({
            "nodeName": node.name, "stateDir": str(node.state_dir), "socket": str(node.socket),
            "interface": node.wg, "listenPort": LISTEN_PORT, "endpoint": node.ip, "routeTable": ROUTE_TABLE,
            "hostEncryption": True, "azure": False, "podInterfacePrefixes": ["veth"],
            "resyncInterval": 30, "recordRescanInterval": 2, "logLevel": "info",
        }))

    # ---- pods -------------------------------------------------------------------------------------------

    def run_pod(self, node: MeshNode, name: str) -> MeshPod:
        self._uid_counter += 1
        sandbox = node.containerd.run_pod(name, "default", f"{self.suffix}-{self._uid_counter:04d}")
        pod = MeshPod(name, node, sandbox)
        node.pods[name] = pod
        return pod

    def delete_pod(self, pod: MeshPod) -> None:
        pod.node.containerd.stop_pod(pod.sandbox.id)
        del pod.node.pods[pod.name]

    # ---- what must be programmed ------------------------------------------------------------------------

    def keys(self) -> dict[str, str]:
        """Node name -> the public key it published."""
        items = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        return {item["metadata"]["name"]: (item.get("status") or {}).get("publicKey", "") for item in items}

    def publication_detail(self) -> str:
        """What each node's hook says of its own publication (for a set-up that timed out)."""
        parts = []
        for name, node in self.nodes.items():
            try:
                parts.append(f"{name}: {node.api('status').get('publication')}")
            except OSError as error:
                parts.append(f"{name}: the hook does not answer ({error})")
        return "; ".join(parts)

    def encrypted_nodes(self) -> set[str]:
        return {name for name, key in self.keys().items() if key and name in self.nodes}

    def mesh_matches_truth(self, nodes: list[MeshNode] | None = None) -> bool | str:
        """Every node's WireGuard peers and table hold exactly the other nodes' current pods: a peer per
        encrypted node with exactly its pod IPs and node IP, a device route for each of those, no device route
        for anything else (an opted-out node has no peer at all). Returns True or what differs."""
        try:
            keys = self.keys()
        except Exception as error:  # noqa: BLE001 - the API server may be restarting under a fault test
            return f"API not answering: {error}"
        encrypted = {name for name, key in keys.items() if key and name in self.nodes}
        for node in nodes or list(self.nodes.values()):
            peers = node.wg_peers()
            routes = node.wg_routes()
            if node.name not in encrypted:  # an opted-out node sends everything in plaintext
                expected_peers: dict[str, set[str]] = {}
            else:  # host encryption: a peer's AllowedIPs and device routes are its pods and its node IP
                expected_peers = {keys[other.name]: {pod.ip for pod in other.pods.values()} | {other.ip}
                                  for other in self.nodes.values() if other is not node and other.name in encrypted}
            if peers != expected_peers:
                return f"{node.name}: peers {peers} != {expected_peers}"
            want_dev = set().union(*expected_peers.values()) if expected_peers else set()
            have_dev = {dst for dst, kind in routes.items() if kind == "unicast"}
            if have_dev != want_dev:
                return f"{node.name}: device routes {sorted(have_dev)} != {sorted(want_dev)}"
        return True

    # ---- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        errors: list[str] = []
        for node in self.nodes.values():  # every hook starts stopping at once; each is then waited for
            if node.hook is not None and node.hook.poll() is None:
                node.hook.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.stop_hook()
                if node.containerd is not None:
                    node.containerd.stop()
                if node.config_file.exists():
                    node.cleanup()
            except Exception as error:  # noqa: BLE001 - keep tearing down the rest, report at the end
                errors.append(f"{node.name}: {error}")
        if self.server is not None:
            self.server.stop()
            self.api_client.close()
        self.namespaces.close()
        if errors:
            raise RuntimeError("; ".join(errors))


@contextmanager
def running_mesh(names: list[str], timeout: float) -> Iterator[Mesh]:
    """A mesh of these nodes (the i-th gets index i) whose keys are all published within `timeout` (at least
    SETUP_TIMEOUT: a set-up wait, not a measurement). Closed and its directory removed afterwards, also when set-up or
    the test fails."""
    with short_temp_dir("s4m-") as root:
        mesh = Mesh(root)
        try:
            for index, name in enumerate(names):
                mesh.add_node(name, index)
            wait_until(lambda: len(mesh.encrypted_nodes()) == len(names), max(timeout, SETUP_TIMEOUT),
                       f"{len(names)} published keys", detail=mesh.publication_detail)
            yield mesh
        finally:
            mesh.close()
