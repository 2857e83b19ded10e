"""The lab's VNet as Azure's fabric, its client VM and its kube-proxy Services, end to end through `wgcni-lab`.

One lab (2 nodes x 1 pod, Azure's underlay) is shared by the module; a second, one-node lab checks
`--no-azure-underlay`. Facts are checked with independent tools: `wgcni-lab capture` (tcpdump at the fabric's
ingress), tcpdump inside a node, ping with the hook's fwmark (which skips wgcni's table, as a node that has not
learned a pod IP would send), `ip route get` / `ip neigh` / `ip link`, `iptables-save`, and a TCP echo server in a
pod that answers with the source address it sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import Cli, captured, force_down, lab_up
from wgcni_lab import fabric, lab
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

SKIP_TUNNEL = str(lab.HOOK_DEFAULTS.fwmark)  # ping -m: the hook's rule sends marked packets past its table
ECHO_PORT = 8080
ECHO_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(16)
print("listening", flush=True)
while True:
    connection, peer = server.accept()
    connection.sendall(f"{peer[0]}\\n".encode())
    connection.close()
"""
ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as connection:
    print(connection.recv(100).decode().strip())
"""


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    # The DaemonSet as bare processes: this module does not test it (test_daemonset_image.py, test_lifecycle.py do)
    with lab_up(lab_parent / "fabric", "--nodes", "2", "--pods-per-node", "1",
                "--daemonset-runtime", "processes") as cli:
        yield cli


@pytest.fixture(scope="module")
def status(cli: Cli) -> dict[str, Any]:
    return cli.json("status", "--json")


def pod_on(status: dict[str, Any], node: str) -> dict[str, Any]:
    return next(pod for pod in status["pods"] if pod["node"] == node)


def node_ip(status: dict[str, Any], node: str) -> str:
    return next(entry["ip"] for entry in status["nodes"] if entry["name"] == node)


@pytest.fixture(scope="module")
def echo(cli: Cli, status: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A TCP server in node-2's pod on ECHO_PORT that answers each connection with the peer address it sees."""
    pod = pod_on(status, "node-2")
    server = subprocess.Popen(["nsenter", f"--net={pod['netns']}", "--", sys.executable, "-c", ECHO_SERVER,
                               str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield pod
    finally:
        server.kill()
        server.wait()


def ask(cli: Cli, source: str, ip: str, port: int) -> str | None:
    """Connect from `source` (a pod, a node or the client) to ip:port: the echo's answer, None if it failed."""
    result = cli.run("exec", source, "--", sys.executable, "-c", ASK, ip, str(port), check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def ping(cli: Cli, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli.run("exec", source, "--", "ping", "-n", "-W", "2", *args, check=False)


def in_fabric(cli: Cli, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", cli.state().vnet_netns, *argv], capture_output=True, text=True,
                          check=True).stdout


def fabric_route(cli: Cli, ip: str) -> str:
    """The link the fabric delivers `ip` to."""
    return json.loads(in_fabric(cli, "ip", "-j", "route", "get", ip))[0]["dev"]


def icmp(packets: list[dict[str, Any]], kind: str, src: str, dst: str) -> list[dict[str, Any]]:
    return [packet for packet in packets if packet["proto"] == "icmp" and f"ICMP echo {kind}" in packet["line"]
            and (packet["src"], packet["dst"]) == (src, dst)]


def not_from_or_to_the_client(packets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [packet for packet in packets if fabric.CLIENT_IP not in (packet["src"], packet["dst"])]


def test_status_names_the_fabric_the_client_and_azure_underlay(cli: Cli, status: dict[str, Any]) -> None:
    state = cli.state()

    assert status["fabric_netns"] == state.vnet_netns and "bridge_netns" not in status
    assert status["client"] == {"name": "client", "ip": fabric.CLIENT_IP, "ips": [fabric.CLIENT_IP],
                                "netns": state.client_netns,
                                "mac": fabric.nic_mac(fabric.CLIENT_IP)}
    assert (status["gateway_mac"], status["azure_underlay"], status["services"]) == (fabric.GATEWAY_MAC, True, [])
    held = {node["ip"] for node in status["nodes"]} | {pod["ip"] for pod in status["pods"]}
    assert fabric.CLIENT_IP not in held
    assert f"{fabric.CLIENT_IP}/16" in cli.run("exec", "client", "--", "ip", "-o", "addr", "show", "eth0").stdout
    assert cli.run("exec", "client", "--", "sh", "-c", "exit 4", check=False).returncode == 4


def test_the_fabric_answers_arp_for_every_subnet_address_with_the_gateway_mac(cli: Cli,
                                                                             status: dict[str, Any]) -> None:
    nobody = "10.240.99.99"
    targets = [node_ip(status, "node-2"), pod_on(status, "node-1")["ip"], nobody]

    for target in targets:
        ping(cli, "client", "-c", "1", target)
    neighbours = json.loads(cli.run("exec", "client", "--", "ip", "-j", "neigh", "show", "dev", "eth0").stdout)

    assert {entry["dst"]: entry.get("lladdr") for entry in neighbours if entry["dst"] in targets} == {
        target: fabric.GATEWAY_MAC for target in targets}


def test_plaintext_to_a_pod_ip_of_another_node_is_delivered_and_seen_in_clear(cli: Cli,
                                                                             status: dict[str, Any]) -> None:
    """A node that sends past wgcni's table (as one that has not learned the pod IP yet would) reaches the pod in
    plaintext: Azure's fabric delivers every secondary IP to its node."""
    target = pod_on(status, "node-2")["ip"]
    with captured(cli) as packets:
        result = ping(cli, "node-1", "-c", "3", "-i", "0.2", "-m", SKIP_TUNNEL, target)

    assert result.returncode == 0, result.stdout + result.stderr
    requests = icmp(packets, "request", node_ip(status, "node-1"), target)
    assert len(requests) == 3 and {packet["link"] for packet in requests} == {"node-1"}


def test_the_fabric_drops_an_address_no_nic_holds(cli: Cli, status: dict[str, Any]) -> None:
    nobody = "10.240.99.98"

    def sink_drops() -> int:
        return json.loads(in_fabric(cli, "ip", "-j", "-s", "link", "show", fabric.SINK))[0]["stats64"]["rx"]["dropped"]

    before = sink_drops()
    with captured(cli) as packets:
        result = ping(cli, "node-1", "-c", "2", "-i", "0.2", "-m", SKIP_TUNNEL, nobody)

    assert result.returncode != 0
    assert len(icmp(packets, "request", node_ip(status, "node-1"), nobody)) == 2
    assert not [packet for packet in packets if packet["src"] == nobody]
    assert sink_drops() - before >= 2


def test_the_fabric_drops_df_packets_over_1400_bytes_and_passes_the_rest(cli: Cli, status: dict[str, Any]) -> None:
    target = node_ip(status, "node-2")

    def passes(size: int, df: str) -> bool:
        return ping(cli, "node-1", "-c", "1", "-M", df, "-s", str(size - 28), "-m", SKIP_TUNNEL,
                    target).returncode == 0

    assert passes(fabric.DF_LIMIT, "do")
    assert not passes(fabric.DF_LIMIT + 1, "do")
    assert not passes(1500, "do")
    assert passes(1500, "dont"), "without DF the underlay carries it"


def test_the_fabric_follows_a_moved_secondary_ip(cli: Cli, status: dict[str, Any]) -> None:
    state = cli.state()
    in_use = {pod["ip"] for pod in status["pods"]}
    moved = next(ip for ip in state.node("node-2").pod_ips if ip not in in_use)
    assert fabric_route(cli, moved) == "node-2"
    sniffer = subprocess.Popen(cli.argv("exec", "node-1", "--", "tcpdump", "-i", "eth0", "-Q", "in", "-nn", "-l",
                                        "-c", "1", f"icmp and dst host {moved}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sniffer.stderr is not None
        assert any(line.startswith("listening on") for line in sniffer.stderr), "tcpdump in node-1 did not start"
        fabric.move_ip(state, moved, "node-1")

        assert fabric_route(cli, moved) == "node-1"
        saved = cli.state()
        assert moved in saved.node("node-1").pod_ips and moved not in saved.node("node-2").pod_ips
        ping(cli, "client", "-c", "1", "-t", "2", moved)  # TTL 2: node-1 forwards it back once, then drops it
        output, _ = sniffer.communicate(timeout=10)
        assert f"> {moved}: ICMP echo request" in output
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait()
        fabric.move_ip(cli.state(), moved, "node-2")
    assert fabric_route(cli, moved) == "node-2"


def test_nodes_run_with_azures_mtu(cli: Cli) -> None:
    for node in ("node-1", "node-2"):
        link = json.loads(cli.run("exec", node, "--", "ip", "-j", "link", "show", lab.WG_INTERFACE).stdout)[0]
        report = json.loads(cli.run("exec", node, "--", "wgcni", "status", "--json").stdout)
        assert (link["mtu"], report["mtu"], report["azure"]) == (1340, 1340, True)


def test_a_df_ping_of_the_tunnel_mtu_between_pods_fits_the_underlay_exactly(cli: Cli, status: dict[str, Any]) -> None:
    source, target = pod_on(status, "node-1"), pod_on(status, "node-2")
    with captured(cli) as packets:
        fits = ping(cli, source["name"], "-c", "1", "-M", "do", "-s", str(1340 - 28), target["ip"])
    too_big = ping(cli, source["name"], "-c", "1", "-M", "do", "-s", str(1341 - 28), target["ip"])

    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert too_big.returncode != 0
    assert only_wireguard_between_nodes(cli.state(), packets) == []
    assert max(packet["length"] for packet in packets) == fabric.DF_LIMIT - 28, "UDP payload of a 1400-byte packet"


def test_the_capture_sees_each_packet_once(cli: Cli, status: dict[str, Any]) -> None:
    target = node_ip(status, "node-2")
    with captured(cli) as packets:
        result = ping(cli, "client", "-c", "10", "-i", "0.05", target)

    assert " 10 received" in result.stdout, result.stdout
    requests = icmp(packets, "request", fabric.CLIENT_IP, target)
    replies = icmp(packets, "reply", target, fabric.CLIENT_IP)
    seq = re.compile(r"seq (\d+)")
    assert Counter(seq.search(packet["line"])[1] for packet in requests) == Counter(str(n) for n in range(1, 11))
    assert Counter(seq.search(packet["line"])[1] for packet in replies) == Counter(str(n) for n in range(1, 11))
    assert {packet["link"] for packet in requests} == {"client"} and {p["link"] for p in replies} == {"node-2"}


class Service:
    """`wgcni-lab service-add` for the block, `service-del` afterwards."""

    def __init__(self, cli: Cli, name: str, *args: str) -> None:
        self.cli, self.name, self.args = cli, name, args

    def __enter__(self) -> dict[str, Any]:
        return json.loads(self.cli.run("service-add", self.name, *self.args).stdout)

    def __exit__(self, *_: object) -> None:
        self.cli.run("service-del", self.name)


def test_pod_to_cluster_ip_of_a_pod_on_another_node_is_wireguard_only(cli: Cli, status: dict[str, Any],
                                                                      echo: dict[str, Any]) -> None:
    source = pod_on(status, "node-1")
    with Service(cli, "web", "--pod", echo["name"], "--port", str(ECHO_PORT)) as service:
        with captured(cli) as packets:
            answer = ask(cli, source["name"], service["cluster_ip"], ECHO_PORT)

    assert answer == source["ip"], "pod traffic to a ClusterIP is not masqueraded"
    assert packets and only_wireguard_between_nodes(cli.state(), packets) == []
    addresses = {source["ip"], echo["ip"], service["cluster_ip"]}
    assert not [packet for packet in packets if {packet["src"], packet["dst"]} & addresses]


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_client_to_node_port_on_the_pods_node(cli: Cli, status: dict[str, Any], echo: dict[str, Any],
                                              policy: str) -> None:
    with Service(cli, "web", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30080",
                 "--external-traffic-policy", policy):
        answer = ask(cli, "client", node_ip(status, "node-2"), 30080)

    assert answer is not None, "the connection failed"
    if policy == "Local":
        assert answer == fabric.CLIENT_IP, "Local keeps the client's source"
    else:
        assert answer != fabric.CLIENT_IP, "Cluster masquerades"


def test_local_policy_drops_the_node_port_on_a_node_without_an_endpoint(cli: Cli, status: dict[str, Any],
                                                                        echo: dict[str, Any]) -> None:
    with Service(cli, "web", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30080",
                 "--external-traffic-policy", "Local"):
        assert ask(cli, "client", node_ip(status, "node-1"), 30080) is None
        assert ask(cli, "client", node_ip(status, "node-2"), 30080) == fabric.CLIENT_IP


def test_client_to_node_port_forwarded_to_another_node_is_wireguard_between_the_nodes(
        cli: Cli, status: dict[str, Any], echo: dict[str, Any]) -> None:
    """Cluster policy: node-1 DNATs the client's connection to the pod on node-2 and masquerades it; the hop from
    node-1 to node-2 is cluster-internal and must cross the fabric only as WireGuard (the client's own legs, to and
    from node-1, are plaintext: it is outside the cluster)."""
    with Service(cli, "web", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30080"):
        with captured(cli) as packets:
            answer = ask(cli, "client", node_ip(status, "node-1"), 30080)

    assert answer is not None and answer != fabric.CLIENT_IP, "the connection works, masqueraded"
    assert [packet for packet in packets if packet["src"] == fabric.CLIENT_IP], "the capture saw the client"
    assert only_wireguard_between_nodes(cli.state(), not_from_or_to_the_client(packets)) == []


def iptables_save(cli: Cli, node: str) -> list[str]:
    """The node's rules without the dump's comments and counters."""
    return [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in cli.run("exec", node, "--", "iptables-save").stdout
            .splitlines() if not line.startswith("#")]


def test_service_del_removes_every_rule_it_added(cli: Cli, echo: dict[str, Any]) -> None:
    before = {node: iptables_save(cli, node) for node in ("node-1", "node-2")}
    cli.run("service-add", "web", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30080")
    cli.run("service-add", "local", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30081",
            "--external-traffic-policy", "Local")
    listed = [service["name"] for service in cli.json("status", "--json")["services"]]
    during = {node: iptables_save(cli, node) for node in before}
    cli.run("service-del", "web")
    cli.run("service-del", "local")

    assert listed == ["web", "local"]
    for node in before:
        added = set(during[node]) - set(before[node])
        assert any("default/web" in rule for rule in added) and any("default/local" in rule for rule in added)
    assert '"default/local has no local endpoints"' in " ".join(during["node-1"])
    assert {node: iptables_save(cli, node) for node in before} == before
    assert cli.json("status", "--json")["services"] == []


@pytest.mark.parametrize("args", [
    ("service-add", "web", "--pod", "no-such-pod", "--port", "80"),
    ("service-add", "Web", "--pod", "node-1-pod1", "--port", "80"),
    ("service-add", "web", "--pod", "node-1-pod1", "--port", "0"),
    ("service-add", "web", "--pod", "node-1-pod1", "--port", "80", "--node-port", "80"),
    ("service-add", "web", "--pod", "node-1-pod1", "--port", "80", "--external-traffic-policy", "Local"),
    ("service-add", "web", "--pod", "node-1-pod1", "--port", "80", "--node-port", "30080",
     "--external-traffic-policy", "Nearby"),
    ("service-add", "web", "--port", "80"),
    ("service-del", "no-such-service"),
    ("exec", "client"),
], ids=["unknown-pod", "bad-name", "bad-port", "node-port-out-of-range", "policy-without-node-port", "bad-policy",
        "no-pod", "del-unknown", "exec-client-without-command"])
def test_bad_service_input_is_one_line_without_traceback(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli.run(*args, check=False)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert cli.json("status", "--json")["services"] == []


def test_without_azure_underlay_there_is_no_df_limit_and_the_mtu_is_1440(  # type: ignore[no-untyped-def]
        lab_parent, built) -> None:
    cli = Cli(lab_parent / "plain")
    try:
        cli.run("up", "--nodes", "1", "--pods-per-node", "0", "--no-azure-underlay", timeout=300)
        report = json.loads(cli.run("exec", "node-1", "--", "wgcni", "status", "--json").stdout)
        df_ping = ping(cli, "node-1", "-c", "1", "-M", "do", "-s", str(1500 - 28), fabric.CLIENT_IP)

        assert cli.json("status", "--json")["azure_underlay"] is False
        assert (report["mtu"], report["azure"]) == (1440, False)
        assert df_ping.returncode == 0, df_ping.stdout + df_ping.stderr
    finally:
        force_down(cli)
