"""The lab's VNet as Azure's SDN behaves towards a VM: one namespace (`wgl-<id>-vnet`) that routes, not a bridge.

What a node (or the client VM) sees on its eth0, as on Azure:
- every ARP request is answered with the one gateway MAC `12:34:56:78:9a:bc`, whatever the address: each NIC's
  fabric-side veth carries that MAC with proxy_arp (no proxy delay), and a catch-all route for the subnet to the sink
  `fabric0` (an ifb device: it drops whatever is sent to it) makes every subnet address routable, so every address
  is answered;
- each address is delivered to the NIC that holds it: a /32 route per node IP, per secondary (pod) IP via that
  node's IP, per client IP, programmed when the NIC is attached (`attach_node`, `attach_client`). Static neighbours
  (each NIC's MAC is fixed, `nic_mac`) mean the fabric itself never sends ARP. An address no NIC holds goes to the
  sink (dropped); anything outside the subnet hits a blackhole;
- a moved secondary IP is followed at once (`move_ip`), as Azure follows an IP reassigned to another NIC;
- the underlay carries at most 1400 bytes with DF set (`DF_LIMIT`): larger DF packets are dropped silently by an
  nftables rule, packets without DF pass (`--no-azure-underlay` leaves the rule out);
- the fabric is not a visible hop: the TTL decrement of forwarding is undone (iptables `TTL --ttl-inc 1` in mangle
  PREROUTING), there is no conntrack, NAT or ICMP redirect in it, and rp_filter is off, so packets arrive as sent.

`wgcni-lab capture` listens on every fabric link at ingress (`tcpdump -i any -Q in`): each packet that enters the
fabric is seen once, on the link of the NIC that sent it.
"""

from __future__ import annotations

import ipaddress

from wgcni_lab import lab

GATEWAY_MAC = "12:34:56:78:9a:bc"  # what Azure's host answers every ARP request with
NIC_MAC_PREFIX = "00:0d:3a"  # the OUI of Azure VM NICs
SINK = "fabric0"  # the catch-all for subnet addresses no NIC holds: an ifb device drops what is sent to it
DF_LIMIT = 1400  # the largest packet with DF that Azure's underlay carries
FIREWALL_TABLE = "wgcni-lab-fabric"
CLIENT_NAME = "client"
CLIENT_IP = "10.240.200.4"  # a VM in the VNet outside the cluster: far above every node's secondary-IP slots
CLIENT_LINK = "client"

_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0",
)


def nic_mac(ip: str) -> str:
    """The MAC of the NIC holding `ip` as primary address: Azure's OUI and the address's last three bytes."""
    packed = ipaddress.ip_address(ip).packed
    return ":".join([NIC_MAC_PREFIX, *(f"{byte:02x}" for byte in packed[1:])])


def firewall(df_limit: bool, overlay: bool = False) -> str:
    """The fabric's nftables table: the underlay's DF size limit (or nothing when the underlay is unlimited); in
    overlay mode the pod CIDR is routed between the cluster's nodes only (a VM outside reaches no pod IP)."""
    rules = f"\t\tip frag-off & 0x4000 != 0 ip length > {DF_LIMIT} drop\n" if df_limit else ""
    if overlay:
        rules += f'\t\tiifname "{CLIENT_LINK}" ip daddr {lab.OVERLAY_POD_CIDR} drop\n'
    return (f"table ip {FIREWALL_TABLE} {{\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter; policy accept;\n"
            f"{rules}"
            "\t}\n"
            "}\n")


def create(state: lab.LabState) -> None:
    """The fabric's namespace: routing on, rp_filter and redirects off, the sink, the blackhole, no TTL decrement
    and (with Azure's underlay) the DF limit."""
    netns = state.vnet_netns
    lab.run(["ip", "netns", "add", netns])
    lab.in_netns(netns, ["sysctl", "-qw", *_SYSCTLS])
    lab.in_netns(netns, ["ip", "link", "set", "lo", "up"])
    lab.in_netns(netns, ["ip", "link", "add", SINK, "type", "ifb"])
    lab.in_netns(netns, ["ip", "link", "set", SINK, "up"])
    lab.in_netns(netns, ["ip", "route", "add", str(lab.VNET), "dev", SINK])
    if state.mode == "overlay":  # a pod CIDR address of no node's /24 is dropped too
        lab.in_netns(netns, ["ip", "route", "add", str(lab.OVERLAY_POD_CIDR), "dev", SINK])
    lab.in_netns(netns, ["ip", "route", "add", "blackhole", "default"])
    lab.in_netns(netns, ["iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-j", "TTL", "--ttl-inc", "1"])
    lab.in_netns(netns, ["nft", "-f", "-"], input=firewall(state.azure_underlay, state.mode == "overlay"))


def _attach(state: lab.LabState, link: str, netns: str, ip: str) -> None:
    """A NIC: `eth0` in `netns` with `ip` in the subnet and the default route via the gateway, its fabric side
    `link` answering every ARP request with the gateway MAC, and the fabric delivering `ip` to it."""
    fabric = state.vnet_netns
    lab.in_netns(fabric, ["ip", "link", "add", link, "address", GATEWAY_MAC, "mtu", str(lab.NODE_UPLINK_MTU),
                          "type", "veth", "peer", "name", "eth0", "address", nic_mac(ip), "netns", netns])
    lab.in_netns(fabric, ["sysctl", "-qw", f"net.ipv4.conf.{link}.proxy_arp=1", f"net.ipv4.neigh.{link}.proxy_delay=0"])
    lab.in_netns(fabric, ["ip", "link", "set", link, "up"])
    lab.in_netns(fabric, ["ip", "neigh", "replace", ip, "lladdr", nic_mac(ip), "dev", link, "nud", "permanent"])
    lab.in_netns(fabric, ["ip", "route", "replace", f"{ip}/32", "dev", link])
    lab.in_netns(netns, ["ip", "addr", "add", f"{ip}/{lab.VNET.prefixlen}", "dev", "eth0"])
    lab.in_netns(netns, ["ip", "link", "set", "eth0", "up"])
    lab.in_netns(netns, ["ip", "route", "add", "default", "via", lab.GATEWAY, "dev", "eth0"])


def _secondary_route(ip: str, node: lab.NodeState) -> list[str]:
    """`ip route` arguments that deliver the secondary IP `ip` to the NIC of `node`."""
    return ["route", "replace", f"{ip}/32", "via", node.ip, "dev", node.name, "onlink"]


def _overlay_route(node: lab.NodeState) -> list[str]:
    """Overlay: `ip route` arguments that deliver the node's /24 of the pod CIDR to its NIC."""
    block = ipaddress.ip_network(f"{node.pod_ips[0]}/24", strict=False)
    return ["route", "replace", str(block), "via", node.ip, "dev", node.name, "onlink"]


def attach_node(state: lab.LabState, node: lab.NodeState) -> None:
    """The node's NIC on the fabric: its IP and its pod IPs are delivered to it (node-subnet: each secondary IP;
    overlay: its /24 of the pod CIDR)."""
    _attach(state, node.name, node.netns, node.ip)
    routes = [_overlay_route(node)] if state.mode == "overlay" else [_secondary_route(ip, node) for ip in node.pod_ips]
    lab.in_netns(state.vnet_netns, ["ip", "-batch", "-"], input="".join(f"{' '.join(route)}\n" for route in routes))


def attach_client(state: lab.LabState) -> None:
    """The client VM: its own namespace with one NIC on the fabric, no wgcni, no Kubernetes."""
    lab.run(["ip", "netns", "add", state.client_netns])
    lab.in_netns(state.client_netns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                      "net.ipv6.conf.default.disable_ipv6=1"])
    lab.in_netns(state.client_netns, ["ip", "link", "set", "lo", "up"])
    _attach(state, CLIENT_LINK, state.client_netns, CLIENT_IP)


def move_ip(state: lab.LabState, ip: str, to_node: str) -> lab.NodeState:
    """Give the secondary IP `ip` to the NIC of `to_node`, as Azure does when an IP is reassigned: the fabric
    delivers it there at once, and the lab's state records the new owner (the pools a node is re-created with)."""
    target = state.node(to_node)
    if state.mode == "overlay":
        raise lab.LabError("in overlay mode a pod IP belongs to its node's /24 and never moves to another node")
    if ipaddress.ip_address(ip) not in lab.VNET or ip in {node.ip for node in state.nodes} or ip == CLIENT_IP:
        raise lab.LabError(f"{ip} is not a secondary IP the lab can move (the VNet is {lab.VNET}; node and client "
                           f"addresses are primary)")
    for node in state.nodes:
        if ip in node.pod_ips and node is not target:
            node.pod_ips.remove(ip)
    if ip not in target.pod_ips:
        target.pod_ips.append(ip)
    state.save()
    lab.in_netns(state.vnet_netns, ["ip", *_secondary_route(ip, target)])
    return target


def client_status(state: lab.LabState) -> dict[str, str]:
    return {"name": CLIENT_NAME, "ip": CLIENT_IP, "netns": state.client_netns, "mac": nic_mac(CLIENT_IP)}
