"""P3c's quick mode in a namespace it creates (correctness only: the applier and `ip -batch` both program every
route of the synthetic node, `read()` returns exactly what was applied, events leave the table as it was, both
flushes empty it - the benchmark asserts each against `ip route show`), and that the namespace is gone."""

from __future__ import annotations

import pytest

from bench import p3c_routes
from wgcni_lab.harness.netns import namespaces_named


@pytest.mark.netns
def test_quick_run_programs_the_table_both_ways_and_cleans_up() -> None:
    before = namespaces_named("p3c-")  # the benchmark's namespace is named p3c-<random>
    rows = p3c_routes.run(quick=True)
    assert namespaces_named("p3c-") <= before
    raw = rows[0]["raw"]
    assert [result["nodes"] for result in raw] == list(p3c_routes.QUICK_SIZES)
    for result in raw:
        # remote pod IPs and node IPs (`dev`) and the node's own pods (`throw`)
        assert result["routes"] == result["nodes"] * (p3c_routes.QUICK_PODS + 1) - 1
        # each operation measured, by a clock that saw its work
        for name in ("apply all", "ip -batch", "apply add", "apply remove", "ip route replace", "ip route del",
                     "read()", "ip route show", "flush()", "ip route flush"):
            assert result["cpu_ms"][name] and all(cpu > 0 for cpu in result["cpu_ms"][name])
            assert len(result["wall_ms"][name]) == len(result["cpu_ms"][name])
    cases = [entry["case"] for entry in rows]
    assert len(cases) == len(p3c_routes.QUICK_SIZES) * (len(p3c_routes.COMPARISONS) + 1)
    assert all(entry["met"] is None for entry in rows)  # quick numbers carry no verdict
