"""The lab's node lifecycle end to end through its CLI, as on AKS: pods that predate wgcni and hostNetwork pods,
hook settings and Node labels, wgcni's DaemonSet pod stopped, killed and crashing (kubelet's restarts), a node
rebooted (OS disk kept) and reimaged (OS disk new), a node added and deleted, and `down` leaving nothing after all
of it — also after the lab daemon crashed in the middle of a reboot.

One 3-node lab for the module (tests run in file order and build on each other); facts are checked with
independent tools in the nodes — `wg show dump`, ping, `ip`, `nft`, `sysctl`, the pod record files, /proc, the
API server over HTTP — not with the hooks' reports. Timings the brief asks for are printed (run with -s).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node_hook.local_api import request
from tests.lab.conftest import (
    Cli,
    down_leaves_nothing,
    down_removes_a_crashed_lab,
    force_down,
    lab_netns_inodes,
    root_links,
)
from wgcni_lab import lab
from wgcni_lab.cleanup import netns_inode, process_state, process_table
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.harness.streams import tcp_stream

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

KEEPALIVE = 7  # `up --setting persistentKeepalive=7`: every peer must carry it
BACKOFF = 2.0  # `up --restart-backoff 2`: the delay before a second restart
RECORDS = Path("/var/lib/wgcni/pods/azure")
REACHABLE_WITHIN = 10.0  # seconds after reboot/reimage returns


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Cli:  # type: ignore[no-untyped-def]
    cli = Cli(lab_parent / "lab")
    links_before = root_links()
    try:
        cli.run("up", "--nodes", "3", "--pods-per-node", "2", "--pods-before-install", "1",
                "--setting", f"persistentKeepalive={KEEPALIVE}", "--restart-backoff", str(BACKOFF),
                "--restart-backoff-max", "8", timeout=300)
        cli.links_before = links_before  # type: ignore[attr-defined]
        cli.seen_netns = set()  # type: ignore[attr-defined]  # every lab netns inode the tests saw
        yield cli
    finally:
        force_down(cli)


# ---- independent views --------------------------------------------------------------------------------------------

def peers(cli: Cli, node: str) -> dict[str, dict[str, Any]]:
    """endpoint address -> {key, covered addresses, keepalive} from `wg show wgcni0 dump` on `node`."""
    lines = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout.splitlines()[1:]
    found = {}
    for line in lines:
        key, _psk, endpoint, allowed, _handshake, _rx, _tx, keepalive = line.split("\t")
        found[endpoint.rsplit(":", 1)[0]] = {
            "key": key, "covered": lab.covered(allowed.split(",")) if allowed != "(none)" else set(),
            "keepalive": keepalive}
    return found


def public_key(cli: Cli, node: str) -> str:
    return cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "public-key").stdout.strip()


def status(cli: Cli) -> dict[str, Any]:
    """`status --json`; the network namespaces it names are remembered for the footprint of `down`."""
    report = cli.json("status", "--json")
    paths = [f"/run/netns/{node['netns']}" for node in report["nodes"]] + [pod["netns"] for pod in report["pods"]]
    cli.seen_netns |= {inode for inode in map(netns_inode, paths) if inode is not None}  # type: ignore[attr-defined]
    return report


def node_status(cli: Cli, name: str) -> dict[str, Any]:
    return next(node for node in status(cli)["nodes"] if node["name"] == name)


def pods_of(cli: Cli, name: str) -> list[dict[str, Any]]:
    return [pod for pod in status(cli)["pods"] if pod["node"] == name]


def records(cli: Cli, node: str) -> set[str]:
    """The sandbox ids with a pod record on `node` (files <id>@eth0.json)."""
    listing = cli.run("exec", node, "--", "ls", str(RECORDS), check=False).stdout.split()
    return {name.split("@")[0] for name in listing}


def pings(pod_netns: str, ip: str) -> bool:
    return subprocess.run(["nsenter", f"--net={pod_netns}", "--", "ping", "-c", "1", "-W", "1", ip],
                          capture_output=True).returncode == 0


def api_get(cli: Cli, path: str) -> int:
    """GET `path` from the lab's API server as the administrator (`wgcni-lab kubeconfig`'s credentials)."""
    state = cli.state()
    kubeconfig = json.loads((state.path / lab.KUBECONFIG_FILE).read_text())
    cluster, user = kubeconfig["clusters"][0]["cluster"], kubeconfig["users"][0]["user"]
    context = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    request = urllib.request.Request(state.apiserver_url + path, headers={"Authorization": f"Bearer {user['token']}"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def mesh_has(cli: Cli, name: str, ip: str, key: str | None = None, covers: tuple[str, ...] = ()) -> bool:
    """Every other node has a peer at `ip` (with `key`, when given) whose AllowedIPs cover `ip` and `covers`."""
    for other in status(cli)["nodes"]:
        if other["name"] == name:
            continue
        peer = peers(cli, other["name"]).get(ip)
        if peer is None or not {ip, *covers} <= peer["covered"] or (key is not None and peer["key"] != key):
            return False
    return True


def mesh_lacks(cli: Cli, name: str, ip: str) -> bool:
    return all(ip not in peers(cli, other["name"]) for other in status(cli)["nodes"] if other["name"] != name)


def first_pod_elsewhere(cli: Cli, name: str) -> dict[str, Any]:
    """A pod on another node that went through the wgcni plugin."""
    return next(pod for pod in status(cli)["pods"] if pod["node"] != name and lab.recorded(pod))


def all_reachable(cli: Cli, name: str, since: float, timeout: float) -> float:
    """Seconds from `since` (monotonic) until every non-hostNetwork pod of `name` answers a ping from a pod on
    another node."""
    source = first_pod_elsewhere(cli, name)
    targets = [pod["ip"] for pod in pods_of(cli, name) if not pod["host_network"]]
    assert targets
    pending = set(targets)

    def reached() -> bool:
        pending.difference_update({ip for ip in pending if pings(source["netns"], ip)})
        return not pending

    wait_until(reached, timeout - (time.monotonic() - since), f"{name}'s pods reachable from {source['name']}",
               interval=0.1, detail=lambda: f"not reached: {sorted(pending)}")
    return time.monotonic() - since


# ---- pods that predate wgcni, hostNetwork pods --------------------------------------------------------------------

def test_pods_made_before_the_install_have_no_record_the_others_have_one(cli: Cli) -> None:
    report = status(cli)
    for node in report["nodes"]:
        pods = [pod for pod in report["pods"] if pod["node"] == node["name"]]
        before = [pod for pod in pods if pod["predates_install"]]
        after = [pod for pod in pods if not pod["predates_install"]]
        assert len(before) == 1 and len(after) == 2, pods
        on_disk = records(cli, node["name"])
        assert not {pod["id"] for pod in before} & on_disk, "a pod made before wgcni has no record"
        assert {pod["id"] for pod in after} <= on_disk
        for other in report["nodes"]:
            if other["name"] != node["name"]:  # learned from its host route, published: every peer covers it
                covered = peers(cli, other["name"])[node["ip"]]["covered"]
                assert {pod["ip"] for pod in before + after} <= covered


def test_a_pod_made_before_the_install_reaches_and_is_reached_across_nodes(cli: Cli) -> None:
    """Pods without a record (made before wgcni's DaemonSet) are learned from their host routes: they reach and
    are reached by recorded and unrecorded pods on other nodes (tests/lab/test_running_cluster.py checks the
    fabric sees only WireGuard for such a pod)."""
    report = status(cli)
    old = {pod["node"]: pod for pod in report["pods"] if pod["predates_install"]}
    new = {pod["node"]: pod for pod in report["pods"] if lab.recorded(pod)}
    failed = [f"{source['name']} -> {target['name']}"
              for source, target in [(old["node-1"], new["node-2"]), (new["node-1"], old["node-2"]),
                                     (old["node-1"], old["node-2"])]
              if not pings(source["netns"], target["ip"])]

    assert failed == []


def test_a_host_network_pod_has_the_node_ip_and_its_network_namespace(cli: Cli) -> None:
    pod = json.loads(cli.run("pod-add", "node-3", "--host-network").stdout)
    node = node_status(cli, "node-3")

    assert pod["host_network"] and pod["ip"] == node["ip"] == "10.240.0.66"
    assert netns_inode(pod["netns"]) == netns_inode(f"/run/netns/{node['netns']}")
    addresses = cli.run("exec", pod["name"], "--", "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert "10.240.0.66/16" in addresses
    assert pod["id"] not in records(cli, "node-3"), "no CNI call, so no record"
    listed = next(p for p in status(cli)["pods"] if p["name"] == pod["name"])
    assert listed["host_network"] and not listed["predates_install"] and listed["ip"] == "10.240.0.66"


# ---- settings and labels ------------------------------------------------------------------------------------------

def test_a_setting_reaches_every_node_config_and_its_peers(cli: Cli) -> None:
    """One config on every node, as a ConfigMap is: the hook takes its node's name from NODE_NAME (the
    DaemonSet's downward-API env: the lab came up only if every hook knows every other by its node name) and its
    endpoint from its default route."""
    configs = [Path(f"/proc/{node['daemonset']['pid']}/root/etc/wgcni/config.yaml").read_text()  # the hook's view
               for node in status(cli)["nodes"]]
    assert len(set(configs)) == 1
    config = json.loads(configs[0])
    assert config["persistentKeepalive"] == KEEPALIVE and "nodeName" not in config and "endpoint" not in config
    ips = {node["name"]: node["ip"] for node in status(cli)["nodes"]}
    for node in ("node-1", "node-2", "node-3"):
        assert {peer["keepalive"] for peer in peers(cli, node).values()} == {str(KEEPALIVE)}
        assert set(peers(cli, node)) == {ip for name, ip in ips.items() if name != node}


@pytest.mark.parametrize("setting", ["mtu=12", "noSuchSetting=1", "logLevel=[debug]", "nodeName=x", "mtu"])
def test_a_bad_setting_is_one_line_before_anything_is_made(cli: Cli, lab_parent: Path, setting: str) -> None:
    other = Cli(lab_parent / "never")
    namespaces_before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())

    result = other.run("up", "--nodes", "1", "--setting", setting, check=False)

    assert result.returncode != 0 and "--setting" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not other.lab_dir.exists()
    namespaces_after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert {name for name in namespaces_after - namespaces_before
            if not name.startswith(running_lab_prefixes())} == set(), "a lab the other test worker runs is not ours"


def running_lab_prefixes() -> tuple[str, ...]:
    """The namespace prefixes (`wgl-<id>-`) of the labs whose daemons run now (the other pytest worker's, say): each
    daemon's state names its id before it makes anything."""
    prefixes = []
    for info in process_table().values():
        argv = [arg.decode(errors="replace") for arg in info.argv]
        if info.live and "wgcni_lab.cli" in argv and "daemon" in argv and "--lab-dir" in argv:
            state = lab.load_state(Path(argv[argv.index("--lab-dir") + 1]))
            if state is not None:
                prefixes.append(f"wgl-{state.id}-")
    return tuple(prefixes)


def test_the_opt_out_label_drops_the_node_from_every_peer_and_back(cli: Cli) -> None:
    key = public_key(cli, "node-3")
    labelled = json.loads(cli.run("label", "node-3", "wgcni.io/wireguard=disabled").stdout)
    assert labelled["labels"]["wgcni.io/wireguard"] == "disabled"

    wait_until(lambda: mesh_lacks(cli, "node-3", "10.240.0.66"), 20, "node-3's peer gone from every node")

    removed = json.loads(cli.run("label", "node-3", "wgcni.io/wireguard-").stdout)
    assert "wgcni.io/wireguard" not in removed["labels"]
    wait_until(lambda: mesh_has(cli, "node-3", "10.240.0.66", key), 20, "node-3 back as a peer with its key")


@pytest.mark.parametrize("args", [("label", "node-9", "a=b"), ("label", "node-1", "bad key=x"),
                                  ("label", "node-1", "novalue"), ("hook", "node-9", "kill"),
                                  ("hook", "node-1", "pause"), ("reboot", "node-9"), ("node-del", "node-9")],
                         ids=["label-unknown-node", "label-bad-key", "label-no-value", "hook-unknown-node",
                              "hook-bad-action", "reboot-unknown-node", "node-del-unknown"])
def test_bad_lifecycle_input_is_one_line_without_traceback(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli.run(*args, check=False)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the DaemonSet pod ---------------------------------------------------------------------------------------------

def daemonset(cli: Cli, name: str) -> dict[str, Any]:
    return node_status(cli, name)["daemonset"]


def test_a_killed_daemonset_pod_is_restarted_with_the_same_key(cli: Cli) -> None:
    key = public_key(cli, "node-1")
    before = daemonset(cli, "node-1")
    assert before["state"] == "running" and before["restarts"] == 0 and before["pid"] > 0
    old_pids = set(before["containers"].values())

    killed = json.loads(cli.run("hook", "node-1", "kill").stdout)

    assert killed["state"] == "restarting"
    # kubelet restarts the killed container alone; the bare-process pod is restarted whole
    assert process_state(before["pid"]) in (None, "Z")
    if before["runtime"] == "processes":
        assert all(process_state(pid) in (None, "Z") for pid in old_pids)
    after = wait_until(lambda: (lambda ds: ds if ds["state"] == "running" else None)(daemonset(cli, "node-1")), 30,
                       "node-1's DaemonSet pod running again")
    assert after["restarts"] == 1 and after["pid"] not in old_pids
    assert after["last_termination"] == "killed (SIGKILL)"
    assert public_key(cli, "node-1") == key
    wait_until(lambda: mesh_has(cli, "node-1", "10.240.0.4", key), 20, "node-1 a peer of every node, same key")


def test_a_containerd_restart_keeps_the_pods_and_a_later_del_cleans_up_everywhere(cli: Cli) -> None:
    before = {pod["id"]: pod for pod in pods_of(cli, "node-2")}
    hook_pid = daemonset(cli, "node-2")["pid"]

    restarted = json.loads(cli.run("containerd", "node-2", "restart").stdout)

    assert restarted["node"] == "node-2"
    assert {pod["id"]: pod["ip"] for pod in pods_of(cli, "node-2")} == {i: p["ip"] for i, p in before.items()}
    assert daemonset(cli, "node-2")["pid"] == hook_pid, "the DaemonSet pod ran on"
    pod = next(pod for pod in before.values() if lab.recorded(pod))
    assert pings(first_pod_elsewhere(cli, "node-2")["netns"], pod["ip"])
    cli.run("pod-del", pod["name"])  # CNI DEL through the recovered sandbox: its netns mount was found
    assert pod["id"] not in records(cli, "node-2")
    wait_until(lambda: mesh_has(cli, "node-2", "10.240.0.35") and not any(
        pod["ip"] in peer["covered"] for other in ("node-1", "node-3") for peer in peers(cli, other).values()),
        20, f"{pod['ip']} gone from every peer")
    assert not cli.run("exec", "node-2", "--", "ip", "route", "show", pod["ip"]).stdout.strip(), "veth and route gone"


def test_a_stopped_daemonset_pod_does_not_answer_until_started(cli: Cli) -> None:
    node = node_status(cli, "node-2")
    socket_path = Path(node["hook_socket"])
    assert request(socket_path, {"op": "status"}, timeout=5)["node"] == "node-2"

    stopped = json.loads(cli.run("hook", "node-2", "stop").stdout)
    try:
        assert stopped["state"] == "stopped" and daemonset(cli, "node-2")["state"] == "stopped"
        assert process_state(stopped["pid"]) == "T"
        with pytest.raises(OSError):  # socket.timeout is an OSError
            request(socket_path, {"op": "status"}, timeout=1)
    finally:
        started = json.loads(cli.run("hook", "node-2", "start").stdout)

    assert started["state"] == "running" and started["restarts"] == 0 and started["pid"] == stopped["pid"]
    assert wait_until(lambda: request(socket_path, {"op": "status"}, timeout=5), 10, "the hook to answer")["ok"]


def test_a_hook_that_dies_on_its_own_is_restarted_after_the_backoff(cli: Cli) -> None:
    """node-1's pod was killed once already (above): a second death within kubelet's window waits BACKOFF."""
    before = daemonset(cli, "node-1")
    assert before["restarts"] == 1

    died = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)  # not through the lab: the supervision loop must notice
    waiting = wait_until(lambda: (lambda ds: ds if ds["state"] == "restarting" else None)(daemonset(cli, "node-1")),
                         10, "the supervision loop to notice the dead hook")
    assert waiting["reason"] == "CrashLoopBackOff" and "wgcni-node exited" in waiting["last_termination"]
    after = wait_until(lambda: (lambda ds: ds if ds["state"] == "running" else None)(daemonset(cli, "node-1")), 30,
                       "node-1's DaemonSet pod running again")
    assert after["restarts"] == 2 and time.monotonic() - died >= BACKOFF


# ---- reboot and reimage --------------------------------------------------------------------------------------------

def test_a_reboot_keeps_the_disk_and_key_loses_everything_volatile_and_the_pods_come_back(cli: Cli) -> None:
    node = node_status(cli, "node-3")
    key = public_key(cli, "node-3")
    old_pods = {pod["name"]: pod for pod in pods_of(cli, "node-3")}
    old_processes = {node["daemonset"]["pid"], int(node["mount_namespace"].split("/")[2])}
    marks = ["ip route add 192.0.2.0/24 dev lo", "ip rule add priority 1234 lookup 1234",
             "nft add table inet lab_marker", "sysctl -qw net.ipv4.conf.lo.arp_announce=2",
             "touch /run/lab-marker /var/lib/lab-marker /etc/lab-marker"]
    cli.run("exec", "node-3", "--", "sh", "-ec", "; ".join(marks))

    rebooted = json.loads(cli.run("reboot", "node-3").stdout)
    returned = time.monotonic()

    reachable_after = all_reachable(cli, "node-3", returned, REACHABLE_WITHIN)
    print(f"\nreboot of node-3: {rebooted['seconds']:.2f} s in the daemon, every pod reachable from another "
          f"node {reachable_after:.2f} s after the command returned")
    assert all(process_state(pid) in (None, "Z") for pid in old_processes)
    kernel = cli.run("exec", "node-3", "--", "sh", "-c",
                     "ip route show 192.0.2.0/24; ip rule show priority 1234; nft list tables").stdout
    assert "192.0.2.0" not in kernel and "1234" not in kernel and "lab_marker" not in kernel
    sysctl = cli.run("exec", "node-3", "--", "sysctl", "-n", "net.ipv4.conf.lo.arp_announce").stdout
    assert sysctl.strip() == "0", "the sysctl is back at its default"
    files = cli.run("exec", "node-3", "--", "sh", "-c",
                    'for f in /run/lab-marker /var/lib/lab-marker /etc/lab-marker; do [ -e "$f" ] && echo "$f"; '
                    "done; true").stdout.split()
    assert files == ["/var/lib/lab-marker", "/etc/lab-marker"], "/run is new, /var/lib and /etc are kept"
    assert public_key(cli, "node-3") == key
    assert mesh_has(cli, "node-3", "10.240.0.66", key)
    new_pods = {pod["name"]: pod for pod in pods_of(cli, "node-3")}
    assert set(new_pods) == set(old_pods), "the same pods, by name"
    for name, pod in new_pods.items():
        assert pod["uid"] == old_pods[name]["uid"] and pod["id"] != old_pods[name]["id"]
        assert pod["attempt"] == old_pods[name]["attempt"] + 1
        assert pod["host_network"] == old_pods[name]["host_network"]
        assert not pod["predates_install"], "its new sandbox went through the CNI chain with wgcni"
    on_disk = records(cli, "node-3")
    assert {pod["id"] for pod in new_pods.values() if not pod["host_network"]} == on_disk, \
        "a record per new sandbox, none left of the old ones (CNI DEL ran for them)"
    assert [pod["ip"] for pod in new_pods.values() if pod["host_network"]] == ["10.240.0.66"]
    assert daemonset(cli, "node-3")["state"] == "running"


def key_findings(cli: Cli, node: str) -> list[str]:
    """The lines of `wgcni check` on `node` about peers, handshakes, keys, the publication or the sync, and every
    failure (the lab's pods that predate wgcni give a records warning of their own)."""
    lines = cli.run("exec", node, "--", "wgcni", "check", check=False).stdout.splitlines()
    return [line for line in lines if line.startswith("FAIL") or line.split(":")[0].split()[-1:] in (
        ["peers"], ["handshakes"], ["conflicts"], ["publication"], ["sync"])]


def test_a_reimage_gives_a_new_key_that_every_peer_takes(cli: Cli) -> None:
    old_key = public_key(cli, "node-2")
    pods_before = {pod["name"] for pod in pods_of(cli, "node-2")}
    cli.run("exec", "node-2", "--", "touch", "/var/lib/lab-marker")

    reimaged = json.loads(cli.run("reimage", "node-2").stdout)
    returned = time.monotonic()

    new_key = public_key(cli, "node-2")
    assert new_key and new_key != old_key

    def everywhere() -> bool:
        for other in ("node-1", "node-3"):
            dump = cli.run("exec", other, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout
            if old_key in dump or peers(cli, other).get("10.240.0.35", {}).get("key") != new_key:
                return False
        return True

    wait_until(everywhere, REACHABLE_WITHIN, "every peer to take node-2's new key and drop the old", interval=0.1)
    took = time.monotonic() - returned
    reachable_after = all_reachable(cli, "node-2", returned, REACHABLE_WITHIN)
    print(f"\nreimage of node-2: {reimaged['seconds']:.2f} s in the daemon, new key on every peer {took:.2f} s and "
          f"every pod reachable {reachable_after:.2f} s after the command returned")
    assert cli.run("exec", "node-2", "--", "test", "-e", "/var/lib/lab-marker", check=False).returncode != 0
    conflist = json.loads(cli.run("exec", "node-2", "--", "cat", "/etc/cni/net.d/10-azure.conflist").stdout)
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["azure-vnet", "wgcni", "portmap"]
    assert {pod["name"] for pod in pods_of(cli, "node-2")} == pods_before, "its pods are made again"
    for other in ("node-1", "node-3"):  # the peers' own check sees nothing stale of node-2
        assert not key_findings(cli, other)


def test_a_key_rotation_on_either_end_stalls_no_stream_and_leaves_no_old_key(cli: Cli, tmp_path: Path) -> None:
    """`wgcni-node rotate-key` in node-1's DaemonSet pod and then node-2's, as an operator runs it, while an iperf3
    stream goes from a pod on node-1 to one on node-2: the stream never stops for a second, every device holds the
    new keys only, the API lists them, and `wgcni check` passes everywhere."""
    sender = next(pod for pod in pods_of(cli, "node-1") if lab.recorded(pod))
    receiver = next(pod for pod in pods_of(cli, "node-2") if lab.recorded(pod))
    old = {name: public_key(cli, name) for name in ("node-1", "node-2")}
    with tcp_stream(["nsenter", f"--net={receiver['netns']}", "--"], ["nsenter", f"--net={sender['netns']}", "--"],
                    receiver["ip"]) as report:
        said = [cli.run("exec", name, "--", "wgcni-node", "rotate-key", timeout=90).stdout
                for name in ("node-1", "node-2")]
    stall = report.longest_stall()
    print(f"\nkey rotation of node-1 then node-2 under a TCP stream: longest stall {stall:.1f} s, "
          f"{report.received} bytes received; {said[0].strip()!r}")
    assert all("key rotated" in text for text in said), said
    assert stall < 1.0, f"the stream stalled for {stall:.1f} s"
    new = {name: public_key(cli, name) for name in old}
    assert all(new[name] != old[name] for name in old)
    for node in ("node-1", "node-2", "node-3"):
        dump = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout
        assert not any(key in dump for key in old.values()), f"{node} still holds an old key"
        assert all(key in dump for name, key in new.items() if name != node), f"{node} lacks a new key"
        assert not key_findings(cli, node)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(cli.run("kubeconfig").stdout)
    for name, key in new.items():  # the API holds the new key, and no rotation is left announced
        held = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "--kubeconfig", str(kubeconfig), "get",
                               "wgn", name, "-o", "jsonpath={.status.publicKey} {.status.nextPublicKey}"],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        assert held.strip() == key


# ---- scale up and down ---------------------------------------------------------------------------------------------

def test_an_added_node_becomes_a_peer_of_every_node(cli: Cli) -> None:
    added = json.loads(cli.run("node-add", "--pods-before-install", "1").stdout)
    assert (added["node"], added["ip"]) == ("node-4", "10.240.0.97")
    state = cli.state()
    new = state.node("node-4")
    others = {ip for node in state.nodes if node.name != "node-4" for ip in (node.ip, *node.pod_ips)}
    assert len(new.pod_ips) == lab.MAX_PODS and not set(new.pod_ips) & others
    assert api_get(cli, "/api/v1/nodes/node-4") == 200

    early = pods_of(cli, "node-4")
    assert [pod["predates_install"] for pod in early] == [True], "started before the DaemonSet pod"
    assert early[0]["id"] not in records(cli, "node-4")
    pod = json.loads(cli.run("pod-add", "node-4").stdout)
    assert pod["ip"] in new.pod_ips and pod["id"] in records(cli, "node-4")

    wait_until(lambda: mesh_has(cli, "node-4", "10.240.0.97", covers=(pod["ip"],)), 20,
               "node-4 and its pod on every peer")
    assert set(peers(cli, "node-4")) == {"10.240.0.4", "10.240.0.35", "10.240.0.66"}
    assert pings(first_pod_elsewhere(cli, "node-4")["netns"], pod["ip"])


def test_a_deleted_node_disappears_from_every_peer_and_the_api(cli: Cli) -> None:
    netns = node_status(cli, "node-4")["netns"]
    assert api_get(cli, "/apis/wgcni.io/v1alpha1/wireguardnodes/node-4") == 200

    assert json.loads(cli.run("node-del", "node-4").stdout) == {"node": "node-4"}

    wait_until(lambda: mesh_lacks(cli, "node-4", "10.240.0.97"), 20, "node-4's peer gone from every node")
    assert "node-4" not in {node["name"] for node in status(cli)["nodes"]}
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (cli.lab_dir / "nodes" / "node-4").exists()
    assert api_get(cli, "/api/v1/nodes/node-4") == 404
    wait_until(lambda: api_get(cli, "/apis/wgcni.io/v1alpha1/wireguardnodes/node-4") == 404, 10,
               "node-4's WireguardNode to be garbage-collected with its Node")


# ---- down ----------------------------------------------------------------------------------------------------------

def test_down_leaves_nothing_after_reboots_and_node_changes(cli: Cli) -> None:
    down_leaves_nothing(cli, lab_netns_inodes(cli) | cli.seen_netns, 5)  # type: ignore[attr-defined]


def test_down_after_a_crash_in_the_middle_of_a_reboot(lab_parent, built) -> None:  # type: ignore[no-untyped-def]
    cli = Cli(lab_parent / "crashed-reboot")
    try:
        cli.run("up", "--nodes", "2", "--pods-per-node", "1", timeout=300)
        state = cli.state()
        inodes = lab_netns_inodes(cli)
        old_holder = state.node("node-2").holder_pid
        reboot = subprocess.Popen(cli.argv("reboot", "node-2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # midway: the old node is gone and the new one is being made (its mount holder is new)
        wait_until(lambda: cli.state().node("node-2").holder_pid not in (0, old_holder), 30,
                   "node-2 to be coming back up")
        inodes |= {netns_inode(f"/run/netns/{node.netns}") for node in state.nodes} - {None}
        os.kill(state.daemon_pid, signal.SIGKILL)
        _, error = reboot.communicate(timeout=60)
        assert reboot.returncode != 0 and b"Traceback" not in error

        down_removes_a_crashed_lab(cli, state.id, inodes)
    finally:
        force_down(cli)
