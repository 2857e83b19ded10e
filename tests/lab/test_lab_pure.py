"""The lab's pure parts: AKS addressing, the node conflist, the fabric's addresses and firewall, the parsing of the
fabric capture, the kube-proxy rules rendered for Services, and the stream report of an iperf3 server."""

from __future__ import annotations

import ipaddress
import re

import pytest

from wgcni_lab import fabric, lab, services
from wgcni_lab.harness.streams import parse_server_report
from wgcni_lab.wire import only_wireguard_between_nodes, parse_line

IPERF3_SERVER = """\
-----------------------------------------------------------
Server listening on 5299 (test #1)
-----------------------------------------------------------
Accepted connection from 127.0.0.1, port 51108
[  5] local 127.0.0.1 port 5299 connected to 127.0.0.1 port 51116
[ ID] Interval           Transfer     Bitrate
[  5]   0.00-0.10   sec   128 KBytes  10.5 Mbits/sec
[  5]   0.10-0.20   sec  0.00 Bytes  0.00 bits/sec
[  5]   0.20-0.30   sec  0.00 Bytes  0.00 bits/sec
[  5]   0.30-0.40   sec  1.50 MBytes   126 Mbits/sec
[  5]   0.40-0.50   sec  0.00 Bytes  0.00 bits/sec
[  5]   0.40-0.50   sec  0.00 Bytes  0.00 bits/sec
iperf3: the client has terminated
- - - - - - - - - - - - - - - - - - - - - - - - -
[ ID] Interval           Transfer     Bitrate
[  5]   0.00-0.50   sec  1.62 MBytes  27.3 Mbits/sec                  receiver
"""


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


def test_ipv6_twins_are_readable_from_the_ipv4_address_and_unique() -> None:
    assert [lab.ipv6_twin(ip) for ip in ("10.240.0.4", "10.240.0.35", "10.240.200.4")] == [
        "fd00:10:240::4", "fd00:10:240::35", "fd00:10:240::200:4"]
    assert [lab.ipv6_twin(ip) for ip in ("10.244.0.4", "10.244.1.4", "10.244.1.33")] == [
        "fd12:3456:789a::4", "fd12:3456:789a::104", "fd12:3456:789a::121"]
    pools = [*lab.pod_ip_pools(64), *(lab.overlay_pool(lab.overlay_block(index)) for index in range(64))]
    twins = [lab.ipv6_twin(ip) for pool in pools for ip in pool]
    assert len(set(twins)) == len(twins)
    block = ipaddress.ip_network(f"{lab.ipv6_twin('10.244.5.4')}/{lab.OVERLAY_NODE_PREFIX6}", strict=False)
    assert all(ipaddress.ip_address(lab.ipv6_twin(ip)) in block for ip in lab.overlay_pool(lab.overlay_block(5)))
    with pytest.raises(lab.LabError, match="neither"):
        lab.ipv6_twin("192.168.0.1")


@pytest.mark.parametrize("mode", lab.MODES)
def test_a_dual_stack_conflist_has_a_range_set_per_family_with_azures_ipv6_gateway(mode: str) -> None:
    pool = lab.overlay_pool(lab.overlay_block(1)) if mode == "overlay" else ["10.240.0.5", "10.240.0.8"]
    ipam = lab.base_conflist(pool, mode, dual_stack=True)["plugins"][0]["ipam"]
    ipv4, ipv6 = ipam["ranges"]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert {ipaddress.ip_address(r["rangeStart"]).version for r in ipv4} == {4}
    assert [(r["rangeStart"], r["gateway"]) for r in ipv6][0] == (lab.ipv6_twin(pool[0]), lab.GATEWAY6)
    assert ipv6[-1]["rangeEnd"] == lab.ipv6_twin(pool[-1])
    assert lab.base_conflist(pool, mode)["plugins"][0]["ipam"]["ranges"] == [ipv4]


def test_capture_lines_parse_into_packets() -> None:
    udp = parse_line("1795653751.012778 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148")
    icmp = parse_line("1795653751.5 IP 10.240.0.5 > 10.240.0.6: ICMP echo request, id 7, seq 1, length 64")
    tcp6 = parse_line("1795653752.0 IP6 fd00::1.443 > fd00::2.5000: tcp 0")

    assert udp == {"time": 1795653751.012778, "link": None, "src": "10.240.0.4", "dst": "10.240.0.35", "sport": 51820,
                   "dport": 51820, "proto": "udp", "length": 148,
                   "line": "1795653751.012778 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148"}
    assert (icmp["src"], icmp["dst"], icmp["proto"], icmp["sport"], icmp["length"]) == (
        "10.240.0.5", "10.240.0.6", "icmp", None, 64)
    assert (tcp6["src"], tcp6["sport"], tcp6["dst"], tcp6["dport"], tcp6["proto"]) == (
        "fd00::1", 443, "fd00::2", 5000, "tcp")
    assert parse_line("tcpdump: listening on any, link-type LINUX_SLL2") is None
    on_link = parse_line("1796283247.476708 node-1 In  IP 10.240.0.4.30277 > 10.240.0.6.8080: tcp 0")
    assert (on_link["link"], on_link["src"], on_link["sport"], on_link["dst"], on_link["dport"], on_link["proto"]) == (
        "node-1", "10.240.0.4", 30277, "10.240.0.6", 8080, "tcp")


def test_only_wireguard_between_node_addresses_passes() -> None:
    state = lab.new_state(lab.DEFAULT_LAB_DIR, 2, lab.DEFAULT_PLUGIN, lab.DEFAULT_HOOK)
    packets = [parse_line(line) for line in (
        "1.0 IP 10.240.0.4.51820 > 10.240.0.35.51820: UDP, length 148",
        "1.1 IP 10.240.0.5 > 10.240.0.6: ICMP echo request, id 7, seq 1, length 64",
        "1.2 IP 10.240.0.4.53 > 10.240.0.35.51820: UDP, length 40",
        "1.3 IP 10.240.0.9.51820 > 10.240.0.35.51820: UDP, length 40",
    )]

    assert [packet["time"] for packet in only_wireguard_between_nodes(state, packets)] == [1.1, 1.2, 1.3]


def test_the_client_and_nic_macs_collide_with_no_node_or_pod() -> None:
    pools = lab.pod_ip_pools(lab.MAX_NODES)
    held = {lab.node_ip(index) for index in range(lab.MAX_NODES)} | {ip for pool in pools for ip in pool}

    assert fabric.CLIENT_IP not in held and ipaddress.ip_address(fabric.CLIENT_IP) in lab.VNET
    assert fabric.nic_mac("10.240.0.35") == "00:0d:3a:f0:00:23"
    assert len({fabric.nic_mac(ip) for ip in held | {fabric.CLIENT_IP}}) == len(held) + 1
    assert fabric.GATEWAY_MAC not in {fabric.nic_mac(ip) for ip in held}


def test_the_fabric_firewall_drops_only_df_packets_over_the_underlay_limit() -> None:
    assert "ip frag-off & 0x4000 != 0 ip length > 1400 drop" in fabric.firewall(df_limit=True)
    assert "drop" not in fabric.firewall(df_limit=False)


def _lab_with_service(policy: str, endpoint_nodes: list[str]) -> lab.LabState:
    state = lab.new_state(lab.DEFAULT_LAB_DIR, 3, lab.DEFAULT_PLUGIN, lab.DEFAULT_HOOK)
    endpoints = [{"pod": f"{node}-pod{index}", "ip": f"10.240.0.{50 + index}", "node": node}
                 for index, node in enumerate(endpoint_nodes)]
    state.services.append(lab.ServiceState(name="web", cluster_ip="10.0.0.16", port=8080, node_port=30080,
                                           external_traffic_policy=policy, endpoints=endpoints))
    return state


def test_cluster_policy_masquerades_and_spreads_over_every_endpoint() -> None:
    state = _lab_with_service("Cluster", ["node-2", "node-3", "node-3"])
    rules = services.render(state, state.node("node-1")).splitlines()
    ext, svc = services.chain_name("EXT", state.services[0]), services.chain_name("SVC", state.services[0])

    assert re.fullmatch(r"KUBE-SVC-[A-Z2-7]{16}", svc) and services.chain_name("SVC", state.services[0]) == svc
    assert f'-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web" -m tcp --dport 30080 -j {ext}' in rules
    assert [rule.split(" -j ")[1] for rule in rules if rule.startswith(f"-A {ext} ")] == ["KUBE-MARK-MASQ", svc]
    jumps = [rule for rule in rules if rule.startswith(f"-A {svc} ") and "KUBE-SEP-" in rule]
    assert [re.search(r"--probability (\S+)", rule)[1] if "--probability" in rule else None for rule in jumps] == [
        "0.3333333333", "0.5000000000", None]
    assert sum(rule.endswith("-j DNAT --to-destination 10.240.0.51:8080") for rule in rules) == 1
    assert rules[rules.index("*nat") - 1] == "COMMIT" and rules[-1] == "COMMIT"
    nat = rules[rules.index("*nat"):]
    assert [rule for rule in nat if rule.startswith("-A KUBE-SERVICES ")][-1].endswith(
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"), "the NodePort jump must stay the last rule"


def test_local_policy_serves_local_endpoints_and_drops_the_node_port_elsewhere() -> None:
    state = _lab_with_service("Local", ["node-2"])
    service = state.services[0]
    on_endpoint_node = services.render(state, state.node("node-2"))
    elsewhere = services.render(state, state.node("node-1"))
    svl = services.chain_name("SVL", service)

    assert f"-A {services.chain_name('EXT', service)} -j {svl}" in on_endpoint_node
    assert "has no local endpoints" not in on_endpoint_node and "KUBE-MARK-MASQ" in on_endpoint_node
    assert svl not in elsewhere
    assert ('-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/web has no local endpoints" '
            "-m addrtype --dst-type LOCAL -m tcp --dport 30080 -j DROP") in elsewhere
    assert "masquerade traffic for" not in on_endpoint_node, "Local keeps the client's source address"


def test_a_deleted_service_leaves_only_the_deletion_of_its_chains() -> None:
    state = _lab_with_service("Cluster", ["node-2"])
    chains = services.service_rules(state.services[0], state.node("node-1"))[1]
    state.services.clear()

    rendered = services.render(state, state.node("node-1"), existing_chains=chains)

    assert sorted(line for line in rendered.splitlines() if line.startswith("-X ")) == sorted(
        f"-X {chain}" for chain in chains)
    assert "default/web" not in rendered


def test_an_iperf3_server_report_gives_bytes_per_interval_and_the_longest_stall() -> None:
    report = parse_server_report(IPERF3_SERVER)

    assert [size for _, size in report.intervals] == [128 << 10, 0, 0, round(1.5 * (1 << 20)), 0]
    assert report.received == (128 << 10) + round(1.5 * (1 << 20))
    assert abs(report.longest_stall() - 0.2) < 1e-9
    assert parse_server_report("").longest_stall() == 0.0
