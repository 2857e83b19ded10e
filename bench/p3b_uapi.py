"""P3b: programming the P3 state into a real wireguard-go through the UAPI backend, beside `wg setconf` of the same
configuration in the same run; and the kernel backend's cost model (netlink messages and bytes per operation).

Userspace part (in a network namespace created for the run and removed afterwards, one wireguard-go for the run):
- full program: the planner's ops for N peers x 250 pod IPs (from the P3 synthetic cluster, scattered layout: every
  IP its own AllowedIP) applied to an empty device by `UserspaceWireGuard.apply_peer_ops` (one UAPI transaction),
  versus `wg setconf` of a config file holding exactly the same peers (the file is written before the clock starts);
  the device is emptied (`replace_peers`) before every run and checked afterwards;
- one pod IP added to / removed from a loaded device: the backend's incremental op versus `wg set ... allowed-ips`
  with the peer's whole new list (what an agent that replaces a peer's AllowedIPs on every change sends);
- reading the whole device back (the full resync): `read()` versus `wg show <dev> dump`.
Medians of CPU time summed over the hook's process, `wg` and wireguard-go (see `Clock`); the baseline of each
row and the ratio are in the note, with the wall-time ratio (target: UAPI within 2x of wg setconf).

Kernel part (pure, no kernel needed): the messages `node_hook.apply.wg_kernel` builds for the same operations
(`plan_peer_writes` + `split_messages` + `build_set_message`), encoded by pyroute2 and counted.

Run: `python -m bench.p3b_uapi` (as root) or `python -m bench.run --only P3b`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench import Clock, comparison_rows, row
from bench.p3_scale import synthetic_cluster
from node_hook.apply import wg_kernel
from node_hook.apply.wg_uapi import UserspaceWireGuard
from node_hook.contracts import DeviceSpec, PeerOp, RemoveAllowedIPs, RemovePeer, UpsertPeer
from node_hook.keys import public_key_of
from node_hook.model import NodeModel
from node_hook.planner import plan_peers
from wgcni_lab.harness.netns import (
    entered_namespace,  # the namespace helper the netns tests use
    sh,
)

TITLE = "wireguard-go via the UAPI backend vs wg setconf; kernel backend netlink cost model"
SIZES = (50, 500, 5000)
PODS_PER_NODE = 250
FULL_REPEATS = {50: 5, 500: 3, 5000: 1}
EVENT_REPEATS = 15
QUICK_SIZES = (5, 20)
QUICK_PODS = 4
TARGET_RATIO = 2.0
PORT = 51899
FWMARK = 0x100000


@functools.lru_cache(maxsize=1)
def desired_peers(nodes: int, pods: int) -> dict:
    """The model's desired peers for `nodes` other nodes (the userspace and the kernel part share the largest)."""
    _, remote = synthetic_cluster(nodes + 1, pods, "scattered")
    model = NodeModel("node-00000")
    model.replace_remote_nodes(remote)
    return model.peers


def full_ops(peers: dict) -> list[PeerOp]:
    """What the reconciler sends to an empty device."""
    reshape, removals, adds = plan_peers(peers, {})
    return reshape + removals + adds


def config_text(private_key: bytes, peers: dict) -> str:
    lines = ["[Interface]", f"PrivateKey = {base64.b64encode(private_key).decode()}", f"ListenPort = {PORT}",
             f"FwMark = {FWMARK:#x}"]
    for _, peer in sorted(peers.items()):  # the order the backend programs them in (the planner sorts by key)
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}", f"Endpoint = {peer.endpoint[0]}:{peer.endpoint[1]}",
                  "AllowedIPs = " + ", ".join(str(prefix) for prefix in sorted(peer.allowed_ips))]
    return "\n".join(lines) + "\n"


class Device:
    """One wireguard-go in the current (benchmark) namespace, driven through the hook's backend."""

    def __init__(self, ifname: str, work: Path) -> None:
        self.ifname = ifname
        self.private_key = hashlib.sha256(f"p3b {ifname}".encode()).digest()
        self.backend = UserspaceWireGuard(ifname, log_file=work / "wireguard-go.log")
        self.backend.ensure_device(DeviceSpec(ifname, self.private_key, public_key_of(self.private_key), PORT, FWMARK,
                                              1340))

    def clear(self) -> None:
        self.backend.client.set(["replace_peers=true"])

    def counts(self) -> tuple[int, int]:
        """(peers, AllowedIPs) on the device, from `wg show dump` (independent of the backend under test)."""
        lines = sh("wg", "show", self.ifname, "dump", timeout=600).stdout.splitlines()[1:]
        allowed = sum(len(line.split("\t")[3].split(",")) for line in lines if line.split("\t")[3] != "(none)")
        return len(lines), allowed

    def close(self) -> None:
        self.backend.delete_device()
        self.backend.close()


def measure_userspace(device: Device, nodes: int, pods: int, full_repeats: int, event_repeats: int,
                      work: Path) -> dict:
    peers = desired_peers(nodes, pods)
    ops = full_ops(peers)
    expected = (len(peers), sum(len(peer.allowed_ips) for peer in peers.values()))
    config = work / f"setconf-{nodes}.conf"
    config.write_text(config_text(device.private_key, peers))
    config.chmod(0o600)
    pid = device.backend.pid
    assert pid is not None, "wireguard-go is not running"
    clock = Clock((pid,))
    for _ in range(full_repeats):
        device.clear()
        clock.measure("full uapi", lambda: device.backend.apply_peer_ops(ops))
        assert device.counts() == expected, "UAPI backend did not program every peer and AllowedIP"
        device.clear()
        clock.measure("full setconf", lambda: sh("wg", "setconf", device.ifname, str(config), timeout=600))
        assert device.counts() == expected, "wg setconf did not program every peer and AllowedIP"
    # the device now holds the full state; events against it
    peer = next(iter(peers.values()))
    have = sorted(peer.allowed_ips, key=lambda prefix: int(prefix.network_address))
    for attempt in range(event_repeats):
        extra = ipaddress.ip_network(f"100.64.{attempt // 250}.{attempt % 250}/32")
        add = [UpsertPeer(peer.public_key, peer.endpoint, (extra,), False, 0)]
        remove = [RemoveAllowedIPs(peer.public_key, (extra,))]
        clock.measure("uapi add", functools.partial(device.backend.apply_peer_ops, add))
        clock.measure("uapi remove", functools.partial(device.backend.apply_peer_ops, remove))
        with_extra = ",".join(str(prefix) for prefix in [*have, extra])
        without = ",".join(str(prefix) for prefix in have)
        clock.measure("wg set add", functools.partial(sh, "wg", "set", device.ifname, "peer", peer.public_key,
                                                      "allowed-ips", with_extra))
        clock.measure("wg set remove", functools.partial(sh, "wg", "set", device.ifname, "peer", peer.public_key,
                                                         "allowed-ips", without))
    assert device.counts() == expected, "events left the device changed"
    for _ in range(max(1, full_repeats)):
        state = clock.measure("read()", device.backend.read)
        assert state is not None and len(state.peers) == expected[0]
        clock.measure("wg show dump", lambda: sh("wg", "show", device.ifname, "dump", timeout=600))
    return {"nodes": nodes, "pods": pods, "peers": expected[0], "allowed_ips": expected[1],
            "cpu_s": {name: clock.cpu(name) for name in clock.samples},
            "wall_s": {name: clock.wall(name) for name in clock.samples}}


# ---- kernel backend cost model -----------------------------------------------------------------------------

def _encoded_size(writes: list[wg_kernel.PeerWrite], cache: dict) -> int:
    """Bytes of the SET_DEVICE message pyroute2 encodes for `writes` (memoised by the message's shape: messages
    of a full plan differ only in keys and addresses)."""
    shape = tuple((w.flags, w.endpoint is not None, w.persistent_keepalive is not None, w.remove_allowed_ips,
                   tuple(prefix.version for prefix in w.allowed_ips)) for w in writes)
    if shape not in cache:
        message = wg_kernel.build_set_message("wgcni0", writes)
        message["cmd"] = wg_kernel.WG_CMD_SET_DEVICE
        message["version"] = wg_kernel.WG_GENL_VERSION
        message["header"]["type"] = 0x10
        message.encode()
        cache[shape] = len(message.data)
    return cache[shape]


def kernel_cost(ops: list[PeerOp], per_ip_remove: bool, cache: dict) -> tuple[int, int]:
    """(messages, bytes) the kernel backend sends for `ops`."""
    messages = wg_kernel.split_messages(wg_kernel.plan_peer_writes(ops, per_ip_remove))
    return len(messages), sum(_encoded_size(writes, cache) for writes in messages)


def kernel_cost_model(nodes: int, pods: int) -> dict:
    peers = desired_peers(nodes, pods)
    cache: dict = {}
    peer = next(iter(peers.values()))
    extra = ipaddress.ip_network("100.64.0.1/32")
    one = (extra,)
    joined = UpsertPeer(peer.public_key, peer.endpoint, tuple(peer.allowed_ips), True, 0)
    replace_all = UpsertPeer(peer.public_key, peer.endpoint, tuple(sorted(peer.allowed_ips - {min(peer.allowed_ips)})),
                             True, 0)
    allowed = sum(len(p.allowed_ips) for p in peers.values())
    # a dump carries every peer and AllowedIP once: the same attributes as a SET_DEVICE that programs them all, plus
    # per peer the handshake time, rx/tx counters and protocol version (4+16, 2x(4+8), 4+4 bytes)
    full = kernel_cost(full_ops(peers), True, cache)
    dump_bytes = full[1] + len(peers) * (20 + 24 + 8)
    return {
        "nodes": nodes, "allowed_ips": allowed,
        "full program": full,
        "pod IP added": kernel_cost([UpsertPeer(peer.public_key, peer.endpoint, one, False, 0)], True, cache),
        "pod IP removed (per-IP remove flag, Linux 6.16+)": kernel_cost([RemoveAllowedIPs(peer.public_key, one)],
                                                                         True, cache),
        "pod IP removed (zero-key peer, older kernels)": kernel_cost([RemoveAllowedIPs(peer.public_key, one)], False,
                                                                    cache),
        "pod IP removed by replacing the peer's list (Calico)": kernel_cost([replace_all], True, cache),
        "node joined": kernel_cost([joined], True, cache),
        "node left": kernel_cost([RemovePeer(peer.public_key)], True, cache),
        "whole-device dump (a resync read-back)": (full[0], dump_bytes),
    }


# ---- the benchmark ------------------------------------------------------------------------------------------

def run(quick: bool) -> list[dict]:
    for tool in ("wg", "wireguard-go", "ip"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"P3b needs {tool} on PATH")
    if os.geteuid() != 0:
        raise RuntimeError("P3b needs root (it creates a network namespace)")
    sizes = QUICK_SIZES if quick else SIZES
    pods = QUICK_PODS if quick else PODS_PER_NODE
    results = []
    work = Path(tempfile.mkdtemp(prefix="wgcni-p3b-"))
    try:
        with entered_namespace("p3b") as namespace:
            device = Device(f"p3b{namespace[-6:]}", work)
            try:
                for nodes in sizes:
                    results.append(measure_userspace(device, nodes, pods, 1 if quick else FULL_REPEATS[nodes],
                                                     2 if quick else EVENT_REPEATS, work))
            finally:
                device.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    comparisons = (  # (title, ours, theirs, baseline's description, per item, targeted)
        ("full program", "full uapi", "full setconf", "wg setconf of the same config", False, True),
        ("one pod IP added (incremental op)", "uapi add", "wg set add", "wg set <peer> allowed-ips <whole list>",
         False, False),
        ("one pod IP removed (incremental op)", "uapi remove", "wg set remove",
         "wg set <peer> allowed-ips <whole list>", False, False),
        ("read back the whole device (resync)", "read()", "wg show dump", "wg show <dev> dump", False, False),
    )
    for result in results:
        label = f"{result['peers']} peers x {result['allowed_ips'] // max(result['peers'], 1)} IPs"
        cpu_ms = {name: [cpu * 1000 for cpu in samples] for name, samples in result["cpu_s"].items()}
        rows += comparison_rows(label, "UAPI backend", cpu_ms, result["wall_s"], comparisons,
                                None if quick else TARGET_RATIO)
    models = [kernel_cost_model(nodes, pods) for nodes in reversed(sizes)][::-1]  # the largest first: cached
    for operation, value in models[-1].items():  # the table shows the largest size; the JSON has every size
        if operation in ("nodes", "allowed_ips"):
            continue
        messages, size = value
        entry = row(f"kernel, {sizes[-1]} peers x {pods}: {operation}", [size / 1024], unit="KiB",
                    note=f"{messages} netlink message{'s' if messages != 1 else ''}")
        entry["messages"], entry["bytes"] = messages, size
        rows.append(entry)
    rows[0]["raw"] = {"userspace": results, "kernel": models}
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
