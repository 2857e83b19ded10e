"""WireGuard over an IPv6 underlay (an AKS dual-stack node's IPv6 address as the endpoint), in the netns lab: the
device MTU is the underlay's less WireGuard's 80 bytes over IPv6 (1420 on a 1500-byte VNet), DF pings of exactly
that size pass in both inner families with one byte more refused, every node's IPv4 and IPv6 addresses are on its
peer (host encryption), and pod traffic of both families crosses the VNet only as WireGuard between the nodes' IPv6
addresses. When the tunnel's IPv6 rule is gone and the hook is frozen, the default mode falls back to plaintext
(which the VNet delivers) and strict mode drops it: strict mode covers IPv6 as well as IPv4."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from node_hook.apply.firewall import parse_counters
from tests.support.bridge_capture import Capture
from tests.support.kernel_wg import BACKEND_PARAMS, require_kernel_wireguard
from wgcni_lab.harness.netns import in_ns
from wgcni_lab.harness.netns_lab import Lab, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": ("10.240.0.70", "fd00:10:240::70"), "b": ("10.240.0.71", "fd00:10:240::71")}


def add_pods(lab: Lab) -> None:
    for node, (ipv4, ipv6) in PODS.items():
        lab.add_pod(lab.nodes[node], ipv4, ipv6=ipv6)


def add_pods_strict(lab: Lab) -> None:
    add_pods(lab)
    for node in lab.nodes.values():
        lab.write_config(node, strictMode=True)


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if request.param == "kernel":
        require_kernel_wireguard()
    with running_lab(NODES, {}, prepare=add_pods, backend=request.param, underlay="ipv6") as lab:
        yield lab


@pytest.fixture(scope="module")
def strict_lab() -> Iterator[Lab]:
    with running_lab(NODES, {}, prepare=add_pods_strict, underlay="ipv6") as lab:
        yield lab


def without_the_ipv6_tunnel_rule(lab: Lab) -> tuple[bool, list[str]]:
    """Node a's hook frozen and its IPv6 tunnel rule deleted: (whether pod a still reaches pod b's IPv6 address,
    the packets on the VNet that carry that address in the clear). The hook puts the rule back afterwards."""
    a = lab.nodes["a"]
    assert a.hook is not None
    os.kill(a.hook.pid, signal.SIGSTOP)
    try:
        a.exec("ip", "-6", "rule", "del", "pref", "99")
        capture = Capture(lab)
        reached = ping(lab, PODS["b"][1], "-W", "1").returncode == 0
        clear = [line for line in capture.lines() if PODS["b"][1] in line and "UDP" not in line]
    finally:
        os.kill(a.hook.pid, signal.SIGCONT)
    wait_until(lambda: "lookup 51820" in a.exec("ip", "-6", "rule").stdout, 10, what="the IPv6 rule repaired")
    wait_until(lambda: ping(lab, PODS["b"][1], "-W", "1").returncode == 0, 10, what="pod b reached again")
    return reached, clear


def ping(lab: Lab, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    family = "-6" if ":" in target else "-4"
    return in_ns(lab.nodes["a"].pods["pod1"].netns, "ping", family, "-c", "2", "-i", "0.2", "-W", "2", *args, target,
                 check=False)


def test_the_device_mtu_leaves_room_for_wireguard_over_ipv6(lab: Lab) -> None:
    status = lab.nodes["a"].api("status")
    assert status["mtu"] == 1420 and "1500 - 80" in status["mtuReason"] and "IPv6" in status["mtuReason"]
    a = lab.nodes["a"]
    link = a.exec("ip", "link", "show", a.wg).stdout
    assert "mtu 1420" in link


def test_the_peer_is_reached_at_its_ipv6_endpoint_and_allows_both_node_addresses(lab: Lab) -> None:
    a, b = lab.nodes["a"], lab.nodes["b"]
    endpoints = a.exec("wg", "show", a.wg, "endpoints").stdout
    assert f"[{b.ipv6}]:51820" in endpoints
    allowed = set(a.exec("wg", "show", a.wg, "allowed-ips").stdout.split())
    assert {f"{b.ip}/32", f"{b.ipv6}/128", "10.240.0.71/32", "fd00:10:240::71/128"} <= allowed


def test_pod_traffic_of_both_families_crosses_the_vnet_only_as_wireguard_over_ipv6(lab: Lab) -> None:
    a, b = lab.nodes["a"], lab.nodes["b"]
    capture = Capture(lab)
    results = [ping(lab, PODS["b"][0]), ping(lab, PODS["b"][1])]
    lines = capture.lines()
    assert all(result.returncode == 0 for result in results), [result.stdout for result in results]
    tunnel = {f"IP6 {a.ipv6}.51820 > {b.ipv6}.51820: UDP", f"IP6 {b.ipv6}.51820 > {a.ipv6}.51820: UDP"}
    carried = [line for line in lines if any(shape in line for shape in tunnel)]
    assert len(carried) >= 8, lines
    assert [line for line in lines if line not in carried and not underlay_control(line)] == []


def underlay_control(line: str) -> bool:
    """An IPv6 underlay's own control traffic: neighbour discovery (what ARP is on IPv4), from any address, and what
    the nodes send from their link-local addresses (router solicitations, multicast listener reports)."""
    return "IP6 fe80:" in line or "ICMP6, neighbor solicitation" in line or "ICMP6, neighbor advertisement" in line


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_a_df_ping_of_exactly_the_device_mtu_passes_and_one_byte_more_does_not(lab: Lab, family: str) -> None:
    mtu = lab.nodes["a"].api("status")["mtu"]
    target, headers = (PODS["b"][0], 28) if family == "IPv4" else (PODS["b"][1], 48)
    exact = ping(lab, target, "-M", "do", "-s", str(mtu - headers))
    assert exact.returncode == 0, exact.stdout + exact.stderr
    too_big = ping(lab, target, "-M", "do", "-s", str(mtu - headers + 1))
    assert too_big.returncode != 0 and f"mtu={mtu}" in too_big.stdout.replace(" ", ""), too_big.stdout


def test_the_default_mode_falls_back_to_plaintext_over_ipv6_while_the_rule_is_gone(lab: Lab) -> None:
    reached, clear = without_the_ipv6_tunnel_rule(lab)
    assert reached and any("ICMP6, echo request" in line for line in clear), clear


def test_strict_mode_drops_ipv6_plaintext_while_the_rule_is_gone(strict_lab: Lab) -> None:
    a = strict_lab.nodes["a"]

    def dropped() -> int:
        return parse_counters(json.loads(a.exec("nft", "-j", "list", "table", "inet", "wgcni-strict").stdout)).dropped[
            "out"]

    before = dropped()
    reached, clear = without_the_ipv6_tunnel_rule(strict_lab)
    assert not reached and clear == []
    assert dropped() >= before + 2
