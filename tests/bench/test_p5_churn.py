"""P5's quick mode (correctness only): churn through the real sync layer and the test API server ends with every
hook holding every other node's final pod IPs, and the write counting sees each node's own writes."""

from __future__ import annotations

from bench import p5_churn


def test_quick_run_converges_without_losing_an_ip() -> None:
    rows = p5_churn.run(quick=True)
    raw = rows[0]["raw"]
    assert raw["converged"] and raw["lost_ips"] == 0
    assert raw["nodes"] == p5_churn.QUICK_NODES
    assert len(raw["writes_per_second"]) == len(raw["events_per_second"]) == p5_churn.QUICK_NODES
    assert raw["changes_per_node"] >= 10  # the churn really ran
    assert all(rate > 0 for rate in raw["writes_per_second"])  # each node's writes are counted
    assert all(rate > 0 for rate in raw["events_per_second"])
    assert [entry["case"].rsplit(": ", 1)[1] for entry in rows] == [
        "API writes per node", "on_nodes deliveries per hook", "last change -> every hook has every IP", "IPs lost"]
