"""P4's quick mode (correctness only): two lab nodes with their hooks; TCP between the hooks' pods through the mesh
and between the other two pods through the hand-configured baseline tunnel both carry data (with their CPU cost and
retransmits), and so does TCP to the same pod's IPv6 address through the mesh; both tunnels' wireguard-go
started alike; DF packets of exactly the MTU pass and one byte more is
refused; nothing of the run is left behind."""

from __future__ import annotations

import subprocess

import pytest

from bench import p4_throughput

pytestmark = pytest.mark.netns


def _namespaces_and_links() -> tuple[list[str], list[str]]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return namespaces.splitlines(), links.splitlines()


def test_quick_run_measures_both_paths_and_cleans_up() -> None:
    rows = p4_throughput.run(quick=True)
    raw = rows[0]["raw"]
    assert raw["mtu"] == 1440  # 1500-byte VNet - 60 (WireGuard over IPv4), not Azure here
    assert all(rate > 1 for rate in raw["mesh_mbit_s"])
    assert len(raw["mesh_ipv6_mbit_s"]) == len(raw["mesh_mbit_s"]) and all(rate > 1 for rate in raw["mesh_ipv6_mbit_s"])
    assert all(cost > 0 for cost in raw["mesh_ipv6_cpu_ms_per_gb"])
    assert next(row for row in rows if "over IPv6" in row["case"])["ratio"] > 0
    assert all(rate > 1 for samples in raw["baseline_mbit_s"].values() for rate in samples)
    assert all(cost > 0 for cost in raw["mesh_cpu_ms_per_gb"])
    assert all(cost > 0 for samples in raw["baseline_cpu_ms_per_gb"].values() for cost in samples)
    assert len(raw["mesh_retransmits"]) == len(raw["mesh_mbit_s"])
    assert all(count >= 0 for count in raw["mesh_retransmits"])
    assert {mtu: len(counts) for mtu, counts in raw["baseline_retransmits"].items()} == {
        mtu: len(samples) for mtu, samples in raw["baseline_mbit_s"].items()}
    assert isinstance(raw["wireguard_go_own_sessions"], bool)  # measure() checked both tunnels are started alike
    assert raw["df_pings_lost"] == 0 and raw["one_byte_more_refused"]
    assert rows[0]["ratio"] > 0
    # nothing of this run's lab is left (its names carry the lab's random suffix; other runs may come and go)
    suffix = raw["lab_suffix"]
    namespaces, links = _namespaces_and_links()
    assert not [line for line in namespaces + links if suffix in line]
