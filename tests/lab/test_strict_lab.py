"""Strict mode in the lab, proven by captures at the ingress of Azure's fabric (which delivers plaintext to any pod
IP, as Azure's does): with `strictMode: true` no pod packet crosses the fabric in plaintext between WireGuard nodes -
not while node-1's DaemonSet pod is frozen as a new pod starts there, not during a churn of new pods each pinged at
once from another node, not while a strict node reboots - and the drops are counted by the kernel. What must keep
working does: NodePort from the client VM, hostNetwork pods, an opted-out node's pods (in plaintext, by design).

One lab (3 nodes x 1 pod, strict) for the module; the tests run in file order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from node_hook.apply.firewall import parse_counters
from node_hook.contracts import PlaintextCounters
from tests.lab.conftest import Cli, captured, lab_up
from tests.lab.test_fabric import ASK, ECHO_PORT, ECHO_SERVER, Service, not_from_or_to_the_client
from wgcni_lab import lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    # The DaemonSet as bare processes: this module does not test it (test_daemonset_image.py, test_lifecycle.py do)
    with lab_up(lab_parent / "strict", "--nodes", "3", "--pods-per-node", "1", "--setting", "strictMode=true",
                "--daemonset-runtime", "processes") as cli:
        yield cli


def pod_on(cli: Cli, node: str) -> dict[str, Any]:
    return next(pod for pod in cli.json("status", "--json")["pods"] if pod["node"] == node)


def ping(cli: Cli, source: str, target: str, *args: str) -> bool:
    return cli.run("exec", source, "--", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", *args, target,
                   check=False).returncode == 0


def counters(cli: Cli, node: str) -> PlaintextCounters:
    listing = cli.run("exec", node, "--", "nft", "-j", "list", "table", "inet", "wgcni-strict").stdout
    return parse_counters(json.loads(listing))


def plaintext(cli: Cli, packets: list[dict[str, Any]], *besides: str) -> list[dict[str, Any]]:
    """What crossed the fabric other than WireGuard between nodes, leaving out the client's own legs and packets of
    the addresses in `besides` (an opted-out node's)."""
    return [packet for packet in only_wireguard_between_nodes(cli.state(), not_from_or_to_the_client(packets))
            if packet["src"] not in besides and packet["dst"] not in besides]


def test_strict_status_and_table_on_every_node(cli: Cli) -> None:
    for node in ("node-1", "node-2", "node-3"):
        status = json.loads(cli.run("exec", node, "--", "wgcni", "status", "--json").stdout)
        assert status["strict"]["mode"] == "strict", status["strict"]
        assert status["ready"] and status["publication"]["state"] == "confirmed"  # the node itself stays ready
        listing = cli.run("exec", node, "--", "nft", "list", "table", "inet", "wgcni-strict").stdout
        assert "10.240.0.0/16" in listing and " drop" in listing


def test_frozen_hook_new_pod_is_dropped_never_plaintext_then_reachable_encrypted(cli: Cli) -> None:
    remote = pod_on(cli, "node-2")
    cli.run("hook", "node-1", "stop")
    try:
        new = json.loads(cli.run("pod-add", "node-1").stdout)  # ADD while the hook (and its wireguard-go) is frozen
        before = counters(cli, "node-2").dropped["out"]
        with captured(cli) as packets:
            reached = ping(cli, remote["name"], new["ip"])
        assert not reached
        assert plaintext(cli, packets) == [], [packet["line"] for packet in plaintext(cli, packets)]
        after = counters(cli, "node-2")
        assert after.dropped["out"] >= before + 3, "node-2 counts what it drops"
        assert dict(after.top["out"]).get(new["ip"], 0) >= 3, after.top
    finally:
        cli.run("hook", "node-1", "start")
    with captured(cli) as packets:
        wait_until(lambda: ping(cli, remote["name"], new["ip"]), 60, "the new pod to be reached once the hook runs")
    assert packets and plaintext(cli, packets) == []


def test_churn_of_new_pods_each_pinged_at_once_from_another_node_is_never_plaintext(cli: Cli) -> None:
    remote = pod_on(cli, "node-2")
    answered: dict[str, bool] = {}
    pingers: list[threading.Thread] = []

    def ping_at_once(ip: str) -> None:  # from the moment ADD returned, until it answers (at most 30 s)
        result = cli.run("exec", remote["name"], "--", "ping", "-n", "-c", "1", "-w", "30", "-i", "0.05", ip,
                         check=False, timeout=60)
        answered[ip] = result.returncode == 0

    with captured(cli) as packets:
        for _ in range(5):
            new = json.loads(cli.run("pod-add", "node-1").stdout)
            pinger = threading.Thread(target=ping_at_once, args=(new["ip"],))
            pinger.start()
            pingers.append(pinger)
        for pinger in pingers:
            pinger.join(90)
    assert len(answered) == 5 and all(answered.values()), answered
    assert packets and plaintext(cli, packets) == [], [packet["line"] for packet in plaintext(cli, packets)]


@pytest.fixture(scope="module")
def echo(cli: Cli) -> Iterator[dict[str, Any]]:
    pod = pod_on(cli, "node-2")
    server = subprocess.Popen(["nsenter", f"--net={pod['netns']}", "--", sys.executable, "-c", ECHO_SERVER,
                               str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield pod
    finally:
        server.kill()
        server.wait()


def ask(cli: Cli, source: str, ip: str, port: int) -> str | None:
    result = cli.run("exec", source, "--", sys.executable, "-c", ASK, ip, str(port), check=False)
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.parametrize(("node", "policy"), [("node-2", "Local"), ("node-2", "Cluster"), ("node-1", "Cluster")])
def test_node_port_from_the_outside_client_works(cli: Cli, echo: dict[str, Any], node: str, policy: str) -> None:
    node_ip = cli.state().node(node).ip
    with Service(cli, "web", "--pod", echo["name"], "--port", str(ECHO_PORT), "--node-port", "30080",
                 "--external-traffic-policy", policy):
        with captured(cli) as packets:
            answer = ask(cli, "client", node_ip, 30080)
    assert answer is not None, "the client's NodePort connection failed in strict mode"
    assert plaintext(cli, packets) == []


def test_host_network_pod_and_cluster_dns_style_traffic_work(cli: Cli, echo: dict[str, Any]) -> None:
    host_pod = json.loads(cli.run("pod-add", "node-1", "--host-network").stdout)
    source = pod_on(cli, "node-1")
    with Service(cli, "dns", "--pod", echo["name"], "--port", str(ECHO_PORT)) as service:  # a ClusterIP elsewhere
        with captured(cli) as packets:
            from_host = ping(cli, host_pod["name"], echo["ip"])
            to_host = ping(cli, echo["name"], host_pod["ip"])
            via_service = ask(cli, source["name"], service["cluster_ip"], ECHO_PORT)
    assert from_host and to_host and via_service == source["ip"]
    assert packets and plaintext(cli, packets) == []


UDP_ANSWER = """
import socket, sys
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("0.0.0.0", 53))
print("listening", flush=True)
while True:
    data, peer = server.recvfrom(512)
    server.sendto(data[::-1], peer)
"""
UDP_ASK = """
import socket, sys
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
client.settimeout(2)
client.sendto(b"wgcni.example.", (sys.argv[1], 53))
print(client.recvfrom(512)[0].decode())
"""


def test_dns_over_udp_to_a_pod_on_another_node(cli: Cli) -> None:
    """What a pod's DNS query to CoreDNS on another node is: UDP to port 53 of a pod there, answered."""
    server_pod, client_pod = pod_on(cli, "node-2"), pod_on(cli, "node-1")
    server = subprocess.Popen(["nsenter", f"--net={server_pod['netns']}", "--", sys.executable, "-c", UDP_ANSWER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        with captured(cli) as packets:
            answer = cli.run("exec", client_pod["name"], "--", sys.executable, "-c", UDP_ASK, server_pod["ip"])
        assert answer.stdout.strip() == "wgcni.example."[::-1]
    finally:
        server.kill()
        server.wait()
    assert packets and plaintext(cli, packets) == []


def test_reboot_of_a_strict_node_leaks_nothing(cli: Cli) -> None:
    target, remote = pod_on(cli, "node-1"), pod_on(cli, "node-2")
    stop = threading.Event()

    def keep_pinging() -> None:  # the pod's address before the reboot (its new sandbox may get another)
        while not stop.is_set():
            cli.run("exec", remote["name"], "--", "ping", "-n", "-c", "5", "-i", "0.1", "-W", "1", target["ip"],
                    check=False)

    with captured(cli, seconds=300) as packets:
        pinger = threading.Thread(target=keep_pinging)
        pinger.start()
        try:
            cli.run("reboot", "node-1", timeout=300)
            back = next(pod for pod in cli.json("status", "--json")["pods"] if pod["name"] == target["name"])
            wait_until(lambda: ping(cli, remote["name"], back["ip"]), 60, "node-1's pod back after the reboot")
        finally:
            stop.set()
            pinger.join(60)
    # A node that boots has no WireGuard port for a moment: the kernel answers the peers' WireGuard packets with ICMP
    # port unreachable, quoting their (encrypted) first bytes - the one packet between nodes that is not WireGuard.
    leaked = [packet["line"] for packet in plaintext(cli, packets)
              if f"udp port {lab.WG_PORT} unreachable" not in packet["line"]]
    assert packets and leaked == [], leaked


def test_an_opted_out_node_is_reached_in_plaintext(cli: Cli) -> None:
    source, opted = pod_on(cli, "node-1"), pod_on(cli, "node-3")
    node_3 = cli.state().node("node-3").ip
    cli.run("label", "node-3", "wgcni.io/wireguard=disabled")
    wait_until(lambda: json.loads(cli.run("exec", "node-3", "--", "wgcni", "status", "--json").stdout)
               ["strict"]["mode"] == "opted-out", 60, "node-3 to see itself opted out")
    wait_until(lambda: ping(cli, source["name"], opted["ip"]), 60, "node-1's pod to reach the opted-out node's pod")
    with captured(cli) as packets:
        assert ping(cli, source["name"], opted["ip"]) and ping(cli, opted["name"], source["ip"])
    assert any(packet["src"] == opted["ip"] and packet["proto"] == "icmp" for packet in packets)
    assert plaintext(cli, packets, opted["ip"], node_3) == []
