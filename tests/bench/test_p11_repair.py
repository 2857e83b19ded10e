"""P11's quick mode against a real hook on wireguard-go in a namespace it creates (correctness only): every kind of
tampering is repaired by a pass that applies its step, the device ends exact, and the namespace is gone."""

from __future__ import annotations

import pytest

from bench import p11_repair
from wgcni_lab.harness.netns import namespaces_named


@pytest.mark.netns
def test_quick_run_repairs_every_kind_and_cleans_up() -> None:
    before = namespaces_named("p11-")
    rows = p11_repair.run(quick=True)
    assert namespaces_named("p11-") <= before
    raw = rows[0]["raw"]
    assert raw["device exact at the end"]
    assert set(raw["repairs"]) == set(p11_repair.tamperings("wg", "key", "10.0.0.1"))
    for samples in raw["repairs"].values():
        assert len(samples["wall ms"]) == p11_repair.QUICK_REPEATS and all(ms > 0 for ms in samples["wall ms"])
    assert all(row["met"] is not False for row in rows)  # at 5 peers, far within the 2 s bound
