"""The reliability campaign (wgcni_lab/chaos.py, `make chaos`): its verdict logic, and its short form run whole on a
lab of its own: churn with hooks killed -9, API faults, every kind of tampering, hook, containerd and node restarts -
nothing lost, the mesh exact after each phase, every tampering repaired within 2 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wgcni_lab import chaos


def test_a_phase_is_ok_only_when_nothing_was_lost_and_everything_converged() -> None:
    good = chaos.Phase("churn", injected={"pod ADD": 3}, converged_after=1.0)
    assert good.ok
    for broken in (chaos.Phase("churn"), chaos.Phase("churn", converged_after=1.0, lost_records=["node-1/ab"]),
                   chaos.Phase("churn", converged_after=1.0, stale_records=["node-1/ab"]),
                   chaos.Phase("churn", converged_after=1.0, mesh_problems=["node-1: no peer for node-2"]),
                   chaos.Phase("churn", converged_after=1.0, errors=["ADD on node-1: refused"]),
                   chaos.Phase("tamper", converged_after=1.0, repairs={"rule deleted": None}),
                   chaos.Phase("tamper", converged_after=1.0, repairs={"rule deleted": chaos.REPAIR_BOUND + 0.01})):
        assert not broken.ok, broken


def test_the_summary_names_each_phase_and_what_failed() -> None:
    phases = [chaos.Phase("churn", injected={"pod ADD": 2, "hook kill -9": 1}, converged_after=0.5),
              chaos.Phase("tamper", injected={"rule deleted": 1}, converged_after=0.1,
                          repairs={"rule deleted": 0.12}, pings_lost={"rule deleted": 0}),
              chaos.Phase("restarts", lost_records=["node-2/ff"])]
    result = chaos.report(phases, chaos.SHORT, 7, 12.0)
    assert result["ok"] is False and [phase["ok"] for phase in result["phases"]] == [True, True, False]
    table = chaos.summary(result).splitlines()
    assert table[2] == "| churn | pod ADD 2, hook kill -9 1 | 0.50 s | 0 / 0 | 0 | ok |"
    assert table[3] == "| tamper | rule deleted 0.12 s (0 pings lost) | 0.10 s | 0 / 0 | 0 | ok |"
    assert table[4] == "| restarts |  | never | 1 / 0 | 0 | FAILED: node-2/ff |"


@pytest.mark.netns
@pytest.mark.runtime
@pytest.mark.slow
def test_the_short_campaign_loses_nothing_and_ends_exact(built: None, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "wgcni_lab.chaos", "--short", "--report", str(report)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(report.read_text())
    phases = {phase["name"]: phase for phase in result["phases"]}
    churn = phases["churn + hook kill -9"]["injected"]
    assert churn["pod ADD"] + churn["pod DEL"] >= chaos.SHORT.churn_ops and churn["hook kill -9"] >= 1
    api = phases["churn + API faults"]["injected"]
    assert len([kind for kind in api if kind.startswith("api ")]) == len(chaos.API_FAULT_SEQUENCE)
    repairs = phases["tamper"]["repairs"]
    assert set(repairs) == set(chaos.tampering("", "")) and all(0 <= seconds <= chaos.REPAIR_BOUND
                                                              for seconds in repairs.values())
    restarts = phases["restarts"]["injected"]
    assert (restarts["hook kill -9"], restarts["containerd restart"], restarts["node reboot"]) == (
        chaos.SHORT.hook_kills, chaos.SHORT.containerd_restarts, chaos.SHORT.reboots)
    assert restarts["pod ADD"] + restarts["pod DEL"] >= 2 * chaos.SHORT.workers * 3
    assert "| churn + hook kill -9 |" in run.stdout and "chaos: ok" in run.stdout
