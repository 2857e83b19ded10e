"""The local lab end to end through its CLI: `wgcni-lab up` with 3 nodes x 2 pods, the exact status shape, encrypted
cross-node pod traffic on the VNet fabric, pods added and deleted the way kubelet does it (the other nodes' peers
follow), exec exit codes, one-line errors, and `down` leaving nothing — also after a crash in the middle of `up`.
(The fabric itself, the client and Services: tests/lab/test_fabric.py.)

Facts are checked with independent tools inside the nodes (`wg show ... dump`, `ip route show table ...`, ping,
tcpdump on the fabric), not with the hooks' own reports. The tests share one lab (module scope) and run in file
order; the `down` test comes last.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node_hook.contracts import DEVICE_ADDRESS
from node_hook.local_api import request
from tests.lab.conftest import (
    Cli,
    captured,
    down_leaves_nothing,
    down_removes_a_crashed_lab,
    footprint,
    force_down,
    lab_netns_inodes,
    ping_ring,
    root_links,
)
from wgcni_lab import lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

ROUTE_TABLE = lab.HOOK_DEFAULTS.route_table
NODE_KEYS = {"name", "netns", "ip", "wg_interface", "wg_port", "hook_socket"}
POD_KEYS = {"name", "node", "netns", "ip"}


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Cli:  # type: ignore[no-untyped-def]
    cli = Cli(lab_parent / "lab")
    links_before = root_links()
    try:
        cli.run("up", "--nodes", "3", "--pods-per-node", "2", timeout=300)
        cli.links_before = links_before  # type: ignore[attr-defined]
        yield cli
    finally:
        force_down(cli)


def wg_dump(cli: Cli, node: str) -> dict[str, set[str]]:
    """endpoint address -> the addresses its peer's AllowedIPs cover, as wireguard-go on `node` has them."""
    lines = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout.splitlines()[1:]
    peers = {}
    for line in lines:
        _key, _psk, endpoint, allowed, *_ = line.split("\t")
        peers[endpoint.rsplit(":", 1)[0]] = lab.covered(allowed.split(",")) if allowed != "(none)" else set()
    return peers


def tunnel_routes(cli: Cli, node: str) -> set[str]:
    """Addresses routed into the tunnel in the hook's table on `node`."""
    routes = json.loads(cli.run("exec", node, "--", "ip", "-j", "route", "show", "table", str(ROUTE_TABLE)).stdout)
    return {address for route in routes if route.get("dev") == lab.WG_INTERFACE and route.get("type", "unicast")
            == "unicast" for address in lab.covered([route["dst"] if "/" in route["dst"] else route["dst"] + "/32"])}


def programmed_everywhere(cli: Cli, ip: str, owner_ip: str | None) -> bool:
    """On every node but the owner, `ip` is routed into the tunnel and allowed on the owner's peer only (owner None:
    on no node and no peer at all)."""
    status = cli.json("status", "--json")
    for node in status["nodes"]:
        if node["ip"] == owner_ip:
            continue
        peers = wg_dump(cli, node["name"])
        holders = {endpoint for endpoint, covered in peers.items() if ip in covered}
        routed = ip in tunnel_routes(cli, node["name"])
        if owner_ip is None and (holders or routed):
            return False
        if owner_ip is not None and (holders != {owner_ip} or not routed):
            return False
    return True


def test_status_json_has_the_exact_shape_and_aks_addressing(cli: Cli) -> None:
    status = cli.json("status", "--json")

    assert {"fabric_netns", "client", "nodes", "pods", "services"} <= set(status) and "bridge" not in status
    assert status["fabric_netns"] == cli.state().vnet_netns and status["services"] == []
    assert [node["name"] for node in status["nodes"]] == ["node-1", "node-2", "node-3"]
    assert [node["ip"] for node in status["nodes"]] == ["10.240.0.4", "10.240.0.35", "10.240.0.66"]
    for node in status["nodes"]:
        assert NODE_KEYS <= set(node)
        assert all(isinstance(node[key], str) for key in NODE_KEYS - {"wg_port"}) and node["wg_port"] == 51820
        assert node["wg_interface"] == "wgcni0", "each node has its own /var/run/wireguard: the default name"
    assert len(status["pods"]) == 6
    for pod in status["pods"]:
        assert POD_KEYS <= set(pod) and all(isinstance(pod[key], str) for key in POD_KEYS)
        assert ipaddress.ip_address(pod["ip"]) in lab.VNET and pod["ips"] == [pod["ip"]]
    assert status["ip_family"] == "ipv4" and all(node["ips"] == [node["ip"]] for node in status["nodes"])
    assert len({pod["ip"] for pod in status["pods"]}) == 6
    by_node = {node["name"]: [ipaddress.ip_address(p["ip"]) for p in status["pods"] if p["node"] == node["name"]]
               for node in status["nodes"]}
    assert all(len(ips) == 2 for ips in by_node.values())
    for name, ips in by_node.items():  # scattered: the span of one node's pods holds another node's pods
        others = [ip for other, other_ips in by_node.items() if other != name for ip in other_ips]
        assert any(min(ips) < ip < max(ips) for ip in others), f"{name}'s pods form a block: {ips}"
    human = cli.run("status").stdout
    assert "node-2" in human and status["pods"][0]["name"] in human


def test_cross_node_pod_traffic_crosses_the_fabric_only_as_wireguard(cli: Cli) -> None:
    pods = cli.json("status", "--json")["pods"]
    with captured(cli) as packets:
        ping_ring(cli, pods, 3)

    assert len(packets) >= 18, "3 pairs x 3 echo requests and replies, each one UDP datagram"
    assert only_wireguard_between_nodes(cli.state(), packets) == []
    pod_ips = {pod["ip"] for pod in pods}
    assert not [packet for packet in packets if packet["src"] in pod_ips or packet["dst"] in pod_ips]


def _pair(cli: Cli) -> tuple[dict, dict, str]:
    """A pod on node-1, a pod on node-2, and node-1's peer key for node-2."""
    pods = cli.json("status", "--json")["pods"]
    source = next(pod for pod in pods if pod["node"] == "node-1")
    target = next(pod for pod in pods if pod["node"] == "node-2")
    dump = cli.run("exec", "node-1", "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout.splitlines()[1:]
    key = next(line.split("\t")[0] for line in dump if line.split("\t")[2].startswith("10.240.0.35:"))
    return source, target, key


def test_a_removed_peer_is_back_and_so_is_the_node_pairs_pod_traffic_within_2_s(cli: Cli) -> None:
    """A ping every 5 ms from a pod on node-1 to one on node-2 while node-1's peer for node-2 is removed by hand:
    the replies lost are the outage (the peer's session goes with it: a new handshake follows the repair)."""
    source, target, key = _pair(cli)
    replies: list[str] = []
    pinger = threading.Thread(target=lambda: replies.append(cli.run(
        "exec", source["name"], "--", "ping", "-n", "-q", "-i", "0.005", "-c", "600", "-W", "1", target["ip"],
        check=False).stdout))
    pinger.start()
    time.sleep(0.5)
    cli.run("exec", "node-1", "--", "wg", "set", lab.WG_INTERFACE, "peer", key, "remove")
    pinger.join(timeout=60)
    received = int(re.search(r"(\d+) received", replies[0]).group(1))  # type: ignore[union-attr]
    outage = (600 - received) * 0.005
    print(f"removed peer: {600 - received} of 600 echo replies lost, an outage of about {outage * 1000:.0f} ms")
    assert outage <= 2.0
    assert programmed_everywhere(cli, target["ip"], "10.240.0.35")


@pytest.mark.parametrize("kind", ["rule deleted", "route deleted", "route changed", "device down", "device deleted",
                                  "address deleted"])
def test_the_plaintext_interval_of_a_repair_in_the_default_mode_is_measured(cli: Cli, kind: str) -> None:
    """A ping every 2 ms from a pod on node-1 to one on node-2 while node-1 is tampered with: in the default mode the
    traffic falls back to the main table (plaintext, through Azure's fabric) until the repair; the interval those
    packets span on the fabric is measured and bounded by the repair bound (strict mode, issue 16, makes it zero)."""
    source, target, _ = _pair(cli)
    tamper = {"rule deleted": ["ip", "rule", "del", "pref", "99"],
              "route deleted": ["ip", "route", "del", target["ip"], "table", str(ROUTE_TABLE)],
              "route changed": ["ip", "route", "replace", "blackhole", target["ip"], "table", str(ROUTE_TABLE)],
              "device down": ["ip", "link", "set", lab.WG_INTERFACE, "down"],
              "device deleted": ["ip", "link", "del", lab.WG_INTERFACE],  # its routes go with it
              "address deleted": ["ip", "address", "del", str(DEVICE_ADDRESS), "dev", lab.WG_INTERFACE],  # and routes
              }[kind]
    replies: list[str] = []
    with captured(cli) as packets:
        pinger = threading.Thread(target=lambda: replies.append(cli.run(
            "exec", source["name"], "--", "ping", "-n", "-q", "-i", "0.002", "-c", "1000", "-W", "1", target["ip"],
            check=False).stdout))
        pinger.start()
        time.sleep(0.5)
        cli.run("exec", "node-1", "--", *tamper)
        wait_until(lambda: programmed_everywhere(cli, target["ip"], "10.240.0.35")
                   and "lookup 51820" in cli.run("exec", "node-1", "--", "ip", "rule").stdout, 2.0,
                   what=f"{kind} repaired", interval=0.01)
        pinger.join(timeout=30)
    plaintext = [packet for packet in packets if packet["src"] == source["ip"] and packet["dst"] == target["ip"]]
    window = max(p["time"] for p in plaintext) - min(p["time"] for p in plaintext) if plaintext else 0.0
    print(f"{kind}: {len(plaintext)} pod packets in plaintext on the fabric over {window * 1000:.0f} ms; "
          f"ping: {replies[0].strip().splitlines()[-2] if replies else '?'}")
    assert any(packet["dport"] == 51820 for packet in packets), "the capture saw the encrypted pings"
    assert window <= 2.0


def test_exec_runs_in_the_node_or_pod_and_passes_the_exit_code(cli: Cli) -> None:
    pod = cli.json("status", "--json")["pods"][0]

    assert cli.run("exec", "node-2", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert cli.run("exec", pod["name"], "--", "sh", "-c", "exit 3", check=False).returncode == 3
    assert cli.run("exec", "node-2", "--", "wg", "show", "wgcni0", "listen-port").stdout.strip() == "51820"
    assert cli.run("exec", "node-2", "--", "test", "-S", "/run/wgcni/hook.sock", check=False).returncode == 0
    node = cli.json("status", "--json")["nodes"][1]
    assert request(Path(node["hook_socket"]), {"op": "status"})["node"] == "node-2", "reachable from the host"
    assert "10.240.0.35/16" in cli.run("exec", "node-2", "--", "ip", "-o", "addr", "show", "eth0").stdout
    assert f"{pod['ip']}/" in cli.run("exec", pod["name"], "--", "ip", "-o", "addr", "show", "eth0").stdout
    conflist = json.loads(cli.run("exec", "node-2", "--", "cat", "/etc/cni/net.d/10-azure.conflist").stdout)
    assert (conflist["name"], conflist["cniVersion"]) == ("azure", "0.3.0")
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["azure-vnet", "wgcni", "portmap"]
    assert not os.path.exists("/etc/cni/net.d/10-azure.conflist"), "the node's CNI dirs are its own"


def test_every_node_passes_its_own_wgcni_check(cli: Cli) -> None:
    """The debug CLI in each node (its private /run/wgcni socket, its own sysfs and conflist) finds nothing wrong."""
    last = {}

    def all_pass() -> bool:  # a transient finding (a pass in flight on a loaded machine) may clear: poll
        for node in ("node-1", "node-2", "node-3"):
            last[node] = cli.run("exec", node, "--", "wgcni", "check", check=False)
        return all(check.returncode == 0 for check in last.values())

    try:
        wait_until(all_pass, 15, "wgcni check to pass on every node", interval=0.5)
    except AssertionError:
        raise AssertionError({node: check.stdout + check.stderr for node, check in last.items()}) from None


def test_pod_add_and_del_update_the_peers_on_the_other_nodes(cli: Cli) -> None:
    added = json.loads(cli.run("pod-add", "node-2").stdout)
    assert added["node"] == "node-2" and POD_KEYS <= set(added)

    wait_until(lambda: programmed_everywhere(cli, added["ip"], "10.240.0.35"), 20, "the new pod's IP on every peer")
    source = next(pod for pod in cli.json("status", "--json")["pods"] if pod["node"] == "node-1")
    assert cli.run("exec", source["name"], "--", "ping", "-c", "1", "-W", "2", added["ip"], check=False).returncode == 0

    deleted = json.loads(cli.run("pod-del", added["name"]).stdout)
    assert deleted["name"] == added["name"] and deleted["ip"] == added["ip"]
    wait_until(lambda: programmed_everywhere(cli, added["ip"], None), 20, "the deleted pod's IP gone everywhere")
    assert added["name"] not in {pod["name"] for pod in cli.json("status", "--json")["pods"]}


@pytest.mark.parametrize("args", [
    ("pod-add", "node-9"), ("pod-del", "no-such-pod"), ("exec", "no-such-target", "--", "true"),
    ("up", "--nodes", "0"), ("up", "--pods-per-node", "31"), ("up",),
], ids=["pod-add-unknown-node", "pod-del-unknown-pod", "exec-unknown", "up-zero-nodes", "up-too-many-pods",
        "up-while-up"])
def test_bad_input_is_one_line_without_traceback(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli.run(*args, check=False)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_down_leaves_nothing(cli: Cli) -> None:
    down_leaves_nothing(cli, lab_netns_inodes(cli), 5)
    assert "nothing to remove" in cli.run("down").stdout, "down is idempotent"


def test_up_interrupted_midway_removes_what_it_made(lab_parent, built) -> None:  # type: ignore[no-untyped-def]
    """`up` killed (Ctrl-C, a closed terminal): the lab daemon notices and tears down; `down` finds nothing."""
    cli = Cli(lab_parent / "interrupted")
    up = subprocess.Popen(cli.argv("up", "--nodes", "2", "--pods-per-node", "1"), stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "containerd (CRI) up" in line:
                break
        state = cli.state()
        inodes = lab_netns_inodes(cli)
        up.kill()
        up.wait(30)

        wait_until(lambda: not cli.lab_dir.exists() and not footprint(state.id, cli.lab_dir, inodes).processes, 60,
                   "the lab daemon to remove the half-made lab and exit")
        after = footprint(state.id, cli.lab_dir, inodes)
        assert (after.namespaces, after.processes, after.mounts, after.cgroups) == (set(), {}, [], [])
        assert "nothing to remove" in cli.run("down").stdout
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        force_down(cli)


def test_down_after_a_crash_in_the_middle_of_up(lab_parent, built) -> None:  # type: ignore[no-untyped-def]
    cli = Cli(lab_parent / "crashed")
    up = subprocess.Popen(cli.argv("up", "--nodes", "2", "--pods-per-node", "1"), stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:  # midway: the first node's runtime runs, the rest is still to come
            if "containerd (CRI) up" in line:
                break
        state = cli.state()
        inodes = lab_netns_inodes(cli)
        assert state.phase == "creating" and footprint(state.id, cli.lab_dir, inodes).processes
        os.kill(state.daemon_pid, signal.SIGKILL)  # the lab daemon crashes: nothing tears down on its own
        up.kill()
        up.wait(30)

        down_removes_a_crashed_lab(cli, state.id, inodes)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        force_down(cli)
