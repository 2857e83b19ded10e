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
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

Result = TypeVar("Result")
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
    and wall ratios of the medians (and `extra`); with `target_ratio` the row is met when the CPU ratio is at most
    it."""
    ratio = statistics.median(mine) / max(statistics.median(base), 1e-9)
    wall_ratio = statistics.median(mine_wall) / max(statistics.median(base_wall), 1e-9)
    entry = row(case, mine, note=f"cpu ms; baseline {baseline} p50 {statistics.median(base):.1f} ms, ratio "
                                 f"{ratio:.2f}{extra}; wall ratio {wall_ratio:.2f}")
    entry["baseline_p50"], entry["ratio"], entry["wall_ratio"] = (round(statistics.median(base), 3), round(ratio, 3),
                                                                  round(wall_ratio, 3))
    if target_ratio is not None:
        entry["target"], entry["met"] = f"ratio<={target_ratio:g}", ratio <= target_ratio
    return entry


def comparison_rows(label: str, component: str, cpu_ms: dict[str, list[float]], wall: dict[str, list[float]],
                    comparisons: Iterable[tuple[str, str, str, str, bool, bool]], target_ratio: float | None,
                    per_items: tuple[int, str] | None = None) -> list[dict]:
    """One `comparison_row` per (title, ours, theirs, baseline's description, per item, targeted) of `comparisons`:
    case "<label>: <title>, <component>", samples `cpu_ms[ours]` against `cpu_ms[theirs]` (wall times beside them,
    any one unit); with `per_items` = (count, item) and the comparison's per-item flag the note adds both medians
    in microseconds per item; a targeted comparison carries `target_ratio` (None: no verdict)."""
    rows = []
    for title, ours, theirs, baseline, per_item, targeted in comparisons:
        mine, base = cpu_ms[ours], cpu_ms[theirs]
        extra = ""
        if per_items is not None and per_item:
            count, item = per_items
            extra = (f"; {1000 * statistics.median(mine) / count:.2f} vs "
                     f"{1000 * statistics.median(base) / count:.2f} us per {item}")
        rows.append(comparison_row(f"{label}: {title}, {component}", mine, base, wall[ours], wall[theirs], baseline,
                                   extra, target_ratio if targeted else None))
    return rows


def thread_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time so far of every thread of `pids` (schedstat: nanoseconds, unlike the 10 ms ticks of
    /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that just ended
    return total / 1e9


class Clock:
    """Wall time and CPU time of named operations, CPU summed over everybody doing the work: this process, its
    waited-for children (`wg`, `ip`, `iperf3`) and every thread of `pids` (servers such as wireguard-go). The
    machine is shared, so the wall time of processes taking turns on a busy CPU measures the neighbours' load more
    than the work: verdicts use the CPU sums, the wall times are reported beside them. Samples are in seconds times
    `scale` (1000: milliseconds)."""

    def __init__(self, pids: Iterable[int] = (), scale: float = 1.0) -> None:
        self.pids = tuple(pids)
        self.scale = scale
        self.samples: dict[str, list[tuple[float, float]]] = {}

    def measure(self, name: str, action: Callable[[], Result]) -> Result:
        """Run `action`, record its (CPU, wall) sample under `name` and return what it returned."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own, servers, wall = time.process_time(), thread_cpu_seconds(self.pids), time.perf_counter()
        result = action()
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (time.process_time() - own + thread_cpu_seconds(self.pids) - servers
               + after.ru_utime - children.ru_utime + after.ru_stime - children.ru_stime)
        self.samples.setdefault(name, []).append((cpu * self.scale, wall * self.scale))
        return result

    def cpu(self, name: str) -> list[float]:
        return [cpu for cpu, _ in self.samples[name]]

    def wall(self, name: str) -> list[float]:
        return [wall for _, wall in self.samples[name]]


def rows_from_measure(result: dict) -> list[dict]:
    """Rows from the ``measure()`` shape: {"unit", "scenarios": {case: {"p50", "max", "samples"}}}."""
    rows = []
    for case, scenario in result["scenarios"].items():
        samples = scenario.get("samples") or [scenario["p50"]]
        rows.append({"case": case, "unit": result.get("unit", ""), "n": len(samples), "p50": scenario["p50"],
                     "p99": round(percentile(samples, 0.99), 3), "max": scenario["max"], "target": "",
                     "met": None, "note": ""})
    return rows
