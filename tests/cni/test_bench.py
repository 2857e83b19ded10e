"""The benchmark runner and P1 stay runnable: `python -m bench.run --quick` (correctness only, few iterations)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import bench
from bench.run import render
from tests.support.binaries import built_binary

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_discovery_finds_the_plugin_benchmark_by_module_name():
    found = bench.discover()
    assert found["P1"] == "bench.p1_plugin"
    assert list(found) == sorted(found, key=bench.order_key)


def test_rows_and_percentiles():
    samples = [float(value) for value in range(1, 201)]
    result = bench.row("ADD", samples, target_p50=100.5, target_p99=198)
    assert (result["n"], result["p50"], result["p99"], result["max"]) == (200, 100.5, 198.0, 200.0)
    assert result["met"] is True and result["target"] == "p50<=100.5 p99<=198"
    assert bench.row("ADD", samples, target_p50=100)["met"] is False
    assert bench.row("bare", samples)["met"] is None
    table = render({"P1": {"title": "t", "rows": [result]}, "P9": {"title": "x", "rows": [], "error": "Boom: no"}})
    assert "P1: t" in table and "FAILED: Boom: no" in table and "yes" in table


def test_quick_p1_run_checks_the_built_plugin_and_writes_results(tmp_path):
    built_binary("wgcni")
    output = tmp_path / "results.json"
    process = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "P1", "--output", str(output)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    document = json.loads(output.read_text())
    assert document["quick"] is True
    p1 = document["benchmarks"]["P1"]
    assert "error" not in p1, p1.get("traceback")
    cases = {row["case"]: row for row in p1["rows"]}
    for case in ("ADD, hook absent", "DEL, hook absent", "ADD, hook present", "DEL, hook present"):
        assert cases[case]["n"] == 10 and cases[case]["p50"] > 0 and cases[case]["target"] == "p50<=10 p99<=25"
    for baseline in ("bare python3 -S -c pass", "Go chained plugin: portmap ADD", "Go chained plugin: tuning ADD"):
        assert cases[baseline]["n"] == 10 and cases[baseline]["p50"] > 0
    assert "ADD, hook present" in process.stdout


def test_unknown_benchmark_is_a_usage_error(tmp_path):
    process = subprocess.run([sys.executable, "-m", "bench.run", "--only", "P999", "--output", str(tmp_path / "r")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert process.returncode == 2 and "unknown benchmark P999" in process.stderr
