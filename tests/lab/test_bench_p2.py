"""P2 (lab convergence benchmark) stays runnable: its quick mode through the bench runner, correctness only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]


def test_quick_p2_measures_every_scenario_in_a_lab_it_removes(tmp_path, built) -> None:  # type: ignore[no-untyped-def]
    output = tmp_path / "results.json"

    process = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "P2", "--output", str(output)],
                             capture_output=True, text=True, timeout=300)

    assert process.returncode == 0, process.stdout + process.stderr
    rows = json.loads(output.read_text())["benchmarks"]["P2"]["rows"]
    assert [row["n"] for row in rows] == [1] * 6 and len({row["case"] for row in rows}) == 6
    assert all(0 < row["p50"] < 30_000 and row["unit"] == "ms" and row["target"] == "p99<=250" for row in rows)
    for from_call, from_record in zip(rows[::2], rows[1::2], strict=True):  # the record changes within the call
        assert from_record["case"].startswith(from_call["case"]) and from_record["p50"] <= from_call["p50"] + 5
    # nothing of this run's lab is left (its namespaces carry the lab's id; other labs may come and go meanwhile)
    (suffix,) = {row["lab_suffix"] for row in rows if "lab_suffix" in row}
    assert suffix
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in listed.splitlines() if line.startswith(f"wgl-{suffix}-")]
