"""Three simulated AKS nodes, each with its own `wgcni-node run`, proven on real packets — once per WireGuard backend
(userspace with wireguard-go on the host; kernel inside the VM tier, tests/vm/README.md).

Asserted with independent tools (`wg show`, `ip rule/route`, `nft`, tcpdump on the VNet bridge, ping, TCP):
encryption on the wire, same-node bypass, exact MTU, full-size TCP, IP moves, repair after outside damage, cleanup.
The tests share one lab (module scope) and run in file order; each leaves the lab as it found it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from tests.support.bridge_capture import Capture
from tests.support.kernel_wg import BACKEND_PARAMS, require_kernel_wireguard
from wgcni_lab.harness.netns import PYTHON, in_ns
from wgcni_lab.harness.netns_lab import Lab, Node, running_lab
from wgcni_lab.harness.polling import TIME_SCALE, wait_until
from wgcni_lab.harness.streams import tcp_stream

pytestmark = pytest.mark.netns

NODES = {"a": "10.240.0.4", "b": "10.240.0.35", "c": "10.240.0.66"}
# scattered across nodes, contiguous runs split between nodes, one aggregatable pair on b
PODS = {"a": ["10.240.0.70", "10.240.0.12"], "b": ["10.240.0.71", "10.240.0.100", "10.240.0.101"],
        "c": ["10.240.0.72", "10.240.0.13"]}


def _forward_chain_restored(node: Node, generation: int) -> bool:
    """A pass after `generation` has run and the forward chain holds the MSS clamp again."""
    return (node.api("status")["generation"] > generation
            and "maxseg" in node.exec("nft", "list", "chain", "inet", "wgcni", "forward").stdout)


def snapshot(node: Node) -> dict[str, str]:
    """What `cleanup` must give back: links, rules, all routes, nftables, the sysctls the hook touches."""
    return {
        "links": " ".join(sorted(link["ifname"] for link in json.loads(node.exec("ip", "-j", "link").stdout))),
        "rules": node.exec("ip", "rule").stdout + node.exec("ip", "-6", "rule").stdout,
        "routes": node.exec("ip", "route", "show", "table", "all").stdout,
        "nft": node.exec("nft", "list", "ruleset").stdout,
        "sysctl": node.exec("sysctl", "net.ipv4.conf.all.src_valid_mark").stdout,
    }


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if request.param == "kernel":
        require_kernel_wireguard()
    def take_snapshots(lab: Lab) -> None:
        lab.before = {name: snapshot(node) for name, node in lab.nodes.items()}  # type: ignore[attr-defined]

    with running_lab(NODES, PODS, take_snapshots, backend=request.param) as lab:
        yield lab


def pod(lab: Lab, ip: str):  # type: ignore[no-untyped-def]
    return next(p for node in lab.nodes.values() for p in node.pods.values() if p.ip == ip)


def ping(netns: str, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return in_ns(netns, "ping", "-c", "1", "-W", "2", *extra, target, check=False)


def process_names(node: Node) -> dict[str, str]:
    """pid -> command name of the processes in the node's namespace (ones that exit meanwhile left out)."""
    names = {}
    for pid in node.exec("ip", "netns", "pids", node.netns).stdout.split():
        try:
            names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue
    return names


def wg_allowed(node: Node) -> dict[str, set[str]]:
    out = node.exec("wg", "show", node.wg, "allowed-ips").stdout
    return {line.split("\t")[0]: set(line.split("\t")[1].split()) for line in out.splitlines()}


def public_key(node: Node) -> str:
    return node.exec("wg", "show", node.wg, "public-key").stdout.strip()


def test_programmed_state_seen_by_independent_tools(lab: Lab) -> None:
    a, b, c = (lab.nodes[name] for name in "abc")
    assert wg_allowed(a) == {public_key(b): {"10.240.0.35/32", "10.240.0.71/32", "10.240.0.100/31"},
                             public_key(c): {"10.240.0.66/32", "10.240.0.72/32", "10.240.0.13/32"}}
    rules = a.exec("ip", "rule").stdout
    assert "99:\tnot from all fwmark 0x100000/0x100000 lookup 51820" in rules
    table = a.exec("ip", "route", "show", "table", "51820").stdout
    for ip in ("10.240.0.71", "10.240.0.100", "10.240.0.101", "10.240.0.72", "10.240.0.13", "10.240.0.35"):
        assert f"{ip} dev {a.wg}" in table
    for ip in PODS["a"]:
        assert f"throw {ip}" in table
    assert a.exec("sysctl", "-n", "net.ipv4.conf.all.src_valid_mark").stdout.strip() == "1"
    addresses = a.exec("ip", "addr", "show", a.wg).stdout
    assert "inet 192.0.0.8/32 scope link" in addresses  # the RFC 7600 address rp_filter needs
    if lab.backend == "userspace":  # kernel WireGuard links (ARPHRD_NONE, no hardware address) get no link-local
        assert "inet6 fe80:" in addresses  # the kernel's own link-local address coexists with ours
    assert "table inet wgcni" in a.exec("nft", "list", "tables").stdout
    status = a.api("status")
    assert status["mtu"] == 1440 and "1500 - 60" in status["mtuReason"] and status["backend"] == lab.backend


def test_cross_node_traffic_is_encrypted_on_the_wire(lab: Lab) -> None:
    capture = Capture(lab)
    for source, target in (("10.240.0.70", "10.240.0.71"), ("10.240.0.100", "10.240.0.72"),
                           ("10.240.0.13", "10.240.0.12")):
        result = ping(pod(lab, source).netns, target)
        assert result.returncode == 0, result.stdout + result.stderr
    for source, target in (("a", "b"), ("b", "c"), ("c", "a")):  # host encryption: node to node as well
        result = ping(lab.nodes[source].netns, NODES[target])
        assert result.returncode == 0, result.stdout
    lines = capture.lines()
    assert lines, "nothing captured"
    wireguard = re.compile(r"IP (10\.240\.0\.(?:4|35|66))\.51820 > (10\.240\.0\.(?:4|35|66))\.51820: UDP, length \d+$")
    for line in lines:
        assert wireguard.search(line), f"not WireGuard UDP between nodes: {line}"
    pod_ips = [ip for ips in PODS.values() for ip in ips]
    assert not [line for line in lines if any(f"{ip}." in line or f"{ip} " in line for ip in pod_ips)]


def test_same_node_pod_traffic_never_enters_the_tunnel(lab: Lab) -> None:
    a = lab.nodes["a"]
    counters = f"/sys/class/net/{a.wg}/statistics/tx_packets"
    before = int(a.exec("cat", counters).stdout)
    for _ in range(3):
        assert ping(pod(lab, "10.240.0.70").netns, "10.240.0.12").returncode == 0
    assert int(a.exec("cat", counters).stdout) == before


def test_df_ping_of_exactly_the_mtu_passes_and_one_byte_more_does_not(lab: Lab) -> None:
    mtu = lab.nodes["a"].api("status")["mtu"]
    source = pod(lab, "10.240.0.70").netns
    exact = ping(source, "10.240.0.72", "-M", "do", "-s", str(mtu - 28))
    assert exact.returncode == 0, exact.stdout
    too_big = ping(source, "10.240.0.72", "-M", "do", "-s", str(mtu - 27))
    assert too_big.returncode != 0 and f"mtu = {mtu}" in too_big.stdout


TCP_SERVER = """
import hashlib, socket, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 5201)); server.listen(1); print("ready", flush=True)
connection, _ = server.accept(); digest = hashlib.sha256(); total = 0
mss = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
while True:
    chunk = connection.recv(1 << 16)
    if not chunk: break
    digest.update(chunk); total += len(chunk)
connection.sendall(f"{total} {digest.hexdigest()} {mss}".encode()); connection.close()
"""

TCP_CLIENT = """
import socket, sys
data = bytes(range(256)) * 4096 * 8
connection = socket.create_connection((sys.argv[1], 5201), timeout=20)
connection.sendall(data); connection.shutdown(socket.SHUT_WR)
print(connection.recv(200).decode())
"""


def transfer(lab: Lab, source_ip: str, target_ip: str) -> tuple[int, str, int]:
    server = subprocess.Popen(["ip", "netns", "exec", pod(lab, target_ip).netns, PYTHON, "-c", TCP_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = in_ns(pod(lab, source_ip).netns, PYTHON, "-c", TCP_CLIENT, target_ip, timeout=60)
        total, digest, mss = client.stdout.split()
        return int(total), digest, int(mss)
    finally:
        server.kill()
        server.wait()


EXPECTED = (len(bytes(range(256)) * 4096 * 8), hashlib.sha256(bytes(range(256)) * 4096 * 8).hexdigest())


def test_full_size_tcp_between_pods_on_1500_byte_veths(lab: Lab) -> None:
    total, digest, mss = transfer(lab, "10.240.0.70", "10.240.0.71")
    assert (total, digest) == EXPECTED
    assert mss <= 1440 - 40  # the SYN's MSS was clamped to the tunnel's route MTU


def test_full_size_tcp_also_works_by_path_mtu_discovery_alone(lab: Lab) -> None:
    """Without the MSS clamp the pods still converge on the tunnel MTU through ICMP 'fragmentation needed' sent by
    the node (measured: the transfer completes); the clamp only removes the dependency on ICMP reaching the pod."""
    nodes = [lab.nodes["a"], lab.nodes["c"]]
    for node in nodes:
        node.exec("nft", "flush", "chain", "inet", "wgcni", "forward")
    try:
        assert transfer(lab, "10.240.0.12", "10.240.0.13")[:2] == EXPECTED
    finally:
        for node in nodes:
            generation = node.api("status")["generation"]
            node.api("resync")
            wait_until(functools.partial(_forward_chain_restored, node, generation), 10, what="forward chain restored")


def test_pod_ip_moved_from_one_node_to_another_is_reached_at_the_new_node(lab: Lab) -> None:
    a, b, c = (lab.nodes[name] for name in "abc")
    moving = pod(lab, "10.240.0.72")
    lab.delete_pod(moving)  # released on c ...
    lab.add_pod(b, "10.240.0.72", name="moved")  # ... and handed out again at once on b (Azure reuses IPs)
    lab.sync_peers()
    lab.wait_converged()
    assert "10.240.0.72/32" in wg_allowed(a)[public_key(b)]
    assert not [p for p in wg_allowed(a)[public_key(c)] if p.startswith("10.240.0.72")]
    assert ping(pod(lab, "10.240.0.70").netns, "10.240.0.72").returncode == 0  # from a third node
    assert ping(pod(lab, "10.240.0.13").netns, "10.240.0.72").returncode == 0  # from the node it left
    # move it back so later tests see the original layout
    lab.delete_pod(pod(lab, "10.240.0.72"))
    lab.add_pod(c, "10.240.0.72")
    lab.sync_peers()
    lab.wait_converged()


def _repaired(lab: Lab, node: Node, key: str) -> None:
    wait_until(lambda: node.exec("wg", "show", node.wg, "public-key", check=False).stdout.strip() == key,
               5, what=f"{node.wg} back with the same key")
    lab.wait_converged(timeout=5)
    wait_until(lambda: "lookup 51820" in node.exec("ip", "rule").stdout, 5, what="rule back")
    assert ping(pod(lab, "10.240.0.70").netns, "10.240.0.71").returncode == 0


@pytest.mark.parametrize("damage", ["device", "rule", "route", "wireguard-go"])
def test_outside_damage_is_repaired_with_the_same_key(lab: Lab, damage: str) -> None:
    if damage == "wireguard-go" and lab.backend != "userspace":
        pytest.skip("kernel WireGuard has no wireguard-go process")
    a = lab.nodes["a"]
    key = public_key(a)
    started = time.monotonic()
    if damage == "device":
        a.exec("ip", "link", "del", a.wg)
    elif damage == "rule":
        a.exec("ip", "rule", "del", "pref", "99")
    elif damage == "route":
        a.exec("ip", "route", "del", "10.240.0.71", "table", "51820")
        wait_until(lambda: "10.240.0.71 dev" in a.exec("ip", "route", "show", "table", "51820").stdout, 5,
                   what="route back")
    else:
        (pid,) = [p for p, name in process_names(a).items() if name == "wireguard-go"]
        subprocess.run(["kill", "-9", pid], check=True)
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or a.exec("wg", "show", a.wg, check=False).returncode,
                   5, what="wireguard-go gone")
    _repaired(lab, a, key)
    print(f"{damage}: repaired in {time.monotonic() - started:.2f}s")


REPAIR_BOUND = 2.0  # seconds, the product's bound for every kind of tampering (issue 15); scaled in the VM tier


def _endpoints(node: Node) -> dict[str, str]:
    out = node.exec("wg", "show", node.wg, "endpoints").stdout
    return dict(line.split("\t", 1) for line in out.splitlines())


def _sysctl(node: Node, name: str) -> str:
    return node.exec("sysctl", "-n", name).stdout.strip()


def _tampering(lab: Lab, node: Node) -> dict[str, tuple[list[list[str]], Callable[[], bool]]]:
    """kind (TAMPERING) -> (the commands that tamper, the check that it is repaired)."""
    wg, table = node.wg, "51820"

    def route() -> str:
        return node.exec("ip", "route", "show", "table", table, "10.240.0.71").stdout

    def link() -> dict:
        return json.loads(node.exec("ip", "-j", "link", "show", wg).stdout)[0]

    def nft(*what: str) -> str:
        return node.exec("nft", "list", *what, check=False).stdout

    b_key = public_key(lab.nodes["b"])
    intruder = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    b_ips = wg_allowed(node)[b_key]
    b_endpoint = _endpoints(node)[b_key]

    def b_whole() -> bool:
        return wg_allowed(node).get(b_key) == b_ips and _endpoints(node).get(b_key) == b_endpoint

    return {
        "peer removed": ([["wg", "set", wg, "peer", b_key, "remove"]], b_whole),
        "peer allowed-ips replaced": ([["wg", "set", wg, "peer", b_key, "allowed-ips", "10.240.0.71/32"]], b_whole),
        "peer endpoint changed": ([["wg", "set", wg, "peer", b_key, "endpoint", "10.240.0.99:51820"]], b_whole),
        "foreign peer took an IP": ([["wg", "set", wg, "peer", intruder, "allowed-ips", "10.240.0.71/32"]],
                                    lambda: intruder not in wg_allowed(node) and b_whole()),
        "rule deleted": ([["ip", "rule", "del", "pref", "99"]],
                         lambda: "99:\tnot from all fwmark" in node.exec("ip", "rule").stdout),
        "route deleted": ([["ip", "route", "del", "10.240.0.71", "table", table]],
                          lambda: route().startswith(f"10.240.0.71 dev {wg}")),
        "route changed": ([["ip", "route", "replace", "blackhole", "10.240.0.71", "table", table]],
                          lambda: route().startswith(f"10.240.0.71 dev {wg}")),
        "address deleted": ([["ip", "address", "del", "192.0.0.8/32", "dev", wg]],  # its routes go with it
                            lambda: "192.0.0.8/32" in node.exec("ip", "address", "show", "dev", wg).stdout
                            and route().startswith(f"10.240.0.71 dev {wg}")),
        "device down": ([["ip", "link", "set", wg, "down"]],
                        lambda: "UP" in link()["flags"] and route().startswith(f"10.240.0.71 dev {wg}")),
        "device mtu": ([["ip", "link", "set", wg, "mtu", "1500"]], lambda: link()["mtu"] != 1500),
        "src_valid_mark": ([["sysctl", "-w", "net.ipv4.conf.all.src_valid_mark=0"]],
                           lambda: _sysctl(node, "net.ipv4.conf.all.src_valid_mark") == "1"),
        "rp_filter": ([["sysctl", "-w", f"net.ipv4.conf.{wg}.rp_filter=1"]],
                      lambda: _sysctl(node, f"net.ipv4.conf.{wg}.rp_filter") == "2"),
        "nft table deleted": ([["nft", "delete", "table", "inet", "wgcni"]],
                              lambda: "mark-underlay" in nft("table", "inet", "wgcni")),
        "nft rules flushed": ([["nft", "flush", "chain", "inet", "wgcni", "forward"]],
                              lambda: "maxseg" in nft("chain", "inet", "wgcni", "forward")),
        "nft chain deleted": ([["nft", "flush", "chain", "arp", "wgcni", "input"],
                               ["nft", "delete", "chain", "arp", "wgcni", "input"]],
                              lambda: "meta mark set" in nft("table", "arp", "wgcni")),
        "nft strict table deleted": ([["nft", "delete", "table", "inet", "wgcni-strict"]],
                                     lambda: "chain outbound" in nft("table", "inet", "wgcni-strict")),
    }


TAMPERING = ("peer removed", "peer allowed-ips replaced", "peer endpoint changed", "foreign peer took an IP",
             "rule deleted", "route deleted", "route changed", "address deleted", "device down", "device mtu",
             "src_valid_mark", "rp_filter", "nft table deleted", "nft rules flushed", "nft chain deleted",
             "nft strict table deleted")


@pytest.mark.parametrize("kind", TAMPERING)
def test_every_kind_of_tampering_is_repaired_within_2_s(lab: Lab, kind: str) -> None:
    a = lab.nodes["a"]
    key = public_key(a)
    commands, repaired = _tampering(lab, a)[kind]
    assert repaired(), f"{kind}: not in its repaired state before the tampering"
    for command in commands:
        a.exec(*command)
    started = time.monotonic()
    wait_until(repaired, REPAIR_BOUND, what=f"{kind} repaired", interval=0.01)
    seconds = time.monotonic() - started
    print(f"{kind}: repaired in {seconds:.2f}s")
    if kind == "peer removed":  # the node pair's pod traffic is back within the bound too
        source = pod(lab, "10.240.0.70").netns
        wait_until(lambda: in_ns(source, "ping", "-c", "1", "-W", "0.2", "10.240.0.71", check=False).returncode == 0,
                   REPAIR_BOUND, what="pod traffic a -> b back", interval=0.0)
        print(f"{kind}: pod traffic back {time.monotonic() - started:.2f}s after the tampering")
    _repaired(lab, a, key)


def test_a_key_rotation_on_either_end_of_a_stream_stalls_it_for_less_than_a_second(lab: Lab) -> None:
    """A TCP stream a -> b (iperf3, reports every 0.1 s) runs while a and then b rotate their keys: it never stops
    for a second; afterwards each device holds the new keys only, and a third node reaches both."""
    a, b = lab.nodes["a"], lab.nodes["b"]
    started = time.monotonic()
    with tcp_stream(["ip", "netns", "exec", pod(lab, "10.240.0.71").netns],
                    ["ip", "netns", "exec", pod(lab, "10.240.0.70").netns], "10.240.0.71") as report:
        rotations = [lab.rotate_key(a), lab.rotate_key(b)]
        rotated = time.monotonic() - started
    stall = report.longest_stall()
    print(f"key rotation of a then b under a TCP stream: longest stall {stall:.1f} s, {report.received} bytes "
          f"received, both rotated in {rotated:.1f} s")
    assert report.received > 0 and stall < 1.0 * TIME_SCALE, f"the stream stalled for {stall:.1f} s"
    keys = {public_key(node) for node in lab.nodes.values()}
    for old, new in rotations:
        assert new in keys and old not in keys
        for node in lab.nodes.values():
            assert old not in wg_allowed(node)
    source = pod(lab, "10.240.0.72").netns
    for target in ("10.240.0.70", "10.240.0.71"):
        assert ping(source, target).returncode == 0, f"c -> {target} after the rotations"


def test_cleanup_leaves_the_node_as_found(lab: Lab) -> None:
    b = lab.nodes["b"]  # its pods are the ones it started with (the moved pod came and went)
    b.stop_hook()
    if lab.backend == "userspace":
        assert "wireguard-go" in process_names(b).values()  # the device outlives the hook, like a kernel device
    assert b.wg in snapshot(b)["links"].split()
    result = b.cleanup()
    assert result.returncode == 0, result.stderr
    after = snapshot(b)
    for aspect, before in lab.before["b"].items():  # type: ignore[attr-defined]
        assert after[aspect].splitlines() == before.splitlines(), aspect
    assert not Path(f"/var/run/wireguard/{b.wg}.sock").exists()
    assert "wireguard-go" not in process_names(b).values()
