"""Strict mode on real namespaces: the strict table as nftables holds it (counters kept across re-applies, the boot
file, delete), and on three simulated nodes with real packets on the VNet bridge - a destination not known yet is
dropped and counted, never sent in plaintext, also while the hook is frozen or dead; a keyless (opted-out) node is
still reached in plaintext; once the peers know the pod it is reached encrypted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node_hook.apply.firewall import NftFirewall, parse_counters, render_strict_boot
from node_hook.contracts import FirewallSpec, PlaintextCounters, StrictSpec
from tests.netns.test_three_nodes import Capture, ping
from wgcni_lab.harness.netns_lab import Lab, Node, Pod, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

CLUSTER = (ipaddress.ip_network("10.240.0.0/16"), ipaddress.ip_network("fd00:240::/64"))
ALLOW = (ipaddress.ip_network("168.63.129.16/32"), ipaddress.ip_network("169.254.169.254/32"))


def _spec(boot_file: Path, enforce: bool = True, **changes: object) -> FirewallSpec:
    strict = StrictSpec("wgcni-strict", enforce, True, 0x100000, "wgcni0", ("azv",), 51820, CLUSTER, ALLOW,
                        boot_file=str(boot_file))
    return FirewallSpec("wgcni", 0x100000, "wgcni0", ("azv",), 51820, replace(strict, **changes))  # type: ignore[arg-type]


def _send(target: str) -> subprocess.CompletedProcess[str]:
    """One ping from the current namespace's host (the output chain): out of the veth underlay."""
    return subprocess.run(["ping", "-n", "-c", "1", "-W", "0.3", target], capture_output=True, text=True)


def test_strict_table_drops_counts_keeps_counters_and_boot_file(netns: str, tmp_path: Path) -> None:
    subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"], check=True)
    subprocess.run(["ip", "addr", "add", "10.240.0.4/16", "dev", "eth0"], check=True)
    subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
    subprocess.run(["ip", "-6", "addr", "add", "fd00:240::4/64", "dev", "eth0", "nodad"], check=True)
    boot = tmp_path / "strict.nft"
    firewall = NftFirewall("wgcni", boot_file=boot)
    spec = _spec(boot)
    listing = firewall.apply(spec)
    assert listing == firewall.read()
    assert boot.read_text() == render_strict_boot(spec.strict)  # type: ignore[arg-type]
    assert _send("10.240.0.9").returncode != 0  # a cluster address, not through the tunnel: dropped
    assert _send("10.240.0.9").returncode != 0
    counters = firewall.counters()
    assert counters is not None and counters.dropped["out"] == 2 and counters.counted["out"] == 0
    assert counters.top["out"] == [("10.240.0.9", 2)]
    subprocess.run(["ip", "-6", "neigh", "replace", "fd00:240::9", "lladdr", "02:00:00:00:00:09", "dev", "eth0"],
                   check=True)
    assert _send("fd00:240::9").returncode != 0  # IPv6 the same way
    counters = firewall.counters()
    assert counters is not None and counters.dropped["out"] == 3 and ("fd00:240::9", 1) in counters.top["out"]
    # an exempt address (an opted-out node's) passes; the counters and the hits survive the re-apply
    exempt = _spec(boot, exempt=(ipaddress.ip_network("10.240.0.9/32"),))
    assert firewall.apply(exempt) != listing
    assert "Operation not permitted" not in _send("10.240.0.9").stderr  # sent (nobody answers on the veth)
    counters = firewall.counters()
    assert counters is not None and counters.dropped["out"] == 3 and ("10.240.0.9", 2) in counters.top["out"]
    # permissive: counted, not dropped, and no boot file
    firewall.apply(_spec(boot, enforce=False))
    assert not boot.exists()
    result = _send("10.240.0.10")
    assert "Operation not permitted" not in result.stderr
    counters = firewall.counters()
    assert counters is not None and counters.counted["out"] == 1 and counters.dropped["out"] == 3
    _send("192.0.2.1")  # outside the cluster: neither counted nor dropped
    assert firewall.counters().counted["out"] == 1  # type: ignore[union-attr]
    # the boot file loads where the table is missing and refuses (changing nothing) where it exists
    firewall.apply(spec)
    load = subprocess.run(["nft", "-f", str(boot)], capture_output=True, text=True)
    assert load.returncode != 0 and "File exists" in load.stderr
    assert firewall.counters().dropped["out"] == 3  # type: ignore[union-attr]
    firewall.delete()
    assert firewall.read() is None and firewall.counters() is None and not boot.exists()
    boot.write_text(render_strict_boot(spec.strict))  # type: ignore[arg-type]
    subprocess.run(["nft", "-f", str(boot)], check=True)
    assert _send("10.240.0.9").returncode != 0
    assert firewall.counters().dropped["out"] == 1  # type: ignore[union-attr]
    firewall.delete()
    firewall.delete()


NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": ["10.240.0.70"], "b": ["10.240.0.71"]}
KEYLESS = ("c", "10.240.0.66", "10.240.0.72")  # a node without WireGuard (opted out), and its pod


def _strict_config(lab: Lab) -> None:
    for node in lab.nodes.values():
        lab.write_config(node, strictMode=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """a and b strict, each with its hook; c has no hook and is announced without a key, as an opted-out node is."""
    with running_lab(NODES, PODS, _strict_config) as lab:
        name, ip, pod_ip = KEYLESS
        keyless = lab.add_node(name, ip)
        lab.add_pod(keyless, pod_ip, record=False)
        for node in lab.nodes.values():  # plaintext across the bridge needs ARP answers for pod IPs
            node.exec("sysctl", "-qw", "net.ipv4.conf.eth0.proxy_arp=1")
        sync(lab)
        yield lab


def sync(lab: Lab, hold_back: tuple[Pod, ...] = ()) -> None:
    """The peers files from the hooks' announcements (the pods in `hold_back` left out), plus the keyless node."""
    for pod in hold_back:
        del pod.node.pods[pod.name]
    try:
        name, ip, pod_ip = KEYLESS
        keyless = lab.nodes.pop(name)
        try:
            lab.sync_peers()
        finally:
            lab.nodes[name] = keyless
        for node in lab.nodes.values():
            if node.name == name:
                continue
            peers = json.loads(node.peers_file.read_text())
            peers["nodes"].append({"name": name, "publicKey": "", "endpoint": ip, "endpointPort": 51820,
                                   "nodeIPs": [ip], "podIPs": [pod_ip], "podIPsChangedAt": 1.0})
            node.peers_file.write_text(json.dumps(peers))
    finally:
        for pod in hold_back:
            pod.node.pods[pod.name] = pod


def counters(node: Node) -> PlaintextCounters:
    return parse_counters(json.loads(node.exec("nft", "-j", "list", "table", "inet", "wgcni-strict").stdout))


def mentions(line: str, ip: str) -> bool:
    """Whether a `tcpdump -nn` line has `ip` as its source or destination, in each form tcpdump prints it: `ip > `,
    `> ip: ` (ICMP) and `ip.port` (TCP, UDP)."""
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?=[ :.,]|$)", line) is not None


def plaintext(lines: list[str], ip: str) -> list[str]:
    """Packets on the bridge that carry `ip` in the clear to or from a WireGuard node (WireGuard's UDP carries only
    node IPs outside; the keyless node's pod is reached in plaintext by design)."""
    return [line for line in lines if mentions(line, ip) and "UDP" not in line and not mentions(line, KEYLESS[2])]


def test_an_address_is_found_on_either_side_of_a_capture_line() -> None:
    icmp = "12:00:00.1 IP 10.240.0.70 > 10.240.0.71: ICMP echo request, id 1, seq 1, length 64"
    tcp = "12:00:00.2 IP 10.240.0.73.41000 > 10.240.0.7.80: Flags [S], seq 1, length 0"
    assert mentions(icmp, "10.240.0.70") and mentions(icmp, "10.240.0.71")
    assert mentions(tcp, "10.240.0.73") and mentions(tcp, "10.240.0.7")
    assert not mentions(icmp, "10.240.0.7") and not mentions(tcp, "10.240.0.4")
    assert plaintext([icmp], "10.240.0.71") == [icmp], "a packet sent to the address is plaintext too"


def pod_of(lab: Lab, ip: str) -> Pod:
    return next(pod for node in lab.nodes.values() for pod in node.pods.values() if pod.ip == ip)


def wait_reachable(lab: Lab, source: Pod, ip: str, timeout: float = 20) -> None:
    wait_until(lambda: ping(source.netns, ip).returncode == 0, timeout, what=f"{source.ip} reaches {ip}")


def test_known_pods_reached_encrypted_and_keyless_node_in_plaintext(lab: Lab) -> None:
    a_pod, b_pod = pod_of(lab, "10.240.0.70"), pod_of(lab, "10.240.0.71")
    wait_reachable(lab, a_pod, b_pod.ip)
    wait_reachable(lab, a_pod, KEYLESS[2])
    capture = Capture(lab)
    assert ping(a_pod.netns, b_pod.ip).returncode == 0
    assert ping(b_pod.netns, KEYLESS[2]).returncode == 0
    lines = capture.lines()
    assert plaintext(lines, b_pod.ip) == []
    assert any(f"IP {KEYLESS[2]} > " in line and "echo reply" in line for line in lines), "plaintext answer"


def _new_pod_dropped_until_known(lab: Lab, freeze: str | None) -> None:
    a, b = lab.nodes["a"], lab.nodes["b"]
    b_pod = pod_of(lab, "10.240.0.71")
    if freeze == "stop":
        os.kill(a.hook.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    elif freeze == "kill":
        a.stop_hook()
    try:
        ip = {None: "10.240.0.80", "stop": "10.240.0.81", "kill": "10.240.0.82"}[freeze]
        if freeze:  # the plugin's notification times out (its 250 ms bound); the record is on disk all the same
            notify, lab.notify = lab.notify, lambda pod, op: None  # type: ignore[method-assign]
        try:
            new = lab.add_pod(a, ip)
        finally:
            if freeze:
                lab.notify = notify  # type: ignore[method-assign]
        sync(lab, hold_back=(new,))  # b does not know the new pod yet
        before = counters(b).dropped["out"]
        capture = Capture(lab)
        for _ in range(3):
            assert ping(b_pod.netns, new.ip, "-W", "0.5").returncode != 0
        assert ping(new.netns, b_pod.ip, "-W", "0.5").returncode != 0  # b drops what a's new pod sends it
        lines = capture.lines()
        assert plaintext(lines, new.ip) == [], "\n".join(lines)
        after = counters(b)
        assert after.dropped["out"] >= before + 3
        assert dict(after.top["out"]).get(new.ip, 0) >= 3  # named among the destinations hit most
        assert a.exec("nft", "list", "table", "inet", "wgcni-strict").returncode == 0  # kernel state, hook or not
    finally:
        if freeze == "stop":
            os.kill(a.hook.pid, signal.SIGCONT)  # type: ignore[union-attr]
        elif freeze == "kill":
            lab.start_hook(a)
    sync(lab)
    capture = Capture(lab)
    wait_reachable(lab, b_pod, new.ip)
    assert plaintext(capture.lines(), new.ip) == []


def test_new_pod_is_dropped_never_plaintext_until_its_peers_know_it(lab: Lab) -> None:
    _new_pod_dropped_until_known(lab, None)


def test_frozen_hook_keeps_strict_mode_in_the_kernel(lab: Lab) -> None:
    _new_pod_dropped_until_known(lab, "stop")


def test_dead_hook_keeps_strict_mode_in_the_kernel(lab: Lab) -> None:
    _new_pod_dropped_until_known(lab, "kill")


def test_strict_to_permissive_and_back_is_applied_live(lab: Lab) -> None:
    """The config file changes under the running hook: permissive counts (and sends) what strict dropped, and strict
    drops it again; the boot file follows; the hook is never restarted."""
    a, b = lab.nodes["a"], lab.nodes["b"]
    hook_pid = a.hook.pid  # type: ignore[union-attr]
    a_pod = pod_of(lab, "10.240.0.70")
    unknown = lab.add_pod(b, "10.240.0.83")
    sync(lab, hold_back=(unknown,))  # a never learns it in this test: plaintext to it is what the modes differ on

    def mode_is(enforce: bool) -> bool:
        listing = a.exec("nft", "list", "chain", "inet", "wgcni-strict", "plaintext-out4").stdout
        return (" drop" in listing) == enforce and (a.state_dir / "strict.nft").exists() == enforce

    lab.write_config(a, strictMode=False)
    wait_until(lambda: mode_is(False), 30, what="a to count instead of dropping")
    assert a.api("status")["strict"]["mode"] == "permissive"
    before = counters(a)
    ping(a_pod.netns, unknown.ip, "-W", "0.5")
    assert counters(a).counted["out"] > before.counted["out"]  # sent in plaintext, counted
    lab.write_config(a, strictMode=True)
    wait_until(lambda: mode_is(True), 30, what="a to drop again")
    before = counters(a)
    capture = Capture(lab)
    assert ping(a_pod.netns, unknown.ip, "-W", "0.5").returncode != 0
    assert plaintext(capture.lines(), unknown.ip) == []
    assert counters(a).dropped["out"] > before.dropped["out"]
    assert a.hook.pid == hook_pid and a.hook.poll() is None  # type: ignore[union-attr]
