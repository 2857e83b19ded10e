"""Dual-stack pods over an IPv4 underlay (Azure CNI dual-stack's pods, in the netns lab): each pod has an IPv4 and an
IPv6 address; the hook puts both on its node's peer and routes both into the tunnel (table and rule in both
families), pod traffic of either family crosses the VNet only as WireGuard over IPv4, and an IPv6 packet of exactly
the device MTU passes with one byte more refused (the device's MTU is the underlay's less WireGuard's 60 bytes over
IPv4, whatever the inner family); IPv6 between pods of one node never reaches the VNet, and an IPv6 address that
moves to a pod on another node is routed to its new node."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.support.bridge_capture import Capture
from tests.support.kernel_wg import BACKEND_PARAMS, require_kernel_wireguard
from wgcni_lab.harness.netns import PYTHON, in_ns
from wgcni_lab.harness.netns_lab import Lab, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": [("10.240.0.70", "fd00:10:240::70")], "b": [("10.240.0.71", "fd00:10:240::71"),
                                                          ("10.240.0.72", "fd00:10:240::72")]}

ECHO_SERVER = """
import socket
server = socket.socket(socket.AF_INET6); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", 5203)); server.listen(1); print("ready", flush=True)
connection, peer = server.accept()
data = b""
while len(data) < 200000:
    chunk = connection.recv(65536)
    if not chunk:
        break
    data += chunk
connection.sendall(str(len(data)).encode()); connection.close()
"""

ECHO_CLIENT = """
import socket, sys
connection = socket.create_connection((sys.argv[1], 5203), timeout=10)
connection.sendall(b"x" * 200000); connection.shutdown(socket.SHUT_WR); print(connection.recv(100).decode())
"""


def add_dual_stack_pods(lab: Lab) -> None:
    for node, pods in PODS.items():
        for ipv4, ipv6 in pods:
            lab.add_pod(lab.nodes[node], ipv4, ipv6=ipv6)


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if request.param == "kernel":
        require_kernel_wireguard()
    with running_lab(NODES, {}, prepare=add_dual_stack_pods, backend=request.param) as lab:
        yield lab


def ping6(lab: Lab, source: str, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    netns = next(pod.netns for node in lab.nodes.values() for pod in node.pods.values() if pod.ipv6 == source)
    return in_ns(netns, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", *args, target, check=False)


def test_both_addresses_of_a_pod_are_on_its_nodes_peer_and_routed_into_the_tunnel(lab: Lab) -> None:
    a = lab.nodes["a"]
    allowed = a.exec("wg", "show", a.wg, "allowed-ips").stdout
    assert {"10.240.0.35/32", "10.240.0.71/32", "10.240.0.72/32"} <= set(allowed.split())
    assert {"fd00:10:240::71/128", "fd00:10:240::72/128"} <= set(allowed.split())  # ::71-::72 span two /127s
    table = a.exec("ip", "-6", "route", "show", "table", "51820").stdout
    assert f"fd00:10:240::71 dev {a.wg}" in table and f"fd00:10:240::72 dev {a.wg}" in table
    assert "throw fd00:10:240::70" in table, "the local pod's IPv6 stays local"
    assert "not from all fwmark 0x100000/0x100000 lookup 51820" in a.exec("ip", "-6", "rule").stdout


def test_ipv6_pod_traffic_crosses_the_vnet_only_as_wireguard_over_ipv4(lab: Lab) -> None:
    capture = Capture(lab)
    result = ping6(lab, "fd00:10:240::70", "fd00:10:240::71")
    lines = capture.lines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines, "the capture saw the tunnelled echo"
    assert all("10.240.0.4.51820 > 10.240.0.35.51820" in line or "10.240.0.35.51820 > 10.240.0.4.51820" in line
               for line in lines), lines


def test_tcp_over_ipv6_between_pods_on_two_nodes(lab: Lab) -> None:
    server_netns = lab.nodes["b"].pods["pod2"].netns
    server = subprocess.Popen(["ip", "netns", "exec", server_netns, PYTHON, "-c", ECHO_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = in_ns(lab.nodes["a"].pods["pod1"].netns, PYTHON, "-c", ECHO_CLIENT, "fd00:10:240::71")
        assert client.stdout.strip() == "200000"
    finally:
        server.kill()
        server.wait()


def test_ipv4_and_ipv6_reach_the_same_pod(lab: Lab) -> None:
    assert in_ns(lab.nodes["a"].pods["pod1"].netns, "ping", "-c", "1", "-W", "2", "10.240.0.72",
                 check=False).returncode == 0
    assert ping6(lab, "fd00:10:240::70", "fd00:10:240::72").returncode == 0


def test_an_ipv6_ping_of_exactly_the_device_mtu_passes_and_one_byte_more_does_not(lab: Lab) -> None:
    mtu = lab.nodes["a"].api("status")["mtu"]
    exact = ping6(lab, "fd00:10:240::70", "fd00:10:240::71", "-M", "do", "-s", str(mtu - 48))  # IPv6 + ICMPv6
    assert exact.returncode == 0, exact.stdout + exact.stderr
    too_big = ping6(lab, "fd00:10:240::70", "fd00:10:240::71", "-M", "do", "-s", str(mtu - 47))
    assert too_big.returncode != 0 and f"mtu={mtu}" in too_big.stdout.replace(" ", ""), too_big.stdout


def test_ipv6_between_pods_of_one_node_stays_on_the_node(lab: Lab) -> None:
    capture = Capture(lab)
    result = ping6(lab, "fd00:10:240::71", "fd00:10:240::72")
    lines = capture.lines()
    assert result.returncode == 0, result.stdout
    assert [line for line in lines if "fd00:10:240::" in line] == [] and not [line for line in lines if "UDP" in line]


def test_an_ipv6_address_that_moves_to_another_node_is_routed_there(lab: Lab) -> None:
    a, b = lab.nodes["a"], lab.nodes["b"]
    moved = "fd00:10:240::72"
    lab.delete_pod(b.pods["pod3"])
    lab.add_pod(a, "10.240.0.73", name="moved", ipv6=moved)  # the freed address, given to a pod on node a
    lab.sync_peers()
    lab.wait_converged()

    def routed_to_a() -> bool:
        """b routes it into the tunnel and allows it from a's peer; a keeps it local and allows it from no peer."""
        on_b = b.exec("ip", "-6", "route", "show", "table", "51820").stdout
        allowed_on_b = b.exec("wg", "show", b.wg, "allowed-ips").stdout.splitlines()
        from_a = next(line for line in allowed_on_b if line.startswith(a.exec("wg", "show", a.wg, "public-key")
                                                                        .stdout.strip()))
        on_a = a.exec("ip", "-6", "route", "show", "table", "51820").stdout
        return (f"{moved} dev {b.wg}" in on_b and f"{moved}/128" in from_a.split() and f"throw {moved}" in on_a
                and f"{moved}/128" not in a.exec("wg", "show", a.wg, "allowed-ips").stdout)

    wait_until(routed_to_a, 10, what=f"{moved} routed from b to a")
    # the first echo may wait for a's neighbour discovery of the new pod: answered within a few tries
    wait_until(lambda: in_ns(b.pods["pod2"].netns, "ping", "-6", "-c", "1", "-W", "1", moved,
                             check=False).returncode == 0, 10, what=f"{moved} answers from node a")
