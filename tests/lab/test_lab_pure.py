"""The lab's pure parts: AKS addressing, the node conflist, and the parsing of the bridge capture."""

from __future__ import annotations

import ipaddress

from wgcni_lab import lab
from wgcni_lab.wire import only_wireguard_between_nodes, parse_line


def test_nodes_sit_where_aks_puts_them_and_pod_ips_are_scattered() -> None:
    assert [lab.node_ip(index) for index in range(4)] == ["10.240.0.4", "10.240.0.35", "10.240.0.66", "10.240.0.97"]
    pools = lab.pod_ip_pools(3)

    assert [len(pool) for pool in pools] == [lab.MAX_PODS] * 3
    everything = [ip for pool in pools for ip in pool]
    assert len(set(everything)) == len(everything)
    assert not {lab.node_ip(index) for index in range(3)} & set(everything)
    assert all(ipaddress.ip_address(ip) in lab.VNET for ip in everything)
    assert pools[0][:3] == ["10.240.0.5", "10.240.0.8", "10.240.0.11"], "dealt round-robin over the nodes"


def test_node_conflist_is_aks_shaped_with_azure_vnet_first() -> None:
    conflist = lab.base_conflist(["10.240.0.5", "10.240.0.8"])

    assert (conflist["name"], conflist["cniVersion"]) == ("azure", "0.3.0")
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["azure-vnet", "portmap"]
    ipam = conflist["plugins"][0]["ipam"]
    assert ipam["type"] == "host-local"
    assert [(r["rangeStart"], r["rangeEnd"]) for r in ipam["ranges"][0]] == [("10.240.0.5",) * 2, ("10.240.0.8",) * 2]


def test_capture_lines_parse_into_packets() -> None:
    udp = parse_line("1795653751.012778 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148")
    icmp = parse_line("1795653751.5 IP 10.240.0.5 > 10.240.0.6: ICMP echo request, id 7, seq 1, length 64")
    tcp6 = parse_line("1795653752.0 IP6 fd00::1.443 > fd00::2.5000: tcp 0")

    assert udp == {"time": 1795653751.012778, "src": "10.240.0.4", "dst": "10.240.0.35", "sport": 51820,
                   "dport": 51820, "proto": "udp", "length": 148,
                   "line": "1795653751.012778 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148"}
    assert (icmp["src"], icmp["dst"], icmp["proto"], icmp["sport"], icmp["length"]) == (
        "10.240.0.5", "10.240.0.6", "icmp", None, 64)
    assert (tcp6["src"], tcp6["sport"], tcp6["dst"], tcp6["dport"], tcp6["proto"]) == (
        "fd00::1", 443, "fd00::2", 5000, "tcp")
    assert parse_line("tcpdump: listening on vnet0") is None


def test_only_wireguard_between_node_addresses_passes() -> None:
    state = lab.new_state(lab.DEFAULT_LAB_DIR, 2, lab.DEFAULT_PLUGIN, lab.DEFAULT_HOOK)
    packets = [parse_line(line) for line in (
        "1.0 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148",
        "1.1 IP 10.240.0.5 > 10.240.0.6: ICMP echo request, id 7, seq 1, length 64",
        "1.2 IP 10.240.0.4.53 > 10.240.0.35.51820: UDP, length 40",
        "1.3 IP 10.240.0.9.51820 > 10.240.0.35.51820: UDP, length 40",
    )]

    assert [packet["time"] for packet in only_wireguard_between_nodes(state, packets)] == [1.1, 1.2, 1.3]
