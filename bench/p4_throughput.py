"""P4: TCP throughput pod -> pod across two nodes through the wgcni mesh, beside the same traffic over a
hand-configured WireGuard tunnel between the same two nodes, in the same run; and DF packets of exactly the MTU.

Set-up (wgcni_lab/harness/netns_lab.py, everything in namespaces created for the run and removed afterwards): a VNet
bridge, two node namespaces (10.240.0.4, 10.240.0.35), each running its own `wgcni-node run` on the userspace backend
(wireguard-go), peers fed from each other's announcements; pods plumbed like azure-vnet transparent mode (veth
`azv...`, proxy ARP, a /32 route in the node's main table, MTU 1500).

- mesh: `iperf3` from pod A (10.240.0.70, on node a) to pod B (10.240.0.71, on node b), which the hooks programmed:
  pod veth -> node a's rule and table -> the hook's wireguard-go -> VNet -> wireguard-go -> node b -> pod veth, at
  the MTU the hook chose, with its MSS clamp; and the same to pod B's IPv6 address (the pods are dual-stack): one
  device and one peer carry both families;
- baseline: the same path without wgcni: a second pair of pods plumbed the same way (C 10.240.0.80 on a, D
  10.240.0.81 on b) that the hooks are not told about, and a second wireguard-go device in each node namespace
  configured by hand (`wg set`: own keys and port, the other node's pod as AllowedIP, a plain /32 route in the main
  table), at each of `BASELINE_MTUS` (path MTU discovery sizes the pods' segments; pod C's cached path MTU is
  flushed after each MTU change, or every run after the first would keep the previous MTU for 10 minutes); the best
  is the baseline (1440 is the largest that does not fragment on the 1500-byte VNet over IPv4);
- both tunnels' wireguard-go are started alike: each in its own session when the hook starts its own that way
  (`wireguard_go_leads_session`). The session decides the CPU scheduling group: with the kernel's autogroup
  scheduling (`kernel.sched_autogroup_enabled=1`, processes in the root cpu cgroup, as in this lab) every session is
  one CFS group. A baseline sharing the benchmark's session (and so one group) with the iperf3 ends, against the
  hook's wireguard-go in a group each, compared scheduling, not wgcni's path: it showed the mesh at 0.75-0.82 of the
  baseline with 15-27 % more CPU per byte; started alike, both cost the same per byte (docs/benchmarks.md, P4);
- mesh and baseline runs alternate, `REPEATS` times each, each case opening a repeat in turn (a fixed order gave
  the mesh every first slot, after the previous repeat's last baseline run); the medians are compared (target
  >= 95 %);
- `ping -M do` from pod A to pod B with a payload filling exactly the hook's MTU: packets lost (target 0), and one
  byte more must be refused locally (the MTU is exact, not just small enough).
Host encryption is off in this lab, so the baseline tunnel's UDP between the node IPs is not routed into the mesh.
The machine is shared with other builds: the four wireguard-go processes compete with them for two cores, so the
absolute numbers vary from run to run; the ratio of alternating runs is what this benchmark reports.

Run: `python -m bench.p4_throughput` (as root) or `python -m bench.run --only P4`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import Clock, row
from wgcni_lab.harness.netns import in_ns, sh
from wgcni_lab.harness.netns_lab import Lab, Node  # the namespace lab of the netns tests
from wgcni_lab.harness.polling import wait_until

TITLE = "pod-to-pod TCP through the mesh (userspace) vs a hand-configured wg tunnel, same namespaces"
NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": "10.240.0.70", "b": "10.240.0.71"}  # known to the hooks: through the mesh
PODS_IPV6 = {"a": "fd00:10:240::70", "b": "fd00:10:240::71"}  # the same pods' IPv6 addresses (dual-stack)
BASELINE_PODS = {"a": "10.240.0.80", "b": "10.240.0.81"}  # unknown to the hooks: through the hand-made tunnel
BASELINE_PORT = 51821
BASELINE_MTUS = (1420, 1440)  # wg-quick's default, and the largest that fits a 1500-byte underlay over IPv4
SECONDS = 4
REPEATS = 5
PINGS = 50
QUICK_SECONDS = 1
QUICK_REPEATS = 1
QUICK_PINGS = 5
TARGET_RATIO = 0.95


def wireguard_go_leads_session(pid: int) -> bool:
    """Whether the process was started in a session of its own (setsid), i.e. is its own CPU scheduling group
    under autogroup scheduling."""
    return os.getsid(pid) == pid


def autogroup_scheduling() -> str | None:
    """`kernel.sched_autogroup_enabled` (read only), None on kernels without autogroup scheduling."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except FileNotFoundError:
        return None


def wireguard_go_pid(namespace: str, ifname: str) -> int:
    for pid in sh("ip", "netns", "pids", namespace).stdout.split():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2:-1] == [ifname.encode()]:
                return int(pid)
        except FileNotFoundError:
            continue
    raise RuntimeError(f"no wireguard-go for {ifname} in {namespace}")


def iperf3_with_cpu(namespace: str, server: str, port: int, seconds: int,
                    pids: list[int]) -> tuple[float, float, int]:
    """(Mbit/s, CPU ms per GB received, TCP retransmits) of one run; the CPU is that of `pids` (both wireguard-go
    and the iperf3 server) plus the iperf3 client, so the cost per byte is comparable even when the neighbours'
    load changes (this process, waiting for the client, adds next to nothing)."""
    clock = Clock(pids)
    rate, received, retransmits = clock.measure("iperf3", lambda: iperf3(namespace, server, port, seconds))
    cpu = clock.cpu("iperf3")[0]
    return rate, cpu * 1000 / (received / 1e9), retransmits


def iperf3(namespace: str, server: str, port: int, seconds: int) -> tuple[float, int, int]:
    """(received Mbit/s, bytes received, sender's retransmits) of one TCP stream over `seconds` (a first second,
    slow start, runs before and is left out of the rate; the bytes and retransmits are the whole run's)."""
    deadline = time.monotonic() + 10
    while True:
        done = in_ns(namespace, "iperf3", "-c", server, "-p", str(port), "-t", str(seconds + 1), "-O", "1", "-J",
                     check=False, timeout=seconds + 30)
        report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        if done.returncode == 0 and "error" not in report:
            received = report["end"]["sum_received"]
            received_bytes = sum(interval["sum"]["bytes"] for interval in report["intervals"])
            return received["bits_per_second"] / 1e6, received_bytes, report["end"]["sum_sent"]["retransmits"]
        if time.monotonic() > deadline:  # the server may still be starting
            raise RuntimeError(f"iperf3 to {server}:{port} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        time.sleep(0.2)


def _has_link(node: Node, ifname: str) -> bool:
    return node.exec("ip", "link", "show", ifname, check=False).returncode == 0


class Baseline:
    """A hand-configured WireGuard tunnel between the two node namespaces (wireguard-go + wg set) carrying the
    baseline pods' traffic through plain main-table routes. `own_session`: start each wireguard-go in a session of
    its own, as the hook starts its own (the session is the CPU scheduling group under autogroup scheduling)."""

    def __init__(self, lab: Lab, work: Path, own_session: bool) -> None:
        self.nodes = [lab.nodes["a"], lab.nodes["b"]]
        self.source_pod = lab.nodes["a"].pods["basea"].netns
        # one name per node: wireguard-go's UAPI socket path (/var/run/wireguard/<name>.sock) is not per namespace
        self.names = {node.name: f"base{lab.suffix}{node.name}"[:15] for node in self.nodes}
        self.processes: list[subprocess.Popen[bytes]] = []
        keys = []
        for node in self.nodes:
            private = work / f"{node.name}.key"
            private.write_text(sh("wg", "genkey").stdout)
            private.chmod(0o600)
            public = subprocess.run(["wg", "pubkey"], input=private.read_text(), capture_output=True, text=True,
                                    check=True).stdout.strip()
            keys.append((private, public))
        for index, node in enumerate(self.nodes):
            other = 1 - index
            ifname = self.names[node.name]
            process = subprocess.Popen(["ip", "netns", "exec", node.netns, "wireguard-go", "-f", ifname],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env=dict(os.environ, LOG_LEVEL="error"), start_new_session=own_session)
            self.processes.append(process)
            wait_until(functools.partial(_has_link, node, ifname), 10, what=f"baseline wireguard-go in {node.name}")
            node.exec("wg", "set", ifname, "listen-port", str(BASELINE_PORT), "private-key", str(keys[index][0]),
                      "peer", keys[other][1], "endpoint", f"{self.nodes[other].ip}:{BASELINE_PORT}",
                      "allowed-ips", f"{BASELINE_PODS[self.nodes[other].name]}/32")
            node.exec("ip", "link", "set", ifname, "up")
            node.exec("ip", "route", "add", f"{BASELINE_PODS[self.nodes[other].name]}/32", "dev", ifname)

    def set_mtu(self, mtu: int) -> None:
        """Set both devices' MTU and forget the path MTU the source pod learned at the previous one (a raised MTU
        sends no ICMP: without the flush, the pod would keep sending the smaller segments for 10 minutes)."""
        for node in self.nodes:
            node.exec("ip", "link", "set", self.names[node.name], "mtu", str(mtu))
        in_ns(self.source_pod, "ip", "route", "flush", "cache")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def close(self) -> None:
        for node in self.nodes:
            node.exec("ip", "link", "del", self.names[node.name], check=False)  # wireguard-go exits with its TUN
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def df_pings(lab: Lab, mtu: int, count: int) -> tuple[int, int, bool]:
    """(sent, lost) of DF pings filling exactly `mtu` from pod a to pod b, and whether one byte more is refused."""
    source = lab.nodes["a"].pods["pa"].netns
    exact = in_ns(source, "ping", "-c", str(count), "-i", "0.01", "-W", "2", "-M", "do", "-s", str(mtu - 28),
                  PODS["b"], check=False, timeout=60)
    received = int(exact.stdout.split(" received")[0].rsplit(",", 1)[1].strip()) if " received" in exact.stdout else 0
    too_big = in_ns(source, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(mtu - 27), PODS["b"], check=False)
    return count, count - received, too_big.returncode != 0 and f"mtu = {mtu}" in too_big.stdout


def measure(seconds: int, repeats: int, pings: int, mtus: tuple[int, ...]) -> dict:
    for tool in ("iperf3", "wireguard-go", "wg", "ping"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"P4 needs {tool} on PATH")
    work = Path(tempfile.mkdtemp(prefix="wgcni-p4-"))
    lab = Lab(work / "lab", host_encryption=False)
    servers: list[subprocess.Popen[bytes]] = []
    baseline: Baseline | None = None
    try:
        for name, ip in NODES.items():
            lab.add_node(name, ip)
        for name, ip in PODS.items():
            lab.add_pod(lab.nodes[name], ip, name=f"p{name}", ipv6=PODS_IPV6[name])
        for node in lab.nodes.values():
            lab.start_hook(node)
        lab.sync_peers()
        lab.wait_converged(timeout=30)
        mtu = lab.nodes["a"].api("status")["mtu"]
        for name, ip in BASELINE_PODS.items():  # after the last sync_peers: the other hook never learns them
            lab.add_pod(lab.nodes[name], ip, name=f"base{name}")
        mesh_wireguard = [wireguard_go_pid(node.netns, node.wg) for node in lab.nodes.values()]
        own_session = wireguard_go_leads_session(mesh_wireguard[0])
        baseline = Baseline(lab, work, own_session)
        if {wireguard_go_leads_session(pid) for pid in mesh_wireguard + baseline.pids} != {own_session}:
            raise RuntimeError("the mesh's and the baseline's wireguard-go are not scheduled alike (sessions differ)")
        pod_b, base_b = lab.nodes["b"].pods["pb"].netns, lab.nodes["b"].pods["baseb"].netns
        for namespace, port in ((pod_b, 5201), (base_b, 5202)):
            servers.append(subprocess.Popen(["ip", "netns", "exec", namespace, "iperf3", "-s", "-p", str(port)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        pod_a, base_a = lab.nodes["a"].pods["pa"].netns, lab.nodes["a"].pods["basea"].netns
        mesh_pids = mesh_wireguard + [servers[0].pid]
        base_pids = baseline.pids + [servers[1].pid]
        mesh: list[float] = []
        mesh_cpu: list[float] = []
        mesh_retransmits: list[int] = []
        mesh_ipv6: list[float] = []
        mesh_ipv6_cpu: list[float] = []
        tunnel: dict[int, list[float]] = {value: [] for value in mtus}
        tunnel_cpu: dict[int, list[float]] = {value: [] for value in mtus}
        tunnel_retransmits: dict[int, list[int]] = {value: [] for value in mtus}
        # None: the mesh; "ipv6": the mesh to the same pod's IPv6 address, through the same device and peer; a
        # number: the baseline at that MTU
        cases: list[int | str | None] = [None, "ipv6", *mtus]
        for repeat in range(repeats):
            for case in cases[repeat % len(cases):] + cases[:repeat % len(cases)]:  # each case first in turn
                if case is None:
                    rate, cost, retransmits = iperf3_with_cpu(pod_a, PODS["b"], 5201, seconds, mesh_pids)
                    mesh.append(rate)
                    mesh_cpu.append(cost)
                    mesh_retransmits.append(retransmits)
                elif case == "ipv6":
                    rate, cost, _ = iperf3_with_cpu(pod_a, PODS_IPV6["b"], 5201, seconds, mesh_pids)
                    mesh_ipv6.append(rate)
                    mesh_ipv6_cpu.append(cost)
                else:
                    assert isinstance(case, int)
                    baseline.set_mtu(case)
                    rate, cost, retransmits = iperf3_with_cpu(base_a, BASELINE_PODS["b"], 5202, seconds, base_pids)
                    tunnel[case].append(rate)
                    tunnel_cpu[case].append(cost)
                    tunnel_retransmits[case].append(retransmits)
        sent, lost, exact = df_pings(lab, mtu, pings)
        return {"mtu": mtu, "mesh_mbit_s": mesh, "baseline_mbit_s": {str(k): v for k, v in tunnel.items()},
                "mesh_cpu_ms_per_gb": mesh_cpu, "baseline_cpu_ms_per_gb": {str(k): v for k, v in tunnel_cpu.items()},
                "mesh_retransmits": mesh_retransmits, "mesh_ipv6_mbit_s": mesh_ipv6,
                "mesh_ipv6_cpu_ms_per_gb": mesh_ipv6_cpu,
                "baseline_retransmits": {str(k): v for k, v in tunnel_retransmits.items()},
                "wireguard_go_own_sessions": own_session, "sched_autogroup_enabled": autogroup_scheduling(),
                "df_pings_sent": sent, "df_pings_lost": lost, "one_byte_more_refused": exact, "seconds": seconds,
                "lab_suffix": lab.suffix}
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if baseline is not None:
            baseline.close()
        try:
            lab.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run(quick: bool) -> list[dict]:
    result = measure(QUICK_SECONDS if quick else SECONDS, QUICK_REPEATS if quick else REPEATS,
                     QUICK_PINGS if quick else PINGS, BASELINE_MTUS[-1:] if quick else BASELINE_MTUS)
    best_mtu, best = max(((int(value), statistics.median(samples))
                          for value, samples in result["baseline_mbit_s"].items()), key=lambda item: item[1])
    mesh = statistics.median(result["mesh_mbit_s"])
    ratio = mesh / best
    retransmits = (f"TCP retransmits per run (median): mesh {statistics.median(result['mesh_retransmits']):.0f}, "
                   f"baseline {statistics.median(result['baseline_retransmits'][str(best_mtu)]):.0f}")
    entry = row(f"pod A -> pod B through the mesh (MTU {result['mtu']})", result["mesh_mbit_s"], unit="Mbit/s",
                note=f"baseline hand-configured wg tunnel, best MTU {best_mtu}: {best:.0f} Mbit/s; ratio {ratio:.3f}; "
                     f"{retransmits}")
    entry["baseline_p50"], entry["ratio"] = round(best, 1), round(ratio, 4)
    if not quick:
        entry["target"], entry["met"] = f"ratio>={TARGET_RATIO:g}", ratio >= TARGET_RATIO
    entry["raw"] = result
    rows = [entry]
    for value, samples in result["baseline_mbit_s"].items():
        rows.append(row(f"pod C -> pod D, hand-configured wg tunnel (baseline), MTU {value}", samples,
                        unit="Mbit/s"))
    mesh_cost = statistics.median(result["mesh_cpu_ms_per_gb"])
    base_cost = statistics.median(result["baseline_cpu_ms_per_gb"][str(best_mtu)])
    cost = row("CPU per GB through the mesh (wireguard-go x2 + iperf3)", result["mesh_cpu_ms_per_gb"], unit="ms/GB",
               note=f"baseline tunnel at MTU {best_mtu}: {base_cost:.0f} ms/GB; ratio {mesh_cost / base_cost:.3f}")
    cost["baseline_p50"], cost["ratio"] = round(base_cost, 1), round(mesh_cost / base_cost, 4)
    rows.append(cost)
    ipv6 = statistics.median(result["mesh_ipv6_mbit_s"])
    ipv6_cost = statistics.median(result["mesh_ipv6_cpu_ms_per_gb"])
    dual = row("pod A -> pod B over IPv6, the same device and peer (dual-stack)", result["mesh_ipv6_mbit_s"],
               unit="Mbit/s", note=f"IPv4 through the mesh {mesh:.0f} Mbit/s: ratio {ipv6 / mesh:.3f} (an IPv6 header "
                                   f"is 20 bytes more of each {result['mtu']}); CPU per GB {ipv6_cost:.0f} ms, "
                                   f"ratio {ipv6_cost / mesh_cost:.3f}")
    dual["ratio"] = round(ipv6 / mesh, 4)
    rows.append(dual)
    pings = row(f"DF pings of exactly {result['mtu']} bytes, pod A -> pod B: lost", [result["df_pings_lost"]],
                unit="packets", target_p50=None if quick else 0,
                note=f"of {result['df_pings_sent']}; one byte more refused locally: {result['one_byte_more_refused']}")
    if not result["one_byte_more_refused"]:
        pings["met"] = False
    rows.append(pings)
    return rows


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
