"""P8 (bench/p8_observe.py) stays runnable: a quick pass over a small cluster yields one well-formed row per case."""

from __future__ import annotations

from bench import p8_observe


def test_quick_p8_measures_every_case() -> None:
    rows = p8_observe.run(quick=True)
    assert [row["case"] for row in rows] == list(p8_observe.TARGETS_MS)
    assert all(row["n"] == p8_observe.QUICK_REPEATS and row["p50"] > 0 and row["met"] is None for row in rows)
