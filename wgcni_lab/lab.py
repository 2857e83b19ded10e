"""The local lab's topology and lifecycle: an AKS-like cluster of network-namespace nodes on one machine.

Layout (everything is named after the lab's random id, so two labs never collide):
- a VNet namespace `wgl-<id>-vnet` holding Azure's fabric (`wgcni_lab.fabric`): it answers every ARP request with
  the gateway MAC and routes each address to the NIC that holds it (a node's IP and its secondary pod IPs), drops
  addresses no NIC holds and, as Azure's underlay, DF packets over 1400 bytes. It is not in the root namespace, so
  lab traffic never touches the host's links, sysctls or firewall;
- a client VM outside the cluster, `wgl-<id>-client` (10.240.200.4, on the fabric, no wgcni);
- N nodes, each a network namespace `wgl-<id>-node-<i>` with `eth0` on the fabric and an AKS node-subnet address
  from 10.240.0.0/16 (10.240.0.4, .35, .66 ...: AKS reserves maxPods=30 secondary IPs after each node), plus a
  private mount namespace held by a small holder process: its own sysfs, its own empty tmpfs `/run` (so
  `/run/wgcni`, `/run/containerd` and `/var/run/wireguard` are per node and every node uses the default interface
  name `wgcni0`) and copy-on-write overlays of `/etc`, `/opt`, `/var/lib` and `/var/log` (its own `/etc/cni/net.d`,
  `/opt/cni/bin`, `/var/lib/wgcni`, `/var/lib/cni`) whose upper layers are the node's OS disk,
  `<lab dir>/nodes/<name>/disk`: a node reboot (wgcni_lab.lifecycle) loses `/run` and all kernel state but keeps the
  disk, a reimage wipes it;
- per node a private containerd (CRI) as on an AKS node, whose conflist is AKS-shaped (`"name": "azure"`,
  cniVersion 0.3.0, `azure-vnet` then `portmap`): the `azure-vnet` executable in the node's `/opt/cni/bin` is the
  reference `ptp` plugin with `host-local` IPAM, which gives pods veths and /32 host routes as azure-vnet's
  transparent mode does. Pod IPs come from the same /16 as the nodes and are scattered across nodes the way
  Azure's node-subnet mode ends up after churn: the AKS secondary-IP slots are dealt round-robin, so no node owns
  an aggregatable block;
- per node what the DaemonSet runs (conf/daemonset.yaml from the wgcni image through the node's containerd,
  wgcni_lab.kubelet, or the bundles of dist/ as bare processes, wgcni_lab.lifecycle), with one config for every
  node as a ConfigMap carries it (the node's name from NODE_NAME): `wgcni-node install-cni --wait` (the init
  container), then `wgcni-node run` on the userspace backend, host encryption on, and `wgcni-node install-cni
  --watch` (which re-inserts the entry when the conflist is rewritten, as Azure CNS does);
  the hook syncs peers through the test API server (`wgcni_lab.apiserver`), which the lab daemon serves on
  127.0.0.1:6443 inside every node namespace (so API traffic never crosses the fabric); with Azure's underlay
  (the default; `up --no-azure-underlay` turns it off) the hooks run with `azure: true`, so their auto MTU is 1340;
- `up --ip-family dual`: every node, pod and the client also has an IPv6 address, the twin of its IPv4 one
  (`ipv6_twin`: the VNet's fd00:10:240::/64; Overlay pods a /120 per node of fd12:3456:789a::/64, AKS's default),
  given to pods by a second host-local range set with Azure's link-local IPv6 gateway; the fabric routes IPv6 as
  it routes IPv4 (`wgcni_lab.fabric`);
- per node what kube-proxy (iptables mode, as on AKS) programs for the lab's Services (`wgcni_lab.services`);
- pods are created as kubelet creates them: CRI RunPodSandbox on the node's containerd (StopPodSandbox +
  RemovePodSandbox to delete); a hostNetwork pod is a sandbox with the node's network namespace (no CNI call, the
  node's IP). The sandbox labels say whether the pod is hostNetwork and whether its sandbox was made before wgcni
  was installed on the node (then it has no pod record).

State: `<lab dir>/state.json` (default lab dir /run/wgcni-lab, or $WGCNI_LAB_DIR) is written *before* each thing
is created, so `teardown()` can remove everything a crashed or half-finished `up` left, from what it finds on the
machine: processes whose command line names the lab dir or that live in a lab namespace, the runtimes' cgroups,
the namespaces, and the lab dir. Pods are not kept in the state: containerd is asked (ListPodSandbox); Services are.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin.files import write_atomically
from node_hook.config import Settings
from wgcni_lab.cleanup import kill_processes, process_state, process_table, remove_tree, with_descendants
from wgcni_lab.polling import wait_until

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAB_DIR = Path("/run/wgcni-lab")
LAB_DIR_ENV = "WGCNI_LAB_DIR"
STATE_FILE = "state.json"
KUBECONFIG_FILE = "kubeconfig"  # the administrator's kubeconfig for kubectl (`wgcni-lab kubeconfig`), 0600
STATE_FORMAT = 1

DEFAULT_PLUGIN = REPO / "dist" / "wgcni"  # the one-directory bundle `make build` produces (install-cni copies it)
DEFAULT_HOOK = REPO / "dist" / "bin" / "wgcni-node"
DIST_BIN = REPO / "dist" / "bin"  # on PATH inside nodes, as the DaemonSet image has the binaries on PATH
CRD_FILE = REPO / "conf" / "crd.yaml"
RBAC_FILE = REPO / "conf" / "rbac.yaml"  # the hook's RBAC and admission policy, which the lab's API server enforces
TOKEN_TTL = 3600.0  # seconds a DaemonSet pod's service-account token is valid (the kubelet's default request)

VNET = ipaddress.ip_network("10.240.0.0/16")
GATEWAY = "10.240.0.1"  # Azure's subnet gateway; ptp puts it on each pod's host-side veth
FIRST_NODE_HOST = 4  # Azure reserves .0-.3 of a subnet
MAX_PODS = 30  # AKS default maxPods with Azure CNI: each node gets its address + 30 secondary IPs
MAX_NODES = 64
OVERLAY_POD_CIDR = ipaddress.IPv4Network("10.244.0.0/16")  # Azure CNI Overlay's default pod CIDR: a /24 per node
MODES = ("node-subnet", "overlay")
IP_FAMILIES = ("ipv4", "dual")
# Dual-stack: each lab IPv4 address has an IPv6 twin (`ipv6_twin`), in the VNet's IPv6 space or AKS's default IPv6
# pod CIDR (a /120 per node), and Azure's IPv6 default gateway, a link-local address with the gateway MAC
VNET6 = ipaddress.IPv6Network("fd00:10:240::/64")
OVERLAY_POD_CIDR6 = ipaddress.IPv6Network("fd12:3456:789a::/64")
OVERLAY_NODE_PREFIX6 = 120
GATEWAY6 = "fe80::1234:5678:9abc"
NODE_UPLINK_MTU = 1500
API_PORT_IN_NODE = 6443
NETWORK = "azure"
HOOK_DEFAULTS = Settings(node_name="lab")
WG_INTERFACE = HOOK_DEFAULTS.interface
WG_PORT = HOOK_DEFAULTS.listen_port
HOOK_SOCKET_IN_NODE = HOOK_DEFAULTS.socket
NODE_CONFIG_DIR = Path("/etc/wgcni")  # the DaemonSet mounts the ConfigMap's config.yaml here
POD_VETH_PREFIX = "veth"  # ptp names host-side veths veth<hex> (azure-vnet: azv<hash>)
POD_NAMESPACE = "default"
POD_LABELS = {"app.kubernetes.io/part-of": "wgcni-lab"}
HOST_NETWORK_LABEL = "wgcni-lab/host-network"  # sandbox labels: "true" or absent
PREDATES_INSTALL_LABEL = "wgcni-lab/predates-install"
KUBELET_RESTART_BACKOFF = (10.0, 300.0)  # seconds: kubelet's crash-loop backoff, first delay and cap
_POD_NAME = re.compile(r"^(?P<node>node-\d+)-pod(?P<index>\d+)$")

# Run by the holder of a node's mount namespace (argv: lab dir, the node's disk dir). The lab dir is reached again
# through the working directory after /run is replaced, and bound back at its own path: containerd's state and the
# disk must have the same path inside the node and outside. /sys is the node's own sysfs (its eth0's MTU, as
# `ip netns exec` does it), with the host's cgroup tree moved back under it for runc.
NODE_MOUNTS_SCRIPT = r"""
set -e
lab_dir="$1"
disk="$2"
cd "$lab_dir"
mount -t tmpfs -o mode=0755 wgcni-lab-node /run
if [ ! -d "$lab_dir" ]; then mkdir -p "$lab_dir" && mount --no-canonicalize --bind . "$lab_dir"; fi
for directory in etc opt var/lib var/log; do
  layer="$disk/$(echo "$directory" | tr / -)"
  mkdir -p "$layer/upper" "$layer/work"
  mount -t overlay wgcni-lab-node -o "lowerdir=/$directory,upperdir=$layer/upper,workdir=$layer/work" "/$directory"
done
mkdir -p /run/.wgcni-lab-node/cgroup
mount --rbind /sys/fs/cgroup /run/.wgcni-lab-node/cgroup
mount -t sysfs wgcni-lab-node /sys
mount --move /run/.wgcni-lab-node/cgroup /sys/fs/cgroup
mkdir -p /etc/cni/net.d /opt/cni/bin /var/lib/cni /var/lib/wgcni /run/containerd /run/wgcni /run/wireguard
cd /
echo ready
exec sleep infinity </dev/null >/dev/null 2>&1
"""


class LabError(RuntimeError):
    """A lab operation failed; the message is one line a person can act on."""


# ---- state ---------------------------------------------------------------------------------------------------------

@dataclass
class NodeState:
    name: str
    ip: str
    netns: str
    pod_ips: list[str]  # IPv4; with a dual-stack lab each has its IPv6 twin (`ipv6_twin`) on the same node
    ipv6: str = ""  # the node's IPv6 address (dual-stack), "" in an IPv4 lab
    holder_pid: int = 0
    hook_pid: int = 0
    daemonset: dict[str, Any] = field(default_factory=dict)  # the DaemonSet pod as kubectl shows it (lifecycle)

    @property
    def ips(self) -> list[str]:
        """The node's addresses: its IPv4 one, and its IPv6 one in a dual-stack lab."""
        return [self.ip, self.ipv6] if self.ipv6 else [self.ip]

    def directory(self, lab_dir: Path) -> Path:
        return lab_dir / "nodes" / self.name

    def disk_dir(self, lab_dir: Path) -> Path:
        """The node's OS disk: the upper layers of its /etc, /opt, /var/lib and /var/log."""
        return self.directory(lab_dir) / "disk"

    def containerd_dir(self, lab_dir: Path) -> Path:
        return self.directory(lab_dir) / "containerd"

    @property
    def root(self) -> Path:
        """The node's file system as the host reaches it (through the holder of its mount namespace)."""
        return Path(f"/proc/{self.holder_pid}/root")

    @property
    def mount_namespace(self) -> str:
        return f"/proc/{self.holder_pid}/ns/mnt"

    @property
    def hook_socket(self) -> Path:
        """The hook's socket, reachable from the host."""
        return self.root / str(HOOK_SOCKET_IN_NODE).lstrip("/")


@dataclass
class ServiceState:
    """A Service as kube-proxy sees it: its ClusterIP and port, NodePort (0: none) with its external traffic policy,
    and its endpoints ({"pod", "ip", "node"}, resolved when the Service was added)."""
    name: str
    cluster_ip: str
    port: int
    node_port: int
    external_traffic_policy: str
    endpoints: list[dict[str, str]]


@dataclass
class LabState:
    id: str
    lab_dir: str
    vnet_netns: str
    nodes: list[NodeState]
    cgroup_prefix: str
    plugin: str
    hook: str
    client_netns: str = ""
    azure_underlay: bool = True  # the fabric's DF limit and `azure: true` in the hooks' config
    services: list[ServiceState] = field(default_factory=list)
    daemon_pid: int = 0
    apiserver_url: str = ""
    phase: str = "creating"  # creating -> up
    settings: dict[str, Any] = field(default_factory=dict)  # `up --setting`s, merged into every node's hook config
    restart_backoff: tuple[float, float] = KUBELET_RESTART_BACKOFF  # the DaemonSet pod's: first delay, cap
    daemonset_installed: bool = False  # wgcni's DaemonSet runs on every node (after the pods that predate it)
    daemonset_image: str = ""  # the image's OCI archive: the DaemonSet runs from it (kubelet); "": bare processes
    apiserver_node: str = ""  # the node whose IP serves the API server (`up --apiserver-on`); "": loopback in each
    mode: str = "node-subnet"  # Azure CNI's: pod IPs from the VNet (node-subnet) or a /24 of a pod CIDR (overlay)
    ip_family: str = "ipv4"  # "dual": every node and pod has an IPv6 address too
    format: int = STATE_FORMAT

    @property
    def path(self) -> Path:
        return Path(self.lab_dir)

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(n.name for n in self.nodes)})")

    @property
    def dual_stack(self) -> bool:
        return self.ip_family == "dual"

    def cgroup_parent(self, node: NodeState) -> str:
        return f"/{self.cgroup_prefix}-{node.name}"

    def save(self) -> None:
        write_atomically(self.path / STATE_FILE, (json.dumps(asdict(self), indent=2) + "\n").encode(), 0o644,
                         temporary_prefix=f".{STATE_FILE}.", durable=False)


def lab_dir_from_environment() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def load_state(lab_dir: Path) -> LabState | None:
    """The lab's state, or None when no lab (not even a half-created one) is there."""
    try:
        raw = json.loads((lab_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise LabError(f"{lab_dir / STATE_FILE} is unreadable ({error}); remove {lab_dir} by hand") from None
    if raw.get("format") != STATE_FORMAT:
        raise LabError(f"{lab_dir / STATE_FILE} has format {raw.get('format')!r}, this wgcni-lab reads "
                       f"{STATE_FORMAT}; remove {lab_dir} by hand")
    raw["nodes"] = [NodeState(**node) for node in raw["nodes"]]
    raw["services"] = [ServiceState(**service) for service in raw.get("services", [])]
    if "restart_backoff" in raw:
        raw["restart_backoff"] = tuple(raw["restart_backoff"])
    return LabState(**raw)


def require_state(lab_dir: Path) -> LabState:
    state = load_state(lab_dir)
    if state is None:
        raise LabError(f"no lab in {lab_dir}: start one with `wgcni-lab up`")
    return state


# ---- addressing -----------------------------------------------------------------------------------------------------

def node_ip(index: int) -> str:
    """AKS node-subnet mode: node i (0-based) at .4 + 31*i, each followed by its 30 secondary IPs."""
    return str(VNET.network_address + FIRST_NODE_HOST + (MAX_PODS + 1) * index)


def pod_ip_pools(nodes: int) -> list[list[str]]:
    """Each node's pod IPs: the AKS secondary-IP slots of all nodes, dealt round-robin, so pod IPs are scattered
    across nodes (no node holds an aggregatable block), all from the nodes' /16."""
    slots = [str(ipaddress.ip_address(node_ip(index)) + offset)
             for index in range(nodes) for offset in range(1, MAX_PODS + 1)]
    return [slots[index::nodes] for index in range(nodes)]


def overlay_block(index: int) -> ipaddress.IPv4Network:
    """Overlay: the /24 of the pod CIDR that Azure gives node `index` (0-based)."""
    return list(OVERLAY_POD_CIDR.subnets(new_prefix=24))[index]


def overlay_pool(block: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    """Overlay: a node's pod IPs, the first MAX_PODS hosts of its /24 after the ones Azure reserves."""
    return [str(block.network_address + FIRST_NODE_HOST + offset) for offset in range(MAX_PODS)]


def ipv6_twin(ip: str) -> str:
    """The IPv6 address a dual-stack lab pairs with a lab IPv4 address, readable from it: a VNet address 10.240.a.b
    is fd00:10:240::a:b (10.240.0.35: fd00:10:240::35); an Overlay pod IP 10.244.i.h is host h of node i's /120
    of the IPv6 pod CIDR (10.244.1.4: fd12:3456:789a::104)."""
    address = ipaddress.IPv4Address(ip)
    third, fourth = address.packed[2:]
    if address in VNET:
        return str(ipaddress.IPv6Address(f"{str(VNET6.network_address).rstrip(':')}::{third}:{fourth}"))
    if address in OVERLAY_POD_CIDR:
        return str(OVERLAY_POD_CIDR6.network_address + (third << (128 - OVERLAY_NODE_PREFIX6)) + fourth)
    raise LabError(f"{ip} is in neither the VNet {VNET} nor the pod CIDR {OVERLAY_POD_CIDR}")


def base_conflist(pool: list[str], mode: str = "node-subnet", dual_stack: bool = False) -> dict[str, Any]:
    """The node's conflist as AKS provisioning writes it (name "azure", cniVersion 0.3.0, azure-vnet then portmap),
    where `azure-vnet` is ptp + host-local over the node's pod IPs: node-subnet, one single-address range per IP of
    the VNet (azure-linux.conflist); overlay, one range over the node's /24, with the Overlay conflist's
    `ipsToRouteViaHost` (azure-linux-swift-overlay.conflist, where CNS hands out the /24's IPs; the dual-stack
    Overlay conflist is the same). Dual-stack: a second range set, the IPv6 twins, so each pod gets one of each,
    with Azure's link-local IPv6 gateway as azure-vnet gives pods (ptp puts it on the host veth: no global IPv6
    address of the node's own there)."""
    if mode == "overlay":
        block = ipaddress.ip_network(f"{pool[0]}/24", strict=False)
        ranges = [{"subnet": str(block), "rangeStart": pool[0], "rangeEnd": pool[-1],
                   "gateway": str(block.network_address + 1)}]
        block6 = ipaddress.ip_network(f"{ipv6_twin(pool[0])}/{OVERLAY_NODE_PREFIX6}", strict=False)
        ranges6 = [{"subnet": str(block6), "rangeStart": ipv6_twin(pool[0]), "rangeEnd": ipv6_twin(pool[-1]),
                    "gateway": GATEWAY6}]
        extra: dict[str, Any] = {"ipsToRouteViaHost": ["169.254.20.10"]}
    else:
        ranges = [{"subnet": str(VNET), "rangeStart": ip, "rangeEnd": ip, "gateway": GATEWAY} for ip in pool]
        ranges6 = [{"subnet": str(VNET6), "rangeStart": ipv6_twin(ip), "rangeEnd": ipv6_twin(ip), "gateway": GATEWAY6}
                   for ip in pool]
        extra = {}
    range_sets = [ranges, ranges6] if dual_stack else [ranges]
    default_routes = [{"dst": "0.0.0.0/0"}, *([{"dst": "::/0"}] if dual_stack else [])]
    return {
        "cniVersion": "0.3.0",
        "name": NETWORK,
        "plugins": [
            {"type": "azure-vnet", "mode": "transparent", **extra, "ipMasq": False, "mtu": NODE_UPLINK_MTU,
             "ipam": {"type": "host-local", "ranges": range_sets, "routes": default_routes}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def hook_config(azure_underlay: bool, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hook's settings, as the DaemonSet's ConfigMap would carry them for the lab: one config for every node,
    as on AKS (the node name comes from NODE_NAME, the endpoint from the node's default route), `azure` following
    the lab's underlay, with `settings` (file keys, `up --setting`) merged over the lab's."""
    return {
        "backend": "userspace",
        "azure": azure_underlay,
        "hostEncryption": True,
        "podInterfacePrefixes": [POD_VETH_PREFIX],
        "metricsAddress": "127.0.0.1:9820",
        "logLevel": "info",
        **(settings or {}),
    }


def api_host_in_node(state: LabState) -> str:
    """Where a node reaches the API server: loopback (the lab daemon serves it in every node, as AKS's managed API
    server is outside the encrypted set), or with `up --apiserver-on` that node's IP, across the fabric."""
    return state.node(state.apiserver_node).ip if state.apiserver_node else "127.0.0.1"


def kubeconfig(state: LabState, node: NodeState, ca_pem: bytes,
               token_file: Path = NODE_CONFIG_DIR / "token") -> dict[str, Any]:
    """The hook's kubeconfig: the cluster CA and the token file the kubelet keeps (wgcni-node's service account,
    bound to the node), `token_file` as the hook sees it."""
    server = f"https://{api_host_in_node(state)}:{API_PORT_IN_NODE}"
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server,
                                                 "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": node.name, "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": node.name}}],
    }


# ---- commands in namespaces -----------------------------------------------------------------------------------------

def run(argv: list[str], timeout: float = 60, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: not installed (run `make deps`)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout}s") from None
    if check and result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {message[-1] if message else ''}")
    return result


def in_netns(netns: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", netns, *argv], **kwargs)


def node_enter_argv(node: NodeState) -> list[str]:
    """nsenter into a node: its network namespace and its private mount namespace."""
    return ["nsenter", f"--net=/run/netns/{node.netns}", f"--mount={node.mount_namespace}", "--"]


def node_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KUBERNETES_")}
    env["PATH"] = f"{DIST_BIN}:{env.get('PATH', '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def in_node(node: NodeState, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in the node (its netns and mount namespace)."""
    return run([*node_enter_argv(node), *argv], env=node_env(), **kwargs)


# ---- bring-up steps (run by the lab daemon, wgcni_lab.daemon) -------------------------------------------------------

def node_names(count: int) -> list[str]:
    """The names `up --nodes count` gives its nodes."""
    return [f"node-{index + 1}" for index in range(count)]


def new_state(lab_dir: Path, nodes: int, plugin: Path, hook: Path, settings: dict[str, Any] | None = None,
              restart_backoff: tuple[float, float] = KUBELET_RESTART_BACKOFF, azure_underlay: bool = True,
              mode: str = "node-subnet", ip_family: str = "ipv4") -> LabState:
    if mode not in MODES:
        raise LabError(f"mode {mode!r} is none of {', '.join(MODES)}")
    if ip_family not in IP_FAMILIES:
        raise LabError(f"IP family {ip_family!r} is none of {', '.join(IP_FAMILIES)}")
    lab_id = secrets.token_hex(3)
    pools = pod_ip_pools(nodes) if mode == "node-subnet" else [overlay_pool(overlay_block(i)) for i in range(nodes)]
    return LabState(
        id=lab_id,
        lab_dir=str(lab_dir),
        vnet_netns=f"wgl-{lab_id}-vnet",
        client_netns=f"wgl-{lab_id}-client",
        nodes=[NodeState(name=name, ip=node_ip(index), netns=f"wgl-{lab_id}-{name}", pod_ips=pools[index],
                         ipv6=ipv6_twin(node_ip(index)) if ip_family == "dual" else "")
               for index, name in enumerate(node_names(nodes))],
        cgroup_prefix=f"wgcni-lab-{lab_id}",
        plugin=str(plugin),
        hook=str(hook),
        azure_underlay=azure_underlay,
        settings=dict(settings or {}),
        restart_backoff=restart_backoff,
        mode=mode,
        ip_family=ip_family,
    )


def create_node_network(state: LabState, node: NodeState) -> None:
    """The node's namespace with eth0 on the fabric, which delivers the node's IP and its pod IPs to it (IPv6 off in
    an IPv4 lab, so the fabric carries only what the lab sends)."""
    from wgcni_lab import fabric

    run(["ip", "netns", "add", node.netns])
    in_netns(node.netns, ["sysctl", "-qw", *fabric.ipv6_sysctls(state.dual_stack)])
    in_netns(node.netns, ["ip", "link", "set", "lo", "up"])
    fabric.attach_node(state, node)


def remove_node_network(state: LabState, node: NodeState, timeout: float = 10.0) -> None:
    """Delete the node's network namespace with everything in it (its processes already killed) and wait until the
    kernel has destroyed it (it does so asynchronously): its VNet link is gone, so `create_node_network` can attach
    the node again."""
    if node.netns in lab_namespaces(state):
        # A powered-off kernel keeps no connection: the closed sockets of its killed processes would stay as orphans
        # retransmitting their FIN (for minutes when the peer's answer goes into a tunnel this node no longer has),
        # and each holds the namespace, so its VNet link, alive.
        in_netns(node.netns, ["ss", "--kill", "--tcp", "--all"], check=False)
        run(["ip", "netns", "delete", node.netns])

    def detached() -> bool:
        return run(["ip", "-n", state.vnet_netns, "link", "show", node.name], check=False).returncode != 0

    wait_until(detached, timeout, f"{node.name}'s VNet link to go with its namespace", interval=0.05,
               error=LabError)


def start_node_mounts(state: LabState, node: NodeState) -> subprocess.Popen[str]:
    """Start the holder of the node's private mount namespace; returns once its mounts are in place."""
    holder = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{node.netns}", "--", "unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", NODE_MOUNTS_SCRIPT, f"wgcni-lab-{node.name}", state.lab_dir,
         str(node.disk_dir(state.path))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    node.holder_pid = holder.pid
    state.save()
    line = holder.stdout.readline().strip() if holder.stdout else ""
    if line != "ready":
        holder.kill()
        error = holder.stderr.read().strip() if holder.stderr else ""
        holder.wait()
        raise LabError(f"{node.name}: setting up its mount namespace failed: {error or 'no output'}")
    assert holder.stdout is not None and holder.stderr is not None  # both are pipes
    holder.stdout.close()
    holder.stderr.close()
    return holder


def prepare_node_cni(state: LabState, node: NodeState) -> None:
    """What AKS node provisioning leaves on a node: the CNI plugins and the azure conflist."""
    from wgcni_lab.containerd import REFERENCE_PLUGIN_DIR, link_cni_plugins, write_conflist

    link_cni_plugins(node.root / "opt/cni/bin", extra={"azure-vnet": REFERENCE_PLUGIN_DIR / "ptp"})
    write_conflist(node.root / "etc/cni/net.d", base_conflist(node.pod_ips, state.mode, state.dual_stack))


def node_containerd(state: LabState, node: NodeState):  # type: ignore[no-untyped-def]
    from wgcni_lab.containerd import OVERLAY_SNAPSHOTTER, SNAPSHOTTER, Containerd

    return Containerd(node.containerd_dir(state.path), name=node.name, cni_conf_dir=Path("/etc/cni/net.d"),
                      cni_bin_dir=Path("/opt/cni/bin"), netns=node.netns, mount_namespace=node.mount_namespace,
                      cgroup_parent=state.cgroup_parent(node),
                      snapshotter=OVERLAY_SNAPSHOTTER if state.daemonset_image else SNAPSHOTTER)


def write_node_config(state: LabState, node: NodeState, ca_pem: bytes) -> None:
    """The ConfigMap's config.yaml and the kubeconfig, where the DaemonSet mounts them in the node."""
    directory = node.root / str(NODE_CONFIG_DIR).lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    config = hook_config(state.azure_underlay, state.settings)
    (directory / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    (directory / "kubeconfig").write_text(json.dumps(kubeconfig(state, node, ca_pem), indent=2) + "\n")


def write_node_token(node: NodeState, token: str, directory_in_node: Path = NODE_CONFIG_DIR) -> None:
    """The pod's service-account token file (0600) in `directory_in_node`, replaced atomically as the kubelet does."""
    directory = node.root / str(directory_in_node).lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "token", token.encode(), 0o600, temporary_prefix=".token.", durable=False)


def install_cni(state: LabState, node: NodeState) -> None:
    """`wgcni-node install-cni --wait`, as the DaemonSet's init container runs it."""
    in_node(node, [state.hook, "install-cni", "--wait", "--config", str(NODE_CONFIG_DIR / "config.yaml"),
                   "--plugin", state.plugin], timeout=120)


def hook_request(node: NodeState, op: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """One request to the node's hook; None while it does not answer."""
    from node_hook.local_api import request

    try:
        answer = request(node.hook_socket, {"op": op}, timeout=timeout)
    except (OSError, ValueError):
        return None
    return answer if answer.get("ok") else None


def wait_hook_ready(state: LabState, node: NodeState, hook: subprocess.Popen[bytes], timeout: float = 60) -> None:
    def ready() -> bool:
        if hook.poll() is not None:
            log = (node.directory(state.path) / "wgcni-node.log").read_text(errors="replace").strip().splitlines()
            raise LabError(f"{node.name}: wgcni-node exited ({hook.returncode}): {log[-1] if log else 'no log'}")
        status = hook_request(node, "status")
        return bool(status and status.get("ready"))

    wait_until(ready, timeout, f"wgcni-node on {node.name} to be ready", interval=0.1, error=LabError)


def wait_chained(containerd: Any) -> None:
    """containerd has loaded the conflist with wgcni chained after azure-vnet."""
    def chained(loaded: dict[str, Any]) -> bool:
        for network in loaded.get("Networks") or []:
            config = network.get("Config") or {}
            if config.get("Name") == NETWORK:
                types = [plugin.get("Network", {}).get("type") for plugin in config.get("Plugins") or []]
                return types == ["azure-vnet", "wgcni", "portmap"]
        return False

    containerd.wait_cni_config(chained, timeout=30)


# ---- pods ------------------------------------------------------------------------------------------------------------

def cri_client(state: LabState, node: NodeState):  # type: ignore[no-untyped-def]
    from wgcni_lab.cri import CriClient

    return CriClient(node.containerd_dir(state.path) / "containerd.sock", timeout=60.0)


def _pod_json(node: NodeState, status: Any, labels: dict[str, str]) -> dict[str, Any]:
    """A pod as status and pod-add show it; a hostNetwork pod has the node's IP (containerd reports none)."""
    host_network = labels.get(HOST_NETWORK_LABEL) == "true"
    ips = node.ips if host_network else [status.ip, *status.additional_ips]
    return {"name": status.name, "node": node.name, "netns": f"/proc/{status.pid}/ns/net",
            "ip": ips[0], "ips": ips, "id": status.id, "namespace": status.namespace,
            "uid": status.uid, "attempt": status.attempt, "host_network": host_network,
            "predates_install": labels.get(PREDATES_INSTALL_LABEL) == "true"}


def node_pods(state: LabState, node: NodeState) -> list[dict[str, Any]]:
    """The node's running pods, from its containerd (sandboxes in READY state)."""
    from wgcni_lab.cri import CriError

    try:
        with cri_client(state, node) as cri:
            sandboxes = [s for s in cri.list_pod_sandboxes(labels=POD_LABELS) if s.state == "SANDBOX_READY"]
            pods = [_pod_json(node, cri.pod_sandbox_status(sandbox.id), dict(sandbox.labels))
                    for sandbox in sandboxes]
    except CriError as error:
        raise LabError(f"{node.name}: containerd does not answer: {error.details or error}") from None
    return sorted(pods, key=lambda pod: _pod_order(pod["name"]))


def _pod_order(name: str) -> tuple[str, int]:
    match = _POD_NAME.match(name)
    return (match["node"], int(match["index"])) if match else (name, 0)


def all_pods(state: LabState) -> list[dict[str, Any]]:
    return [pod for node in state.nodes for pod in node_pods(state, node)]


def pod_labels(host_network: bool, predates_install: bool) -> dict[str, str]:
    labels = dict(POD_LABELS)
    if host_network:
        labels[HOST_NETWORK_LABEL] = "true"
    if predates_install:
        labels[PREDATES_INSTALL_LABEL] = "true"
    return labels


def run_pod(state: LabState, node: NodeState, name: str, uid: str, *, attempt: int = 0, host_network: bool = False,
            predates_install: bool = False) -> dict[str, Any]:
    """RunPodSandbox of one pod on the node's containerd, as kubelet does: the CNI ADD chain runs (azure-vnet, wgcni,
    portmap), except for a hostNetwork pod (CRI NamespaceMode NODE for its network)."""
    from wgcni_lab.cri import CriError

    labels = pod_labels(host_network, predates_install)
    try:
        with cri_client(state, node) as cri:
            sandbox = cri.run_pod_sandbox(name=name, namespace=POD_NAMESPACE, uid=uid, attempt=attempt, labels=labels,
                                          cgroup_parent=state.cgroup_parent(node), host_network=host_network)
            return _pod_json(node, cri.pod_sandbox_status(sandbox), labels)
    except CriError as error:
        raise LabError(f"{node.name}: RunPodSandbox of {name} failed: {error.details or error}") from None


def add_pod(state: LabState, node_name: str, host_network: bool = False, predates_install: bool = False
            ) -> dict[str, Any]:
    """A new pod on the node (the next free name), created the way kubelet does (run_pod)."""
    node = state.node(node_name)
    taken = [_pod_order(pod["name"])[1] for pod in node_pods(state, node)]
    name = f"{node.name}-pod{max(taken, default=0) + 1}"
    return run_pod(state, node, name, secrets.token_hex(16), host_network=host_network,
                   predates_install=predates_install)


def find_pod(state: LabState, name: str) -> tuple[NodeState, dict[str, Any]]:
    match = _POD_NAME.match(name)
    candidates = [state.node(match["node"])] if match and match["node"] in {n.name for n in state.nodes} else []
    for node in candidates or state.nodes:
        for pod in node_pods(state, node):
            if pod["name"] == name:
                return node, pod
    raise LabError(f"no pod {name!r} in the lab (see `wgcni-lab status`)")


def delete_pod(state: LabState, name: str) -> dict[str, Any]:
    """StopPodSandbox then RemovePodSandbox, as kubelet does (CNI DEL runs twice, the second without a netns)."""
    from wgcni_lab.cri import CriError

    node, pod = find_pod(state, name)
    try:
        with cri_client(state, node) as cri:
            cri.stop_pod_sandbox(pod["id"])
            cri.remove_pod_sandbox(pod["id"])
    except CriError as error:
        raise LabError(f"{node.name}: deleting {name} failed: {error.details or error}") from None
    return pod


# ---- status and convergence ------------------------------------------------------------------------------------------

def status(state: LabState) -> dict[str, Any]:
    """The lab as `wgcni-lab status --json` shows it; a node whose runtime does not answer is listed under
    `problems` (its pods are then missing from `pods`)."""
    nodes, pods, problems = [], [], []
    for node in state.nodes:
        nodes.append({
            "name": node.name, "netns": node.netns, "ip": node.ip, "ips": node.ips,
            "wg_interface": WG_INTERFACE,
            "wg_port": WG_PORT, "hook_socket": str(node.hook_socket),
            "hook_socket_in_node": str(HOOK_SOCKET_IN_NODE), "hook_pid": node.hook_pid,
            "mount_namespace": node.mount_namespace,
            "containerd_socket": str(node.containerd_dir(state.path) / "containerd.sock"),
            "daemonset": node.daemonset,
        })
        try:
            pods += node_pods(state, node)
        except LabError as error:
            problems.append(str(error))
    from wgcni_lab import fabric, services

    return {"fabric_netns": state.vnet_netns, "gateway": GATEWAY, "gateway_mac": fabric.GATEWAY_MAC,
            "azure_underlay": state.azure_underlay, "subnet": str(VNET), "mode": state.mode,
            "pod_cidr": str(OVERLAY_POD_CIDR) if state.mode == "overlay" else str(VNET), "lab_dir": state.lab_dir,
            "ip_family": state.ip_family, **(_ipv6_status(state) if state.dual_stack else {}),
            "phase": state.phase, "apiserver": state.apiserver_url, "client": fabric.client_status(state),
            "nodes": nodes, "pods": pods, "services": [services.service_json(service) for service in state.services],
            "problems": problems}


def _ipv6_status(state: LabState) -> dict[str, str]:
    return {"subnet6": str(VNET6), "gateway6": GATEWAY6,
            "pod_cidr6": str(OVERLAY_POD_CIDR6) if state.mode == "overlay" else str(VNET6)}


def recorded(pod: dict[str, Any]) -> bool:
    """The pod's sandbox went through the wgcni plugin (it has a pod record): not hostNetwork, made after the
    install."""
    return not pod["host_network"] and not pod["predates_install"]


def mesh_converged(state: LabState, pods: list[dict[str, Any]]) -> bool:
    """Every hook reports every other node as a programmed peer whose AllowedIPs are exactly that node's IP and
    the pods on it with an IP of their own - those that predate wgcni too, which the hooks learn from their host
    routes (the hooks' own view; the tests check the kernel/wireguard-go side independently)."""
    expected = expected_allowed_ips(state, pods)
    for node in state.nodes:
        answer = hook_request(node, "peers")
        if answer is None:
            return False
        peers = {peer["node"]: peer for peer in answer["peers"]}
        for other in state.nodes:
            if other.name == node.name:
                continue
            peer = peers.get(other.name)
            if peer is None or not peer["programmed"] or covered(peer["allowedIPs"]) != expected[other.name]:
                return False
    return True


def expected_allowed_ips(state: LabState, pods: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """node -> the addresses its peer must allow everywhere else: the node's own and those of its pods with an IP of
    their own (not hostNetwork), every family."""
    expected = {node.name: set(node.ips) for node in state.nodes}
    for pod in pods:
        if not pod["host_network"]:
            expected[pod["node"]].update(pod["ips"])
    return expected


def covered(prefixes: Iterable[str]) -> set[str]:
    """The host addresses the prefixes cover (lab prefixes are small: pod and node /32s, aggregated)."""
    return {str(address) for prefix in prefixes for address in ipaddress.ip_network(prefix)}


# ---- teardown ------------------------------------------------------------------------------------------------------

def netns_pids(netns: str) -> set[int]:
    """The processes in the named network namespace (none when it does not exist)."""
    result = run(["ip", "netns", "pids", netns], check=False)
    return {int(pid) for pid in result.stdout.split()} if result.returncode == 0 else set()


def cgroup_pids(cgroup_parent: str) -> set[int]:
    """The processes in `cgroup_parent` or below it, in any cgroup hierarchy."""
    from wgcni_lab.cleanup import CGROUP_ROOT

    pids: set[int] = set()
    relative = cgroup_parent.strip("/")
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        top = hierarchy / relative
        if top.is_dir() and not top.is_symlink():
            for procs in top.rglob("cgroup.procs"):
                try:
                    pids.update(int(pid) for pid in procs.read_text().split())
                except OSError:
                    continue
    return pids


def is_lab_daemon(pid: int, state: LabState) -> bool:
    """`pid` is a live (not zombie) process running this lab's daemon."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return process_state(pid) not in (None, "Z") and b"daemon" in argv and state.lab_dir.encode() in argv


def lab_processes(state: LabState) -> set[int]:
    """Every live process of the lab: the lab daemon, whatever runs in a lab namespace (node mount holders,
    containerds and their shims, hooks, wireguard-go) or a lab cgroup (the pods), and all their descendants — also
    when the daemon crashed and they were orphaned. Zombies are left out (they hold nothing). `wgcni-lab` commands
    (which name the lab dir too) are not lab processes."""
    table = process_table()
    roots = {state.daemon_pid} if state.daemon_pid and is_lab_daemon(state.daemon_pid, state) else set()
    for netns in lab_namespaces(state):
        roots |= netns_pids(netns)
    for node in state.nodes:
        roots |= cgroup_pids(state.cgroup_parent(node))
    roots.discard(os.getpid())
    found = with_descendants(roots, table)
    return {pid for pid in found if pid in table and table[pid].live and pid != os.getpid()}


def lab_namespaces(state: LabState) -> list[str]:
    """The lab's named network namespaces that exist: those in the state and any other with the lab's prefix."""
    listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    existing = {line.split()[0] for line in listed if line.strip()}
    prefix = f"wgl-{state.id}-"
    return sorted(name for name in existing if name.startswith(prefix))


def teardown(state: LabState, exclude: Iterable[int] = ()) -> list[str]:
    """Remove everything of the lab that exists (idempotent): runtimes and pods, every lab process, the
    namespaces, the cgroups and the lab dir. Returns problems (empty = all gone)."""
    from wgcni_lab.containerd import Containerd

    problems: list[str] = []
    skip = set(exclude)
    for _ in range(3):  # processes can be starting while we look (a runtime spawning a shim): look again
        pids = lab_processes(state) - skip
        if not pids:
            break
        kill_processes(pids)
    for node in state.nodes:
        base = node.containerd_dir(state.path)
        try:
            Containerd(base, name=node.name, cgroup_parent=state.cgroup_parent(node)).stop(remove_pods=False)
        except Exception as error:  # noqa: BLE001 - keep removing the rest; reported below
            problems.append(f"{node.name} runtime: {error}")
    for netns in lab_namespaces(state):
        result = run(["ip", "netns", "delete", netns], check=False)
        if result.returncode != 0:
            problems.append(f"netns {netns}: {result.stderr.strip()}")
    left = lab_processes(state) - skip
    if left:
        problems.append(f"processes still running: {sorted(left)}")
    try:
        remove_tree(state.path)
    except OSError as error:
        problems.append(f"{state.path}: {error}")
    return problems
