"""`make demo`: bring up a 3-node lab, show encrypted cross-node pod traffic, and leave the lab running.

Each step prints the `wgcni-lab` command it runs, so a person can repeat it by hand:
1. `wgcni-lab up --nodes 3 --pods-per-node 2` (a lab left by an earlier demo is removed first);
2. `wgcni-lab status`;
3. pings from a pod on every node to a pod on the next node, while `wgcni-lab capture` records what enters the VNet
   (Azure's fabric, which would deliver a pod IP in plaintext too): every packet on the wire must be WireGuard UDP
   between node addresses (the pods' ICMP never appears in clear);
4. per node, `wgcni status`, `wgcni peers` and `wgcni check` when the debug CLI has them, else `wg show`;
5. how to explore the lab and how to stop it (`make demo-down`).
Exits non-zero when a step fails (the lab is left for inspection; `make demo-down` removes it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from wgcni_lab import lab

NODES = 3
PODS_PER_NODE = 2
CAPTURE_SECONDS = 60  # an upper bound: the demo stops the capture once the pings are done
PINGS = 5


def lab_command() -> list[str]:
    script = Path(sys.executable).parent / "wgcni-lab"
    return [str(script)] if script.exists() else [sys.executable, "-m", "wgcni_lab.cli"]


def show(command: list[str]) -> None:
    print(f"\n$ {' '.join(['wgcni-lab', *map(shlex.quote, command)])}", flush=True)


def wgcni_lab(*command: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    if not quiet:
        show(list(command))
    result = subprocess.run([*lab_command(), *command], text=True, capture_output=quiet)
    if check and result.returncode != 0:
        message = (result.stderr or "").strip() if quiet else ""
        raise SystemExit(f"demo: `wgcni-lab {' '.join(command)}` failed ({result.returncode}) {message}".rstrip())
    return result


def heading(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 100 - len(text)), flush=True)


def cross_node_pings(pods: list[dict]) -> list[tuple[dict, dict]]:
    """One pair per node: its first pod -> the first pod of the next node (a ring over the nodes)."""
    first: dict[str, dict] = {}
    for pod in pods:
        first.setdefault(pod["node"], pod)
    ordered = list(first.values())
    return [(ordered[index], ordered[(index + 1) % len(ordered)]) for index in range(len(ordered))]


def main() -> int:
    heading("1. bring up an AKS-like cluster: 3 nodes, each with containerd, wgcni and 2 pods")
    if lab.load_state(lab.lab_dir_from_environment()) is not None:
        print(f"(a lab is already up in {lab.lab_dir_from_environment()}, from an earlier `make demo` or another "
              f"checkout: removing it first; to keep it, run the demo with {lab.LAB_DIR_ENV}=<another dir>)")
        wgcni_lab("down")
    wgcni_lab("up", "--nodes", str(NODES), "--pods-per-node", str(PODS_PER_NODE))

    heading("2. the lab")
    wgcni_lab("status")
    pods = json.loads(wgcni_lab("status", "--json", quiet=True).stdout)["pods"]

    heading("3. cross-node pod pings while capturing on the VNet fabric")
    show(["capture", "--seconds", str(CAPTURE_SECONDS), "--json"])
    capture = subprocess.Popen([*lab_command(), "capture", "--seconds", str(CAPTURE_SECONDS), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert capture.stderr is not None
    print(f"  {capture.stderr.readline().strip()} (stopped once the pings are done)")  # tcpdump listens: ping now
    pings = []
    for source, target in cross_node_pings(pods):  # all at once, well inside the capture
        command = ["exec", source["name"], "--", "ping", "-c", str(PINGS), "-i", "0.2", "-W", "2", target["ip"]]
        show(command)
        pings.append((source, target, subprocess.Popen([*lab_command(), *command], stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True)))
    failed = []
    for source, target, ping in pings:
        stdout, stderr = ping.communicate()
        summary = [line for line in stdout.splitlines() if "packets transmitted" in line]
        print(f"  {source['name']} ({source['ip']}, {source['node']}) -> {target['name']} ({target['ip']}, "
              f"{target['node']}): {summary[0] if summary else stderr.strip()}")
        if ping.returncode != 0:
            failed.append(f"{source['name']} -> {target['name']}")
    capture.terminate()  # ends the capture early; it prints what it has
    output, errors = capture.communicate()
    if capture.returncode != 0:
        raise SystemExit(f"demo: the capture failed: {errors.strip()}")
    packets = [json.loads(line) for line in output.splitlines() if line.strip()]
    state = lab.require_state(lab.lab_dir_from_environment())
    from wgcni_lab.wire import only_wireguard_between_nodes

    clear = only_wireguard_between_nodes(state, packets)
    print(f"\n  {len(packets)} IP packets crossed the fabric; {len(packets) - len(clear)} were WireGuard UDP "
          f"between node addresses (port {lab.WG_PORT}), {len(clear)} were anything else:")
    for packet in packets[:6]:
        print(f"    {packet['line']}")
    for packet in clear[:10]:
        print(f"    NOT WIREGUARD: {packet['line']}")

    heading("4. what each node's wgcni sees")
    debug_cli = wgcni_lab("exec", "node-1", "--", "wgcni", "--help", check=False, quiet=True).stdout
    commands = [["wgcni", name] for name in ("status", "peers", "check") if f"  {name} " in debug_cli]
    for node in state.nodes:
        for command in commands or [["wg", "show", lab.WG_INTERFACE]]:
            wgcni_lab("exec", node.name, "--", *command, check=False)

    heading("5. explore, then stop")
    source, target = cross_node_pings(pods)[0] if pods else ({"name": "POD"}, {"name": "POD", "ip": "IP"})
    hints = [
        ("status", "nodes, pods, namespaces (--json for scripts)"),
        ("exec node-1 -- wg show", "WireGuard on a node (each node has its own /var/run/wireguard)"),
        ("exec node-1 -- wgcni status", "the node's wgcni (see `wgcni --help` for the other commands)"),
        (f"exec node-1 -- ip route show table {lab.HOOK_DEFAULTS.route_table}", "what goes into the tunnel"),
        (f"exec {source['name']} -- ping {target['ip']}", "from a pod to a pod on another node"),
        ("pod-add node-2", "a pod made the way kubelet makes one (CRI RunPodSandbox)"),
        (f"pod-del {source['name']}", "and deleted: the peers on the other nodes follow"),
        ("capture --seconds 5", "what enters the VNet fabric (each packet once, on its sender's link)"),
        (f"exec client -- ping {state.nodes[0].ip}", "from a VM in the VNet outside the cluster"),
        (f"service-add web --pod {target['name']} --port 80 --node-port 30080",
         "a NodePort Service, programmed as kube-proxy does"),
    ]
    width = max(len(hint) for hint, _ in hints)
    print("\nThe lab is still running. Try:")
    for hint, meaning in hints:
        print(f"  .venv/bin/wgcni-lab {hint.ljust(width)}  {meaning}")
    print("Stop it with:  make demo-down")
    if failed or clear or not packets:
        problems = [f"pings failed: {', '.join(failed)}"] if failed else []
        problems += [f"{len(clear)} packets on the fabric were not WireGuard"] if clear else []
        problems += ["nothing crossed the fabric"] if not packets else []
        print(f"\ndemo: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print("\ndemo: OK — pod traffic between nodes crossed the VNet only as WireGuard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
