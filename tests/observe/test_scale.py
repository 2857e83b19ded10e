"""5 000 peers: the hook's answers and the CLI's output stay bounded (a page plus a summary), and one scrape
carries exactly three series per peer. Timing belongs to bench/; these tests check sizes."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest

from node_hook.local_api import request
from tests.observe.conftest import Hook, remote
from tests.observe.test_metrics import scrape, value

PEERS = 5000
PODS_PER_NODE = 4


def node_key(index: int) -> str:
    return f"{index:042d}A="[:43] + "="


@pytest.fixture(scope="module")
def big_hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hook]:
    monkeypatch = pytest.MonkeyPatch()
    hook = Hook(tmp_path_factory.mktemp("scale"), monkeypatch)
    hook.node.start()
    hook.api.start()
    hook.http.start()
    try:
        base = int(ipaddress.ip_address("10.0.0.0"))
        nodes = []
        for index in range(PEERS):
            node_ip = str(ipaddress.ip_address(base + (1 << 20) + index))
            pods = {str(ipaddress.ip_address(base + index * 8 + pod)) for pod in range(PODS_PER_NODE)}
            nodes.append(remote(f"node-{index:04d}", "", node_ip, pods, key=node_key(index)))
        hook.nodes(*nodes)
        hook.settle(lambda: len(hook.engine.model.peers) == PEERS and hook.engine.reconciler.converged, timeout=120)
        yield hook
    finally:
        hook.http.stop()
        hook.api.stop()
        hook.node.stop()
        monkeypatch.undo()


def test_the_hook_answers_a_page_and_a_summary(big_hook: Hook) -> None:
    answer = request(big_hook.settings.socket, {"op": "peers", "limit": 50})
    assert answer["total"] == PEERS and len(answer["peers"]) == 50 and answer["summary"]["programmed"] == PEERS
    assert [peer["node"] for peer in answer["peers"]] == [f"node-{index:04d}" for index in range(50)]
    assert len(json.dumps(answer)) < 64 * 1024
    routes = request(big_hook.settings.socket, {"op": "routes", "limit": 20, "after": "node-0100"})
    assert routes["total"] == PEERS * PODS_PER_NODE and len(routes["routes"]) == 20  # 5 whole groups of 4
    assert routes["routes"][0]["owner"] == "node-0101" and routes["next"] == "node-0105"
    assert routes["byKind"] == {"dev": PEERS * PODS_PER_NODE}


def test_the_cli_output_is_bounded(big_hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = big_hook.cli("peers", capsys=capsys)
    assert code == 0 and out.count("\npeer: ") == 50
    assert len(out.splitlines()) <= 1 + 50 * 8 + 1
    assert out.rstrip().endswith(f"... {PEERS - 50} more peers: --offset 50, or --all")
    code, out, _ = big_hook.cli("routes", "--limit", "10", capsys=capsys)
    assert code == 0 and len(out.splitlines()) == 1 + 1 + 12 + 1  # whole groups of 4
    code, out, _ = big_hook.cli("routes", "--all", "--json", capsys=capsys)  # several pages of whole groups
    listed = json.loads(out)["routes"]
    assert len(listed) == PEERS * PODS_PER_NODE == len({route["prefix"] for route in listed})
    code, out, _ = big_hook.cli("peers", "--all", "--json", capsys=capsys)
    assert [peer["node"] for peer in json.loads(out)["peers"]] == [f"node-{index:04d}" for index in range(PEERS)]
    code, out, _ = big_hook.cli("peers", "--node", "node-4999", "--json", capsys=capsys)
    assert [peer["node"] for peer in json.loads(out)["peers"]] == ["node-4999"]
    code, out, _ = big_hook.cli("check", capsys=capsys)
    assert code == 0, out


def test_one_scrape_has_three_series_per_peer_and_can_leave_them_out(big_hook: Hook) -> None:
    samples = scrape(big_hook)
    per_peer = [name for name in samples if name.startswith("wgcni_peer_") and "handshake_age" not in name]
    assert sorted(per_peer) == ["wgcni_peer_latest_handshake_seconds", "wgcni_peer_received_bytes_total",
                                "wgcni_peer_sent_bytes_total"]
    assert all(len(samples[name]) == PEERS for name in per_peer)
    assert value(samples, "wgcni_peers") == PEERS
    compact = scrape(big_hook, "?per_peer=false")
    assert sum(len(series) for series in compact.values()) < 200
