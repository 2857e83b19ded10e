"""P9's quick mode (correctness only): the objects it measures are what the hook publishes (they parse back into 250
scattered pod IPs with a claim revision each), the relist reads all of them, and every row is there."""

from __future__ import annotations

from bench import p9_api_cost
from node_hook.cluster import remote_node_from_object


def test_quick_run_measures_every_row() -> None:
    rows = p9_api_cost.run(quick=True)
    assert [entry["case"].split(": ", 1)[1] for entry in rows] == [
        "bytes sent per pod event (event x 5000 watchers)", "relist of every WireguardNode (pages of 500)",
        "every hook's periodic relist, averaged", "hook CPU to decode one watch event",
        "node pool upgrade, every hook lists at once"]
    assert all(entry["p50"] > 0 for entry in rows)


def test_the_measured_object_is_a_published_one_with_250_scattered_pod_ips() -> None:
    obj = p9_api_cost.wireguard_node(7, 200, "uid")
    remote = remote_node_from_object(obj, 65536)
    assert remote is not None and len(remote.pod_ips) == 250
    assert len(obj["status"]["podIPPrefixes"]) == 250, "scattered: nothing aggregates"
    assert len(obj["status"]["podIPClaimRevisions"]) == 250
