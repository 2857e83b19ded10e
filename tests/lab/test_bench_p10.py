"""P10 (the new-pod window benchmark) stays runnable: its quick mode through the bench runner, correctness only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]


def test_quick_p10_measures_both_modes(tmp_path, built) -> None:  # type: ignore[no-untyped-def]
    output = tmp_path / "results.json"

    process = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "P10", "--output", str(output)],
                             capture_output=True, text=True, timeout=900)

    assert process.returncode == 0, process.stdout + process.stderr
    rows = json.loads(output.read_text())["benchmarks"]["P10"]["rows"]
    assert [row["case"].split(":")[0] for row in rows] == ["permissive", "strict"]
    assert all(row["n"] == 2 and 0 < row["p50"] < 60_000 and row["unit"] == "ms" for row in rows)
    assert "packets dropped" in rows[1]["note"] and "packets sent in plaintext" in rows[0]["note"]
