"""wgcni benchmarks (`make bench` = `python -m bench.run`): a registry of benchmark modules and their result rows.

A benchmark is a module ``bench/p<N>_<topic>.py`` (found by name, nothing to register by hand) that defines
``TITLE`` and ``run(quick: bool) -> list[dict]``, one row per measured case (see ``row``). ``quick`` asks for a
correctness pass with few iterations (what tests/cni/test_bench.py runs so that no benchmark rots); numbers from it
are not meant to be quoted. A module that instead offers ``measure(rounds) -> {"name", "unit", "scenarios":
{case: {"p50", "max", "samples"}}}`` is adapted (one row per scenario). Speed targets live here, never in timed
unit tests.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
import statistics
from types import ModuleType

MODULE_NAME = re.compile(r"p(\d+)([a-z]?)_\w+")  # p3_scale -> P3, p3b_uapi -> P3b


def order_key(key: str) -> tuple[int, str]:
    """Sort key of a benchmark key: P2 < P3 < P3b < P4."""
    match = re.fullmatch(r"P(\d+)([a-z]?)", key)
    if match is None:
        raise ValueError(f"not a benchmark key: {key!r}")
    return int(match.group(1)), match.group(2)


def discover() -> dict[str, str]:
    """{"P1": "bench.p1_plugin", ...} for every benchmark module in this package, in numeric order."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        match = MODULE_NAME.fullmatch(module.name)
        if match:
            found[f"P{int(match.group(1))}{match.group(2)}"] = f"{__name__}.{module.name}"
    return dict(sorted(found.items(), key=lambda item: order_key(item[0])))


def load(module_name: str) -> ModuleType:
    return importlib.import_module(module_name)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def row(case: str, samples: list[float], unit: str = "ms", target_p50: float | None = None,
        target_p99: float | None = None, note: str = "") -> dict:
    """One result row from raw samples (already in ``unit``), with the target verdict when targets are given."""
    p50, p99 = statistics.median(samples), percentile(samples, 0.99)
    targets = []
    if target_p50 is not None:
        targets.append(f"p50<={target_p50:g}")
    if target_p99 is not None:
        targets.append(f"p99<={target_p99:g}")
    met = None
    if targets:
        met = (target_p50 is None or p50 <= target_p50) and (target_p99 is None or p99 <= target_p99)
    return {"case": case, "unit": unit, "n": len(samples), "p50": round(p50, 2), "p99": round(p99, 2),
            "max": round(max(samples), 2), "target": " ".join(targets), "met": met, "note": note}


def comparison_row(case: str, mine: list[float], base: list[float], mine_wall: list[float],
                   base_wall: list[float], baseline: str, extra: str = "", target_ratio: float | None = None) -> dict:
    """A row of CPU-ms samples measured side by side with a baseline's: the note gives the baseline's p50, the CPU
    and wall ratios of the medians (and `extra`); with `target_ratio` the row is met when the CPU ratio is at most it."""
    ratio = statistics.median(mine) / max(statistics.median(base), 1e-9)
    wall_ratio = statistics.median(mine_wall) / max(statistics.median(base_wall), 1e-9)
    entry = row(case, mine, note=f"cpu ms; baseline {baseline} p50 {statistics.median(base):.1f} ms, ratio "
                                 f"{ratio:.2f}{extra}; wall ratio {wall_ratio:.2f}")
    entry["baseline_p50"], entry["ratio"], entry["wall_ratio"] = (round(statistics.median(base), 3), round(ratio, 3),
                                                                  round(wall_ratio, 3))
    if target_ratio is not None:
        entry["target"], entry["met"] = f"ratio<={target_ratio:g}", ratio <= target_ratio
    return entry


def rows_from_measure(result: dict) -> list[dict]:
    """Rows from the ``measure()`` shape: {"unit", "scenarios": {case: {"p50", "max", "samples"}}}."""
    rows = []
    for case, scenario in result["scenarios"].items():
        samples = scenario.get("samples") or [scenario["p50"]]
        rows.append({"case": case, "unit": result.get("unit", ""), "n": len(samples), "p50": scenario["p50"],
                     "p99": round(percentile(samples, 0.99), 3), "max": scenario["max"], "target": "",
                     "met": None, "note": ""})
    return rows
