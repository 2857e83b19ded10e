"""`python -m bench.run` (what `make bench` runs): run the registered benchmarks, print one table, write JSON.

Options: ``--quick`` (correctness pass, few iterations), ``--only P1[,P2]``, ``--output PATH`` (default
bench/results.json), ``--strict`` (exit 1 when a row misses its target). A benchmark that fails is reported in the
table and in the JSON with its error, and makes the run exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
import traceback

import bench

DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parent / "results.json"
COLUMNS = ("bench", "case", "n", "p50", "p99", "max", "unit", "target", "met", "note")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="correctness pass with few iterations")
    parser.add_argument("--only", default="", help="comma-separated benchmark keys, e.g. P1")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row misses its target")
    options = parser.parse_args(argv)

    available = bench.discover()
    wanted = [key.strip().capitalize() for key in options.only.split(",") if key.strip()] or list(available)
    unknown = [key for key in wanted if key not in available]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; available: {', '.join(available)}")

    results, failed = {}, False
    for key in wanted:
        started = time.monotonic()
        try:
            module = bench.load(available[key])
            if hasattr(module, "run"):
                title, rows = module.TITLE, module.run(options.quick)
            else:
                measured = module.measure(1) if options.quick else module.measure()
                title, rows = measured["name"], bench.rows_from_measure(measured)
            results[key] = {"title": title, "rows": rows, "seconds": round(time.monotonic() - started, 1)}
        except Exception as error:  # one broken benchmark must not hide the others' numbers
            failed = True
            results[key] = {"title": available[key], "rows": [], "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()}
    document = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": options.quick,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "benchmarks": results,
    }
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(document, indent=2) + "\n")
    print(render(results))
    print(f"\n{'quick run (correctness only) ' if options.quick else ''}results: {options.output}")
    missed = any(row["met"] is False for result in results.values() for row in result["rows"])
    return 1 if failed or (options.strict and missed) else 0


def render(results: dict) -> str:
    table = [COLUMNS]
    for key, result in results.items():
        if "error" in result:
            table.append((key, f"FAILED: {result['error']}", "", "", "", "", "", "", "", ""))
        for row in result["rows"]:
            met = {True: "yes", False: "MISSED", None: ""}[row["met"]]
            table.append((key, row["case"], str(row["n"]), f"{row['p50']:g}", f"{row['p99']:g}", f"{row['max']:g}",
                          row["unit"], row["target"], met, row.get("note", "")))
    widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    titles = [f"{key}: {result['title']}" for key, result in results.items()]
    return "\n".join(titles + [""] + lines)


if __name__ == "__main__":
    sys.exit(main())
