"""P3's quick mode (correctness only: the synthetic cluster, the worker subprocess, the checks of the kernel
process's fakes against the model after the full plan, the events and the resync, and of every remote pod event),
plus the properties of the synthetic layouts the figures depend on."""

from __future__ import annotations

import itertools

from bench import p3_scale


def test_quick_run_measures_every_size_and_event() -> None:
    rows = p3_scale.run(quick=True)
    cases = [entry["case"] for entry in rows]
    for nodes in p3_scale.QUICK_SIZES:
        label = f"{nodes} nodes x {p3_scale.QUICK_PODS} scattered"
        for title in ("full plan from scratch", *p3_scale.EVENT_ROWS, "full resync, nothing changed",
                      "peak RSS of the hook, full plan and events",
                      "peak RSS of the hook, with the resync's read-back"):
            assert f"{label}: {title}" in cases
    raw = rows[0]["raw"]
    assert [size["nodes"] for size in raw] == [*p3_scale.QUICK_SIZES, *[p3_scale.QUICK_SIZES[-1]] * 2]
    for size in raw:
        assert size["routes"] == size["nodes"] * (p3_scale.QUICK_PODS + 1) - 1  # remote pods + node IPs, local pods
        assert size["full_applied"]["peer_adds"] == size["nodes"] - 1
        assert size["full_applied"]["resync"] == 0
        assert all(len(samples) == p3_scale.QUICK_REPEATS for samples in size["events_ms"].values())
        assert size["rss_imports_mb"] > 0 and size["rss_peak_events_mb"] > 0  # both read (peaks only ever rise)
        assert size["kernel_rss_peak_mb"] > 0 and size["kernel_cpu_s"] > 0
    scattered, batched, overlay = raw[-3], raw[-2], raw[-1]
    assert scattered["allowed_ips"] == (scattered["nodes"] - 1) * (p3_scale.QUICK_PODS + 1)  # nothing aggregates
    assert batched["allowed_ips"] < scattered["allowed_ips"]
    # a node's 10 pods from .4 of its /24 are .4/30, .8/30, .12/31, and the node IP: 4 prefixes per peer
    assert overlay["allowed_ips"] == (overlay["nodes"] - 1) * 4


def test_layouts_give_every_node_distinct_addresses() -> None:
    for layout in ("scattered", "batch16", "overlay"):
        local, remote = p3_scale.synthetic_cluster(40, 250, layout)
        addresses = [ip for ips in local.values() for ip in ips]
        addresses += [str(key.network_address) for node in remote.values() for key in node.pod_ips]
        assert len(addresses) == len(set(addresses)) == 40 * 250
    scattered = sorted(int(key.network_address) for key in p3_scale.remote_node(3, 40, 250, "scattered").pod_ips)
    assert all(b - a == 40 for a, b in itertools.pairwise(scattered))  # no two adjacent: every IP its own /32
    batched = sorted(int(key.network_address) for key in p3_scale.remote_node(3, 40, 250, "batch16").pod_ips)
    assert batched[:16] == list(range(batched[0], batched[0] + 16)) and batched[0] % 16 == 0
    overlay = sorted(int(key.network_address) for key in p3_scale.remote_node(3, 40, 250, "overlay").pod_ips)
    assert overlay == list(range(p3_scale.OVERLAY_BASE + 3 * 256 + 4, p3_scale.OVERLAY_BASE + 3 * 256 + 254))
