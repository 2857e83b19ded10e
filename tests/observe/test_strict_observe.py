"""Strict mode as an operator sees it, on a real hook daemon over the appliers' fakes: `wgcni status` says strict on or
off, /metrics has the kernel counters per direction (dropped in strict mode, counted in permissive mode), `wgcni
check` warns about drops that keep growing and names the destinations hit most, and the strict table follows the
remote nodes (an opted-out node's addresses are exempt) and the boot file follows the mode.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.strict import ADD_HOLD_PREFIX
from node_hook.contracts import PlaintextCounters
from node_hook.local_api import request
from node_hook.model import Publication
from tests.observe.conftest import Hook, remote, running_hook
from tests.observe.test_cli_hook import mesh
from tests.observe.test_metrics import scrape


def growing(hook: Hook, kind: str, address: str) -> None:
    """The fake's counters gain 7 packets to `address` each time they are read, as the kernel's would under load."""
    reads = [0]

    def counters() -> PlaintextCounters | None:
        reads[0] += 1
        packets = 7 * reads[0]
        values = {"out": packets, "in": 0}
        zero = {"out": 0, "in": 0}
        return PlaintextCounters(values if kind == "dropped" else zero, values if kind == "counted" else zero,
                                 {"out": [(address, packets)], "in": []})

    hook.firewall.counters = counters  # type: ignore[method-assign]


@pytest.fixture
def strict_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hook]:
    with running_hook(tmp_path, monkeypatch, strict_mode=True) as hook:
        yield hook


def test_permissive_counts_and_check_says_what_strict_would_drop(hook: Hook,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    status = hook.view.status()["strict"]
    assert (status["mode"], status["cluster"], status["tablePresent"]) == ("permissive", ["10.240.0.0/16"], True)
    assert "168.63.129.16/32" in status["allow"] and status["bootFile"] == ""
    assert hook.firewall.boot_files == {}
    growing(hook, "counted", "10.240.0.77")
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    findings = [f for f in json.loads(out)["findings"] if f["check"] == "strict"]
    assert code == 0 and [f["severity"] for f in findings] == ["info"], findings
    assert "strict mode would drop them" in findings[0]["message"] and "10.240.0.77" in findings[0]["message"]
    samples = scrape(hook)
    assert samples["wgcni_strict_mode"][()] == 0
    assert samples["wgcni_plaintext_packets_total"][(("direction", "out"),)] > 0
    assert samples["wgcni_plaintext_dropped_packets_total"][(("direction", "out"),)] == 0


def test_strict_drops_grow_into_a_warning_naming_the_destination(strict_hook: Hook,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    hook = strict_hook
    mesh(hook)
    status = hook.view.status()["strict"]
    assert status["mode"] == "strict" and status["host"] is True  # strict implies host encryption
    assert hook.firewall.spec is not None and hook.firewall.spec.strict is not None
    assert hook.firewall.spec.strict.enforce
    assert list(hook.firewall.boot_files) == [str(hook.settings.state_dir / "strict.nft")]
    assert hook.firewall.listing is not None and "drop" in hook.firewall.listing
    growing(hook, "dropped", "10.240.0.88")
    code, out, _ = hook.cli("check", capsys=capsys)
    line = next(line for line in out.splitlines() if "strict:" in line)
    assert code == 1 and line.startswith("WARN strict: strict mode keeps dropping plaintext packets")
    assert "10.240.0.88" in line and " -> " in line
    samples = scrape(hook)
    assert samples["wgcni_strict_mode"][()] == 1
    assert samples["wgcni_plaintext_dropped_packets_total"][(("direction", "out"),)] > 0


def test_strict_table_follows_remote_nodes_and_opted_out_nodes_are_exempt(strict_hook: Hook) -> None:
    hook = strict_hook
    mesh(hook)
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}),
               remote("node-c", "C", "10.240.0.66", {"10.240.0.90"}, key=""),  # opted out
               remote("node-d", "D", "192.168.7.4", {"192.168.7.5"}))  # publishes outside the VNet
    hook.settle(lambda: hook.firewall.spec is not None and hook.firewall.spec.strict is not None
                and bool(hook.firewall.spec.strict.exempt))
    strict = hook.firewall.spec.strict  # type: ignore[union-attr]
    assert [str(network) for network in strict.exempt] == ["10.240.0.66/32", "10.240.0.90/32"]
    assert [str(network) for network in strict.published] == ["192.168.7.4/31"]  # aggregated exactly
    assert "10.240.0.90" in hook.firewall.listing and "192.168.7.4/31" in hook.firewall.listing  # type: ignore[operator]
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}))
    hook.settle(lambda: not hook.firewall.spec.strict.exempt)  # type: ignore[union-attr]
    assert "10.240.0.90" not in hook.firewall.listing  # type: ignore[operator]


def test_a_missing_strict_table_is_an_error_in_strict_mode(strict_hook: Hook,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    mesh(strict_hook)
    strict_hook.firewall.counters = lambda: None  # type: ignore[method-assign]
    code, out, _ = strict_hook.cli("check", "--json", capsys=capsys)
    findings = [f for f in json.loads(out)["findings"] if f["check"] == "strict"]
    assert code == 1 and findings[0]["severity"] == "error" and "wgcni-strict is missing" in findings[0]["message"]


def test_add_hold_answers_once_the_api_holds_the_pod_or_at_the_bound(strict_hook: Hook) -> None:
    """strictAddHold: the plugin's pod-added waits for the publication of the pod's IP, never longer than asked."""
    hook = strict_hook
    mesh(hook)
    hook.source.accept_writes = False  # the API holds only what the test reports
    hook.source.report(Publication("written", hook.key.public_key, frozenset({"10.240.0.4", "10.240.0.9"})))

    def add(name: str, ip: str, hold: float) -> float:
        with hook.store.lock():
            hook.store.write({"format": 1, "network": "azure", "containerID": f"c-{name}", "ifname": "eth0",
                              "netns": "/var/run/netns/x", "podNamespace": "shop", "podName": name, "podUID": None,
                              "ips": [ip], "cniVersion": "0.3.0", "prevResult": {}, "created": "x", "updated": "x"})
        started = time.monotonic()
        answer = request(hook.settings.socket, {"op": "pod-added", "network": "azure", "containerID": f"c-{name}",
                                                "ifname": "eth0", "hold": hold})
        assert answer == {"ok": True}
        return time.monotonic() - started

    assert add("late", "10.240.0.10", 0.6) >= 0.6  # the API never lists it: the bound ends the wait
    timer = threading.Timer(0.3, lambda: hook.source.report(Publication(
        "written", hook.key.public_key, frozenset({"10.240.0.4", "10.240.0.9", "10.240.0.10", "10.240.0.11"}))))
    reported_from = time.monotonic()
    timer.start()
    try:
        waited = add("listed", "10.240.0.11", 5.0)
    finally:
        timer.join()
    answered_after = time.monotonic() - reported_from
    assert answered_after >= 0.3 and waited < 4.0, waited  # answered when the API listed it, long before the bound
    answer = request(hook.settings.socket, {"op": "pod-added", "network": "azure", "containerID": "c-x",
                                            "ifname": "eth0", "hold": "long"})
    assert answer["ok"] is False and "'hold' must be 0..30 seconds" in answer["error"]
    assert strict_boot_hold(hook) == "1"


def strict_boot_hold(hook: Hook) -> str:
    """The add-hold line the plugin reads from the boot file (strictAddHold, 1 s by default)."""
    (text,) = hook.firewall.boot_files.values()
    first = text.splitlines()[0]
    assert first.startswith(ADD_HOLD_PREFIX)
    return first[len(ADD_HOLD_PREFIX):]


def test_check_compares_with_a_recent_reading_instead_of_waiting(strict_hook: Hook) -> None:
    """A scraped hook answers `wgcni check` at once: the last reading (older than 1 s) is the earlier sample."""
    hook = strict_hook
    mesh(hook)
    growing(hook, "dropped", "10.240.0.88")
    hook.view.status()  # what a scrape does: one reading
    time.sleep(1.1)
    strict = hook.view.strict_growth()
    assert strict["dropped"]["out"] == 14  # the second reading only: no extra reading a second later
    assert strict["growth"]["dropped"]["out"] == 7 and strict["sampledSeconds"] >= 1.0
