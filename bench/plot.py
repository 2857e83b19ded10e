"""The P3 curves as an SVG chart: `python -m bench.plot [results.json] [out.svg]` (defaults: bench/results.json,
docs/benchmarks-p3.svg).

Three panels over the cluster sizes P3 measured (log-scaled nodes): the full plan's CPU seconds, one remote pod
event's CPU milliseconds, and the hook's peak RSS in MB, each with its issue-6 target as a dashed line, so the curve
and the bound are read together. Plain SVG text, no plotting library (the hook's dependencies stay as they are).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from bench.p3_scale import EVENT_ROWS, TARGET_EVENT_MS, TARGET_FULL_S, TARGET_RSS_MB

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-p3.svg"
WIDTH, HEIGHT, MARGIN = 300, 220, 50
REMOTE_POD_EVENTS = EVENT_ROWS["one remote pod event (add, delete)"]  # the events P3's targeted row pools
PANELS = (  # (title, unit, value of one size, target)
    ("full plan from scratch", "s CPU", lambda size: size["full_model_cpu_s"] + size["full_pass_cpu_s"],
     TARGET_FULL_S),
    ("one remote pod event (p50)", "ms CPU",
     lambda size: statistics.median(sample for name in REMOTE_POD_EVENTS for sample in size["events_ms"][name]),
     TARGET_EVENT_MS),
    ("peak RSS of the hook", "MB", lambda size: size["rss_peak_events_mb"], TARGET_RSS_MB),
)


def p3_sizes(results: dict) -> list[dict]:
    """The scattered-layout sizes of a `bench.run` results file, smallest first."""
    rows = results["benchmarks"]["P3"]["rows"]
    sizes = [size for size in rows[0]["raw"] if size["layout"] == "scattered"]
    if len(sizes) < 2:
        raise ValueError("P3 measured fewer than two cluster sizes: no curve to draw")
    return sorted(sizes, key=lambda size: size["nodes"])


def _panel(index: int, title: str, unit: str, points: list[tuple[int, float]], target: float, pods: int) -> str:
    left = index * (WIDTH + MARGIN) + MARGIN
    low, high = math.log10(points[0][0]), math.log10(points[-1][0])
    top = max(max(value for _, value in points), target) * 1.15

    def x(nodes: int) -> float:
        return left + (math.log10(nodes) - low) / (high - low) * WIDTH

    def y(value: float) -> float:
        return MARGIN + HEIGHT - value / top * HEIGHT

    parts = [f'<text x="{left + WIDTH / 2}" y="{MARGIN - 22}" text-anchor="middle" font-weight="bold">{title}</text>',
             f'<text x="{left + WIDTH / 2}" y="{MARGIN - 8}" text-anchor="middle">{unit}</text>',
             f'<line x1="{left}" y1="{MARGIN + HEIGHT}" x2="{left + WIDTH}" y2="{MARGIN + HEIGHT}" stroke="black"/>',
             f'<line x1="{left}" y1="{MARGIN}" x2="{left}" y2="{MARGIN + HEIGHT}" stroke="black"/>',
             f'<line x1="{left}" y1="{y(target):.1f}" x2="{left + WIDTH}" y2="{y(target):.1f}" stroke="#c00" '
             f'stroke-dasharray="6 4"/>',
             f'<text x="{left + WIDTH - 4}" y="{y(target) - 5:.1f}" text-anchor="end" fill="#c00">target {target:g}'
             f'</text>',
             '<polyline fill="none" stroke="#05a" stroke-width="2" points="'
             + " ".join(f"{x(nodes):.1f},{y(value):.1f}" for nodes, value in points) + '"/>']
    for nodes, value in points:
        parts.append(f'<circle cx="{x(nodes):.1f}" cy="{y(value):.1f}" r="3.5" fill="#05a"/>')
        parts.append(f'<text x="{x(nodes):.1f}" y="{y(value) - 9:.1f}" text-anchor="middle">{value:.3g}</text>')
        parts.append(f'<text x="{x(nodes):.1f}" y="{MARGIN + HEIGHT + 18}" text-anchor="middle">{nodes}</text>')
    parts.append(f'<text x="{left + WIDTH / 2}" y="{MARGIN + HEIGHT + 36}" text-anchor="middle">nodes x '
                 f'{pods} pod IPs (log scale)</text>')
    return "\n".join(parts)


def render(results: dict) -> str:
    sizes = p3_sizes(results)
    pods = sizes[0]["pods_per_node"]
    panels = [_panel(index, title, unit, [(size["nodes"], value(size)) for size in sizes], target, pods)
              for index, (title, unit, value, target) in enumerate(PANELS)]
    width = len(PANELS) * (WIDTH + MARGIN) + MARGIN
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT + 2 * MARGIN + 40}" '
            f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(panels) + "\n</svg>\n")


def main(argv: list[str]) -> int:
    results = Path(argv[0]) if argv else DEFAULT_RESULTS
    output = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUTPUT
    try:
        chart = render(json.loads(results.read_text()))
    except (OSError, KeyError, ValueError) as error:
        print(f"bench.plot: {results}: {error}", file=sys.stderr)
        return 1
    output.write_text(chart)
    print(f"P3 curves: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
