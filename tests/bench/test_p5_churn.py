"""P5's quick mode (correctness only): churn through the real sync layer and the test API server ends with every
hook holding every other node's final pod IPs, and the write counting sees each node's own writes; the count of
lost and stale IPs sees a hook's view that lacks an IP or still holds a removed one."""

from __future__ import annotations

from bench import p5_churn
from node_hook.model import RemoteNode


def test_quick_run_converges_without_losing_an_ip() -> None:
    rows = p5_churn.run(quick=True)
    raw = rows[0]["raw"]
    assert raw["lost_ips"] == raw["stale_ips"] == 0
    assert rows[3]["met"] is True and rows[3]["target"] == "p50<=0"
    assert raw["nodes"] == p5_churn.QUICK_NODES
    assert len(raw["writes_per_second"]) == len(raw["events_per_second"]) == p5_churn.QUICK_NODES
    assert raw["changes_per_node"] >= 10  # the churn really ran
    assert all(rate > 0 for rate in raw["writes_per_second"])  # each node's writes are counted
    assert all(rate > 0 for rate in raw["events_per_second"])
    assert [entry["case"].rsplit(": ", 1)[1] for entry in rows] == [
        "API writes per node", "deliveries per hook", "last change -> every hook has every IP", "IPs lost"]


def test_lost_and_stale_ips_are_counted_per_hook_view() -> None:
    pods = [{"10.241.0.1"}, {"10.241.1.1", "10.241.1.2"}, {"10.241.2.1"}]
    views = [p5_churn.View() for _ in pods]

    def hand(view: p5_churn.View, held: dict[int, set[str]]) -> None:
        view.nodes_synced({p5_churn.node_name(index): RemoteNode(p5_churn.node_name(index), "", None, 51820,
                                                                 frozenset(), ips) for index, ips in held.items()})

    hand(views[0], {1: pods[1], 2: pods[2]})
    hand(views[1], {0: pods[0], 2: pods[2]})
    hand(views[2], {0: pods[0], 1: pods[1]})
    assert p5_churn.missing_and_stale(views, pods) == (0, 0)
    hand(views[0], {1: {"10.241.1.1"}, 2: pods[2] | {"10.241.2.9"}})  # lacks one IP of node 1, holds a removed one
    hand(views[2], {1: pods[1]})  # has not seen node 0 at all
    assert p5_churn.missing_and_stale(views, pods) == (2, 1)
