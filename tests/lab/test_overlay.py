"""The lab in Azure CNI Overlay mode (`wgcni-lab up --mode overlay`): pod IPs from a /24 per node of 10.244.0.0/16,
which the fabric routes to the node (and to no VM outside the cluster); the Overlay conflist. wgcni's peers then
carry each node's pods as a few aggregates, pod traffic between nodes crosses the fabric only as WireGuard, traffic
between pods of one node stays on the node, and pod ADD/DEL reach every peer."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import Cli, captured, lab_up, peer_prefixes, ping_ring, tunnelled
from wgcni_lab import fabric, lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    with lab_up(lab_parent / "overlay", "--mode", "overlay", "--nodes", "3", "--pods-per-node", "2",
                "--daemonset-runtime", "processes") as cli:
        yield cli


def status(cli: Cli) -> dict[str, Any]:
    return cli.json("status", "--json")


def block_of(node_index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.244.{node_index}.0/24")


def expected_prefixes(node_ip: str, pod_ips: list[str]) -> set[str]:
    addresses = [ipaddress.ip_network(f"{ip}/32") for ip in (node_ip, *pod_ips)]
    return {str(prefix) for prefix in ipaddress.collapse_addresses(addresses)}


def test_pods_get_their_nodes_block_of_the_pod_cidr_and_the_overlay_conflist(cli: Cli) -> None:
    report = status(cli)
    assert (report["mode"], report["pod_cidr"]) == ("overlay", "10.244.0.0/16")
    for index, node in enumerate(report["nodes"]):
        pods = [pod for pod in report["pods"] if pod["node"] == node["name"]]
        assert len(pods) == 2 and all(ipaddress.ip_address(pod["ip"]) in block_of(index) for pod in pods)
    conflist = json.loads(cli.run("exec", "node-1", "--", "cat", "/etc/cni/net.d/10-azure.conflist").stdout)
    azure_vnet = conflist["plugins"][0]
    assert (azure_vnet["type"], azure_vnet["ipsToRouteViaHost"]) == ("azure-vnet", ["169.254.20.10"])
    assert [plugin["type"] for plugin in conflist["plugins"]][:2] == ["azure-vnet", "wgcni"]


def test_the_fabric_routes_each_nodes_block_to_it_and_no_outside_vm_reaches_a_pod(cli: Cli) -> None:
    report = status(cli)
    routes = lab.in_netns(cli.state().vnet_netns, ["ip", "route", "show", "root", "10.244.0.0/16"]).stdout
    for index, node in enumerate(report["nodes"]):
        assert f"{block_of(index)} via {node['ip']} dev {node['name']}" in routes
    pod = report["pods"][0]
    assert cli.run("exec", "client", "--", "ping", "-c", "1", "-W", "1", report["nodes"][0]["ip"],
                   check=False).returncode == 0
    assert cli.run("exec", "client", "--", "ping", "-c", "1", "-W", "1", pod["ip"], check=False).returncode != 0


def test_each_peer_carries_its_nodes_pods_as_aggregates_and_routes_them_into_the_tunnel(cli: Cli) -> None:
    report = status(cli)
    for node in report["nodes"]:
        peers = peer_prefixes(cli, node["name"])
        into_tunnel = tunnelled(cli, node["name"])
        for other in report["nodes"]:
            if other is node:
                continue
            pods = [pod["ip"] for pod in report["pods"] if pod["node"] == other["name"]]
            wanted = expected_prefixes(other["ip"], pods)
            assert set(peers[other["ip"]]) == wanted, f"{node['name']} -> {other['name']}"
            assert len(wanted) < 1 + len(pods), "the pods of a /24 aggregate"
            assert {other["ip"], *pods} <= into_tunnel, f"{node['name']} routes {other['name']}'s IPs into the tunnel"


def test_pod_traffic_between_nodes_crosses_the_fabric_only_as_wireguard_and_stays_local_on_a_node(cli: Cli) -> None:
    report = status(cli)
    same_node = [pod for pod in report["pods"] if pod["node"] == "node-1"]
    with captured(cli) as packets:
        ping_ring(cli, report["pods"], 2)
        local = cli.run("exec", same_node[0]["name"], "--", "ping", "-c", "2", "-i", "0.2", "-W", "2",
                        same_node[1]["ip"], check=False)
        assert local.returncode == 0, local.stdout
    assert len(packets) >= 12, "3 pairs x 2 echo requests and replies, each one UDP datagram"
    assert only_wireguard_between_nodes(cli.state(), packets) == []
    assert not [packet for packet in packets if same_node[1]["ip"] in (packet["src"], packet["dst"])]


def test_pod_add_and_del_in_a_block_reach_every_peer(cli: Cli) -> None:
    pod = json.loads(cli.run("pod-add", "node-2").stdout)
    assert ipaddress.ip_address(pod["ip"]) in block_of(1)
    node_2 = next(node for node in status(cli)["nodes"] if node["name"] == "node-2")

    def peers_cover(present: bool) -> bool:
        return all((pod["ip"] in lab.covered(peer_prefixes(cli, name)[node_2["ip"]])) == present
                   for name in ("node-1", "node-3"))

    wait_until(lambda: peers_cover(True), 15, "the new pod on node-2's peer everywhere")
    source = next(p for p in status(cli)["pods"] if p["node"] == "node-1")
    assert cli.run("exec", source["name"], "--", "ping", "-c", "1", "-W", "2", pod["ip"], check=False).returncode == 0
    cli.run("pod-del", pod["name"])
    wait_until(lambda: peers_cover(False), 15, "the deleted pod gone from node-2's peer everywhere")


def test_an_added_node_gets_the_next_block_and_a_pod_ip_never_moves(cli: Cli) -> None:
    added = json.loads(cli.run("node-add").stdout)
    try:
        new = cli.state().node(added["node"])
        assert all(ipaddress.ip_address(ip) in block_of(3) for ip in new.pod_ips)
        pod = json.loads(cli.run("pod-add", added["node"]).stdout)
        assert ipaddress.ip_address(pod["ip"]) in block_of(3)
        with pytest.raises(lab.LabError, match="never moves"):
            fabric.move_ip(cli.state(), pod["ip"], "node-1")
    finally:
        cli.run("node-del", added["node"])
