"""P3b's quick mode against a real wireguard-go in a namespace it creates (correctness only: both ways of
programming end with every peer and AllowedIP on the device, events leave it unchanged), and the kernel cost
model's byte counts against pyroute2's own encoding."""

from __future__ import annotations

import ipaddress

import pytest

from bench import p3b_uapi
from node_hook.apply import wg_kernel
from node_hook.contracts import UpsertPeer
from wgcni_lab.harness.netns import namespaces_named


@pytest.mark.netns
def test_quick_run_programs_wireguard_go_both_ways_and_cleans_up() -> None:
    before = namespaces_named("p3b-")  # the benchmark's namespace is named p3b-<random>
    rows = p3b_uapi.run(quick=True)
    assert namespaces_named("p3b-") <= before  # the benchmark's namespace is gone
    raw = rows[0]["raw"]
    assert [result["peers"] for result in raw["userspace"]] == list(p3b_uapi.QUICK_SIZES)
    for result in raw["userspace"]:
        assert result["allowed_ips"] == result["peers"] * (p3b_uapi.QUICK_PODS + 1)
        # each operation measured, by a clock that saw its work
        for name in ("full uapi", "full setconf", "uapi add", "uapi remove", "wg set add", "wg set remove",
                     "read()", "wg show dump"):
            assert result["cpu_s"][name] and all(cpu > 0 for cpu in result["cpu_s"][name])
            assert len(result["wall_s"][name]) == len(result["cpu_s"][name])
    largest = raw["kernel"][-1]
    assert largest["pod IP added"][0] == 1 and largest["node left"][0] == 1
    # removing one IP costs about as much as adding one; replacing the whole list costs the whole list
    assert largest["pod IP removed (per-IP remove flag, Linux 6.16+)"][1] < 2 * largest["pod IP added"][1]
    assert largest["pod IP removed by replacing the peer's list (Calico)"][1] > largest["pod IP added"][1]


def test_kernel_cost_model_counts_what_pyroute2_encodes() -> None:
    key = "A" * 43 + "="
    prefixes = tuple(ipaddress.ip_network(f"10.1.{i // 200}.{i % 200}/32") for i in range(3000))
    ops = [UpsertPeer(key, ("10.0.0.1", 51820), prefixes, True, 0)]
    messages, size = p3b_uapi.kernel_cost(ops, True, {})
    encoded = []
    for writes in wg_kernel.split_messages(wg_kernel.plan_peer_writes(ops, True)):
        message = wg_kernel.build_set_message("wgcni0", writes)
        message["cmd"], message["version"] = wg_kernel.WG_CMD_SET_DEVICE, wg_kernel.WG_GENL_VERSION
        message["header"]["type"] = 0x10
        message.encode()
        encoded.append(len(message.data))
    assert messages == len(encoded) > 1 and size == sum(encoded)
    assert all(length <= wg_kernel.MAX_MESSAGE_BYTES for length in encoded)
