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
  nftables rule, packets without DF pass (`--no-azure-underlay` leaves the rule out); an IPv6 packet, which no
  router fragments, is dropped over 1400 bytes too;
- dual-stack (`up --ip-family dual`): each NIC also has its IPv6 twin address (`lab.ipv6_twin`) and reaches
  everything through Azure's IPv6 gateway, the link-local `lab.GATEWAY6` with the gateway MAC, as Azure's IPv6
  routes point a VM at it. Static neighbours on both sides and no link-local addresses on the NICs (no
  `addr_gen_mode`) mean no neighbour discovery, router solicitation or MLD crosses the fabric: as with ARP, the
  fabric carries only what the lab sends. Each IPv6 address is delivered like its IPv4 twin (a /128 per node and
  secondary IP; overlay: the node's /120 of the IPv6 pod CIDR);
- the fabric is not a visible hop: the TTL decrement of forwarding is undone (iptables `TTL --ttl-inc 1` in mangle
  PREROUTING), there is no conntrack, NAT or ICMP redirect in it, and rp_filter is off, so packets arrive as sent.

`wgcni-lab capture` listens on every fabric link at ingress (`tcpdump -i any -Q in`): each packet that enters the
fabric is seen once, on the link of the NIC that sent it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

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
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0",
)
_IPV6_FORWARDING = ("net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1")


def ipv6_sysctls(dual_stack: bool) -> tuple[str, ...]:
    """IPv6 in a lab namespace: off in an IPv4 lab; dual-stack, on without router advertisements, and without
    link-local addresses on links made later (`addr_gen_mode` 1): NICs are given theirs by hand or none."""
    if not dual_stack:
        return ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    return ("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.addr_gen_mode=1")


def nic_mac(ip: str) -> str:
    """The MAC of the NIC holding `ip` as primary address: Azure's OUI and the address's last three bytes."""
    packed = ipaddress.ip_address(ip).packed
    return ":".join([NIC_MAC_PREFIX, *(f"{byte:02x}" for byte in packed[1:])])


def firewall(df_limit: bool, overlay: bool = False) -> str:
    """The fabric's nftables table: the underlay's DF size limit, for IPv6 on every packet (or nothing when the
    underlay is unlimited); in overlay mode the pod CIDRs are routed between the cluster's nodes only (a VM outside
    reaches no pod IP)."""
    rules = (f"\t\tip frag-off & 0x4000 != 0 ip length > {DF_LIMIT} drop\n"
             f"\t\tmeta nfproto ipv6 meta length > {DF_LIMIT} drop\n") if df_limit else ""
    if overlay:
        rules += (f'\t\tiifname "{CLIENT_LINK}" ip daddr {lab.OVERLAY_POD_CIDR} drop\n'
                  f'\t\tiifname "{CLIENT_LINK}" ip6 daddr {lab.OVERLAY_POD_CIDR6} drop\n')
    return (f"table inet {FIREWALL_TABLE} {{\n"
            "\tchain forward {\n"
            "\t\ttype filter hook forward priority filter; policy accept;\n"
            f"{rules}"
            "\t}\n"
            "}\n")


def create(state: lab.LabState) -> None:
    """The fabric's namespace: routing on, rp_filter and redirects off, the sink, the blackhole, no TTL (hop limit)
    decrement and (with Azure's underlay) the DF limit."""
    netns = state.vnet_netns
    lab.run(["ip", "netns", "add", netns])
    lab.in_netns(netns, ["sysctl", "-qw", *_SYSCTLS, *ipv6_sysctls(state.dual_stack),
                         *(_IPV6_FORWARDING if state.dual_stack else ())])
    lab.in_netns(netns, ["ip", "link", "set", "lo", "up"])
    lab.in_netns(netns, ["ip", "link", "add", SINK, "type", "ifb"])
    lab.in_netns(netns, ["ip", "link", "set", SINK, "up"])
    lab.in_netns(netns, ["ip", "route", "add", str(lab.VNET), "dev", SINK])
    if state.mode == "overlay":  # a pod CIDR address of no node's /24 is dropped too
        lab.in_netns(netns, ["ip", "route", "add", str(lab.OVERLAY_POD_CIDR), "dev", SINK])
    lab.in_netns(netns, ["ip", "route", "add", "blackhole", "default"])
    lab.in_netns(netns, ["iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-j", "TTL", "--ttl-inc", "1"])
    if state.dual_stack:
        lab.in_netns(netns, ["ip", "-6", "route", "add", "blackhole", "default"])
        lab.in_netns(netns, ["ip6tables", "-w", "-t", "mangle", "-A", "PREROUTING", "-j", "HL", "--hl-inc", "1"])
    lab.in_netns(netns, ["nft", "-f", "-"], input=firewall(state.azure_underlay, state.mode == "overlay"))


def _attach(state: lab.LabState, link: str, netns: str, ip: str, ipv6: str = "") -> None:
    """A NIC: `eth0` in `netns` with `ip` in the subnet and the default route via the gateway, its fabric side
    `link` answering every ARP request with the gateway MAC, and the fabric delivering `ip` to it; with `ipv6`, that
    address too, and the IPv6 default route via Azure's link-local gateway."""
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
    if ipv6:
        lab.in_netns(fabric, ["ip", "-6", "neigh", "replace", ipv6, "lladdr", nic_mac(ip), "dev", link,
                              "nud", "permanent"])
        lab.in_netns(fabric, ["ip", "-6", "route", "replace", f"{ipv6}/128", "dev", link])
        lab.in_netns(netns, ["ip", "-6", "addr", "add", f"{ipv6}/{lab.VNET6.prefixlen}", "dev", "eth0", "nodad",
                             "noprefixroute"])
        lab.in_netns(netns, ["ip", "-6", "neigh", "replace", lab.GATEWAY6, "lladdr", GATEWAY_MAC, "dev", "eth0",
                             "nud", "permanent"])
        lab.in_netns(netns, ["ip", "-6", "route", "add", "default", "via", lab.GATEWAY6, "dev", "eth0"])


def _secondary_routes(ip: str, node: lab.NodeState) -> list[list[str]]:
    """`ip route` arguments that deliver the secondary IP `ip` (and its IPv6 twin, dual-stack) to the NIC of
    `node`."""
    routes = [["route", "replace", f"{ip}/32", "via", node.ip, "dev", node.name, "onlink"]]
    if node.ipv6:
        routes.append(["route", "replace", f"{lab.ipv6_twin(ip)}/128", "via", node.ipv6, "dev", node.name])
    return routes


def _overlay_routes(node: lab.NodeState) -> list[list[str]]:
    """Overlay: `ip route` arguments that deliver the node's /24 of the pod CIDR (and /120 of the IPv6 one) to its
    NIC."""
    block = ipaddress.ip_network(f"{node.pod_ips[0]}/24", strict=False)
    routes = [["route", "replace", str(block), "via", node.ip, "dev", node.name, "onlink"]]
    if node.ipv6:
        block6 = ipaddress.ip_network(f"{lab.ipv6_twin(node.pod_ips[0])}/{lab.OVERLAY_NODE_PREFIX6}", strict=False)
        routes.append(["route", "replace", str(block6), "via", node.ipv6, "dev", node.name])
    return routes


def attach_node(state: lab.LabState, node: lab.NodeState) -> None:
    """The node's NIC on the fabric: its IP and its pod IPs are delivered to it (node-subnet: each secondary IP;
    overlay: its /24 of the pod CIDR), dual-stack their IPv6 twins too."""
    _attach(state, node.name, node.netns, node.ip, node.ipv6)
    routes = (_overlay_routes(node) if state.mode == "overlay"
              else [route for ip in node.pod_ips for route in _secondary_routes(ip, node)])
    lab.in_netns(state.vnet_netns, ["ip", "-batch", "-"], input="".join(f"{' '.join(route)}\n" for route in routes))


def attach_client(state: lab.LabState) -> None:
    """The client VM: its own namespace with one NIC on the fabric, no wgcni, no Kubernetes."""
    lab.run(["ip", "netns", "add", state.client_netns])
    lab.in_netns(state.client_netns, ["sysctl", "-qw", *ipv6_sysctls(state.dual_stack)])
    lab.in_netns(state.client_netns, ["ip", "link", "set", "lo", "up"])
    _attach(state, CLIENT_LINK, state.client_netns, *client_ips(state))


def move_ip(state: lab.LabState, ip: str, to_node: str) -> lab.NodeState:
    """Give the secondary IP `ip` (IPv4; dual-stack, its IPv6 twin with it) to the NIC of `to_node`, as Azure does
    when an IP is reassigned: the fabric delivers it there at once, and the lab's state records the new owner (the
    pools a node is re-created with)."""
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
    for route in _secondary_routes(ip, target):
        lab.in_netns(state.vnet_netns, ["ip", *route])
    return target


def client_ips(state: lab.LabState) -> list[str]:
    """The client VM's addresses: CLIENT_IP, and its IPv6 twin in a dual-stack lab."""
    return [CLIENT_IP, lab.ipv6_twin(CLIENT_IP)] if state.dual_stack else [CLIENT_IP]


def client_status(state: lab.LabState) -> dict[str, Any]:
    return {"name": CLIENT_NAME, "ip": CLIENT_IP, "ips": client_ips(state), "netns": state.client_netns,
            "mac": nic_mac(CLIENT_IP)}
