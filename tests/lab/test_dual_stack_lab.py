"""The lab dual-stack (`wgcni-lab up --ip-family dual`), in node-subnet mode and with Azure CNI Overlay (as AKS runs
dual-stack): every node and pod has an IPv4 and an IPv6 address, given by the CNI chain through containerd and
published through the API server. Each peer then carries both families of its node, pod and host traffic between
nodes crosses the fabric only as WireGuard in either family, traffic between pods of one node stays on the node, DF
pings of exactly the device MTU pass in each family and one byte more is refused, and pod ADD/DEL reach every peer
in both families."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import Cli, address_of, captured, lab_up, peer_prefixes, ping_ring, tunnelled
from wgcni_lab import fabric, lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.harness.streams import tcp_stream
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

DEVICE_MTU = 1340  # Azure's 1400-byte underlay less WireGuard's 60 over the IPv4 endpoint
ICMP_HEADERS = {4: 20 + 8, 6: 40 + 8}


@pytest.fixture(scope="module", params=["node-subnet", "overlay"])
def cli(request, lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    with lab_up(lab_parent / f"dual-{request.param}", "--ip-family", "dual", "--mode", request.param, "--nodes", "3",
                "--pods-per-node", "2", "--daemonset-runtime", "processes") as cli:
        yield cli


def status(cli: Cli) -> dict[str, Any]:
    return cli.json("status", "--json")


def ipv6_space(report: dict[str, Any], node_index: int) -> ipaddress.IPv6Network:
    """Where a node's pods take their IPv6 address: the VNet's IPv6 subnet, or (overlay) the node's /120."""
    if report["mode"] == "overlay":
        size = 1 << (128 - lab.OVERLAY_NODE_PREFIX6)
        return ipaddress.IPv6Network((int(lab.OVERLAY_POD_CIDR6.network_address) + node_index * size,
                                      lab.OVERLAY_NODE_PREFIX6))
    return lab.VNET6


def peer_allowed(cli: Cli, node: str) -> dict[str, set[str]]:
    """endpoint address -> the addresses its peer's AllowedIPs cover, as wireguard-go on `node` has them."""
    return {endpoint: lab.covered(prefixes) for endpoint, prefixes in peer_prefixes(cli, node).items()}


def test_every_node_and_pod_has_both_families_from_the_cni_chain(cli: Cli) -> None:
    report = status(cli)
    assert report["ip_family"] == "dual" and report["subnet6"] == str(lab.VNET6)
    for index, node in enumerate(report["nodes"]):
        assert node["ips"] == [node["ip"], lab.ipv6_twin(node["ip"])]
        pods = [pod for pod in report["pods"] if pod["node"] == node["name"]]
        assert len(pods) == 2
        for pod in pods:
            ipv4, ipv6 = pod["ips"]
            assert ipaddress.ip_address(ipv4).version == 4 and ipaddress.ip_address(ipv6) in ipv6_space(report, index)
            addresses = cli.run("exec", pod["name"], "--", "ip", "-6", "-o", "address", "show", "dev", "eth0").stdout
            assert f"inet6 {ipv6}/" in addresses, "the pod's eth0 has the address containerd reports"
    conflist = json.loads(cli.run("exec", "node-1", "--", "cat", "/etc/cni/net.d/10-azure.conflist").stdout)
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["azure-vnet", "wgcni", "portmap"]
    assert len(conflist["plugins"][0]["ipam"]["ranges"]) == 2, "one range set per family"


def test_each_peer_carries_both_families_of_its_node_and_routes_them_into_the_tunnel(cli: Cli) -> None:
    report = status(cli)
    expected = lab.expected_allowed_ips(cli.state(), report["pods"])
    for node in report["nodes"]:
        peers, into_tunnel = peer_allowed(cli, node["name"]), tunnelled(cli, node["name"])
        for other in (other for other in report["nodes"] if other is not node):
            wanted = expected[other["name"]]
            assert {ipaddress.ip_address(ip).version for ip in wanted} == {4, 6} and len(wanted) == 6
            assert peers[other["ip"]] == wanted, f"{node['name']} -> {other['name']}"
            assert wanted <= into_tunnel, f"{node['name']} routes {other['name']}'s addresses into the tunnel"
        local = {ip for pod in report["pods"] if pod["node"] == node["name"] for ip in pod["ips"]}
        assert not local & into_tunnel, "a local pod's addresses never go into the tunnel"


def test_pod_and_host_traffic_crosses_the_fabric_only_as_wireguard_in_both_families(cli: Cli) -> None:
    report = status(cli)
    same_node = [pod for pod in report["pods"] if pod["node"] == "node-1"]
    with captured(cli) as packets:
        for family in (4, 6):
            ping_ring(cli, report["pods"], 2, family)
        local = cli.run("exec", same_node[0]["name"], "--", "ping", "-c", "2", "-i", "0.2", "-W", "2",
                        address_of(same_node[1], 6), check=False)
        assert local.returncode == 0, local.stdout
        host = cli.run("exec", "node-1", "--", "ping", "-c", "2", "-i", "0.2", "-W", "2",
                       address_of(report["nodes"][1], 6), check=False)
        assert host.returncode == 0, host.stdout
    assert len(packets) >= 28, "3 pairs x 2 families x 2 echoes and the host's 2, each one UDP datagram each way"
    assert only_wireguard_between_nodes(cli.state(), packets) == []
    assert not [packet for packet in packets if address_of(same_node[1], 6) in (packet["src"], packet["dst"])]


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_between_pods_of_two_nodes_is_encrypted_in_either_family(cli: Cli, family: int) -> None:
    report = status(cli)
    sender = next(pod for pod in report["pods"] if pod["node"] == "node-1")
    receiver = next(pod for pod in report["pods"] if pod["node"] == "node-2")
    with captured(cli) as packets, tcp_stream(["nsenter", f"--net={receiver['netns']}", "--"],
                                              ["nsenter", f"--net={sender['netns']}", "--"],
                                              address_of(receiver, family), rate="5M") as stream:
        pass
    assert stream.received > 100_000, f"{stream.received} bytes over IPv{family}"
    assert len(packets) > 50 and only_wireguard_between_nodes(cli.state(), packets) == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_df_ping_of_exactly_the_device_mtu_passes_and_one_byte_more_is_refused(cli: Cli, family: int) -> None:
    report = status(cli)
    source = next(pod for pod in report["pods"] if pod["node"] == "node-1")
    target = address_of(next(pod for pod in report["pods"] if pod["node"] == "node-3"), family)

    def df_ping(size: int) -> int:
        return cli.run("exec", source["name"], "--", "ping", f"-{family}", "-c", "2", "-i", "0.2", "-W", "2", "-M",
                       "do", "-s", str(size - ICMP_HEADERS[family]), target, check=False).returncode

    assert df_ping(DEVICE_MTU) == 0
    assert df_ping(DEVICE_MTU + 1) != 0


def test_pod_add_and_del_reach_every_peer_in_both_families(cli: Cli) -> None:
    pod = json.loads(cli.run("pod-add", "node-2").stdout)
    assert len(pod["ips"]) == 2
    node_2 = cli.state().node("node-2")

    def peers_cover(present: bool) -> bool:
        allowed = [peer_allowed(cli, name)[node_2.ip] for name in ("node-1", "node-3")]
        return all(set(pod["ips"]) <= ips if present else not set(pod["ips"]) & ips for ips in allowed)

    wait_until(lambda: peers_cover(True), 15, "both addresses of the new pod on node-2's peer everywhere")
    source = next(p for p in status(cli)["pods"] if p["node"] == "node-1")
    assert cli.run("exec", source["name"], "--", "ping", "-c", "2", "-i", "0.2", "-W", "2", address_of(pod, 6),
                   check=False).returncode == 0
    cli.run("pod-del", pod["name"])
    wait_until(lambda: peers_cover(False), 15, "both addresses of the deleted pod gone from node-2's peer everywhere")


def test_the_underlay_carries_ipv6_of_at_most_1400_bytes(cli: Cli) -> None:
    """Past the tunnel (its fwmark), node to node in plaintext: Azure's underlay limit holds for IPv6 too, where
    every packet is one no router fragments."""
    target = address_of(status(cli)["nodes"][1], 6)

    def passes(size: int) -> bool:
        return cli.run("exec", "node-1", "--", "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "-m",
                       str(lab.HOOK_DEFAULTS.fwmark), "-M", "do", "-s", str(size - ICMP_HEADERS[6]), target,
                       check=False).returncode == 0

    assert passes(1400) and not passes(1401)


def test_a_moved_secondary_ip_takes_its_ipv6_twin_along(cli: Cli) -> None:
    state = cli.state()
    if state.mode == "overlay":
        pytest.skip("an Overlay pod IP never moves (test_overlay.py)")
    in_use = {ip for pod in status(cli)["pods"] for ip in pod["ips"]}
    moved = next(ip for ip in state.node("node-2").pod_ips if ip not in in_use)

    def fabric_link(ip: str) -> str:
        return json.loads(lab.in_netns(state.vnet_netns, ["ip", "-j", "route", "get", ip]).stdout)[0]["dev"]

    assert (fabric_link(moved), fabric_link(lab.ipv6_twin(moved))) == ("node-2", "node-2")
    try:
        fabric.move_ip(state, moved, "node-1")
        assert (fabric_link(moved), fabric_link(lab.ipv6_twin(moved))) == ("node-1", "node-1")
    finally:
        fabric.move_ip(cli.state(), moved, "node-2")
    assert fabric_link(lab.ipv6_twin(moved)) == "node-2"


def test_an_added_node_is_dual_stack_and_every_peer_carries_its_ipv6(cli: Cli) -> None:
    added = json.loads(cli.run("node-add").stdout)
    try:
        new = cli.state().node(added["node"])
        assert new.ipv6 == lab.ipv6_twin(new.ip)
        pod = json.loads(cli.run("pod-add", new.name).stdout)
        wanted = {new.ip, new.ipv6, *pod["ips"]}
        peers = ("node-1", "node-2", "node-3")
        wait_until(lambda: all(peer_allowed(cli, name).get(new.ip) == wanted for name in peers), 20,
                   f"{new.name} with both families on every peer")
        source = next(p for p in status(cli)["pods"] if p["node"] == "node-1")
        assert cli.run("exec", source["name"], "--", "ping", "-c", "2", "-i", "0.2", "-W", "2", address_of(pod, 6),
                       check=False).returncode == 0
    finally:
        cli.run("node-del", added["node"])
