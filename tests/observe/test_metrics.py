"""Metrics scraped over HTTP from a real hook daemon (appliers on fakes), parsed with prometheus_client's parser;
convergence histograms, errors by applier, sync counters, per-peer series on and off, /healthz and /readyz."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_hook import metrics as metrics_module
from node_hook.cluster import SyncStatus
from tests.observe.conftest import Hook, key_of, remote


def get(hook: Hook, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(hook.url + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(hook: Hook, query: str = "") -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}."""
    status, text = get(hook, "/metrics" + query)
    assert status == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_state_metrics_describe_the_node(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}),
               remote("node-c", "C", "10.240.0.66", {"10.240.0.90"}),
               remote("node-d", "D", "10.240.0.67", {"10.240.0.90"}, key=key_of("C")))  # C's key claimed twice
    hook.add_pod("web", ["10.240.0.9"])
    hook.converged()
    device = hook.wg.device
    assert device is not None
    now = time.time()
    device.peers[key_of("B")] = replace(device.peers[key_of("B")], latest_handshake=now - 30, rx_bytes=1000,
                                        tx_bytes=3000)
    samples = scrape(hook)
    assert value(samples, "wgcni_info", node="node-a", backend="fake", interface="wgcni0", version="0.1.0",
                 key_fingerprint=hook.view.status()["keyFingerprint"]) == 1
    assert value(samples, "wgcni_ready") == 1 and value(samples, "wgcni_peers_synced") == 1
    assert value(samples, "wgcni_peers") == 1 and value(samples, "wgcni_device_peers") == 1  # C and D conflict
    assert value(samples, "wgcni_peers_programmed") == 1 and value(samples, "wgcni_remote_nodes") == 3
    assert value(samples, "wgcni_allowed_ips") == 2  # 10.240.0.35/32 and 10.240.0.70/31
    # throw: the local pod, and 10.240.0.90 plus the node IPs of C and D (no usable peer: plaintext)
    assert value(samples, "wgcni_routes", kind="dev") == 2 and value(samples, "wgcni_routes", kind="throw") == 4
    assert value(samples, "wgcni_pod_records") == 1 and value(samples, "wgcni_pod_record_errors") == 0
    assert value(samples, "wgcni_conflicts", kind="key-conflict") == 1
    assert value(samples, "wgcni_conflicts", kind="ip-conflict") == 1
    assert value(samples, "wgcni_mtu_bytes") == 1440
    assert value(samples, "wgcni_aspect_in_sync", aspect="routes") == 1
    assert value(samples, "wgcni_peer_latest_handshake_seconds", peer="node-b") == pytest.approx(now - 30)
    assert value(samples, "wgcni_peer_received_bytes_total", peer="node-b") == 1000
    assert value(samples, "wgcni_peer_sent_bytes_total", peer="node-b") == 3000
    assert value(samples, "wgcni_peer_handshake_age_seconds_bucket", le="120.0") == 1
    assert value(samples, "wgcni_peer_handshake_age_seconds_gcount") == 1
    assert value(samples, "wgcni_peers_without_handshake") == 0
    assert value(samples, "wgcni_received_bytes_total") == 1000 and value(samples, "wgcni_sent_bytes_total") == 3000
    assert value(samples, "wgcni_reconcile_passes_total") >= 1
    assert value(samples, "wgcni_reconcile_ops_total", step="route_sets") >= 1


def test_per_peer_series_can_be_left_out(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70"}))
    hook.converged()
    assert "wgcni_peer_sent_bytes_total" in scrape(hook)
    samples = scrape(hook, "?per_peer=0")
    assert not {"wgcni_peer_latest_handshake_seconds", "wgcni_peer_received_bytes_total",
                "wgcni_peer_sent_bytes_total"} & samples.keys()
    assert value(samples, "wgcni_peers") == 1 and "wgcni_peer_handshake_age_seconds_gcount" in samples


def test_pod_convergence_is_observed_from_notification_to_applied(hook: Hook) -> None:
    before = scrape(hook).get("wgcni_pod_convergence_seconds_count", {}).get((), 0)
    hook.add_pod("web", ["10.240.0.9"])
    hook.converged()
    samples = scrape(hook)
    assert value(samples, "wgcni_pod_convergence_seconds_count") == before + 1
    assert 0 <= value(samples, "wgcni_pod_convergence_seconds_sum") < 5


def test_an_unreadable_record_is_not_counted_as_converged(hook: Hook) -> None:
    hook.add_pod("web", ["10.240.0.9"])
    hook.converged()
    count = value(scrape(hook), "wgcni_pod_convergence_seconds_count")
    (hook.settings.records_dir / "azure" / "c-bad@eth0.json").write_text("{not json")
    hook.engine.pod_changed("azure", "c-bad", "eth0", wait=5)
    hook.converged()
    assert value(scrape(hook), "wgcni_pod_convergence_seconds_count") == count


def test_remote_convergence_is_observed_from_publication_but_not_for_the_initial_sync(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70"}, changed_at=1.0))  # published long ago
    hook.converged()
    assert value(scrape(hook), "wgcni_remote_convergence_seconds_count") == 0
    published = time.time() - 0.5
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.72"}, changed_at=published))
    hook.converged()
    samples = scrape(hook)
    assert value(samples, "wgcni_remote_convergence_seconds_count") == 1
    assert 0.5 <= value(samples, "wgcni_remote_convergence_seconds_sum") < 5
    assert value(samples, "wgcni_remote_convergence_seconds_bucket", le="0.25") == 0


def test_reconcile_errors_are_counted_by_applier_and_step(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70"}))
    hook.converged()
    hook.routing.fail_next.add("apply")
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}))
    hook.settle(lambda: hook.engine.reconciler.errors >= 1)
    hook.converged()
    samples = scrape(hook)
    assert value(samples, "wgcni_reconcile_errors_total", applier="routing", step="route_sets") == 1


def test_sync_counters_come_from_the_peer_source_status(hook: Hook) -> None:
    hook.source.status = SyncStatus(peers_synced=True, node_synced=True, writes=7, write_errors=2, watch_errors=3,
                                    relists=1, published=False, invalid_objects={"node-z": "bad key"})
    samples = scrape(hook)
    assert value(samples, "wgcni_api_writes_total") == 7 and value(samples, "wgcni_api_write_errors_total") == 2
    assert value(samples, "wgcni_api_watch_errors_total") == 3 and value(samples, "wgcni_api_relists_total") == 1
    assert value(samples, "wgcni_api_invalid_objects") == 1 and value(samples, "wgcni_published") == 0


def test_readyz_follows_the_peer_list_and_the_dataplane(hook: Hook) -> None:
    hook.settle(lambda: hook.engine.generation > 0)
    status, body = get(hook, "/readyz")
    assert status == 503 and body == "waiting for the first complete peer list\n"
    assert get(hook, "/healthz")[0] == 200
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70"}))
    hook.converged()
    assert get(hook, "/readyz") == (200, "ok: dataplane programmed, peers synced, publication held by the API\n")
    del hook.sysctls.values["net/ipv4/conf/all/src_valid_mark"]  # every sysctl write now fails
    hook.engine.trigger_resync()
    hook.settle(lambda: hook.engine.last_error is not None)
    status, body = get(hook, "/readyz")
    assert status == 503 and body.startswith("dataplane not programmed yet: sysctls: sysctl")
    assert value(scrape(hook), "wgcni_ready") == 0
    assert get(hook, "/healthz")[0] == 200  # failing passes are passes: the loop is alive
    assert get(hook, "/nope")[0] == 404


def test_healthz_fails_when_the_loop_stops(hook: Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "STUCK_AFTER_MIN", 0.3)
    hook.settle(lambda: hook.engine.generation > 0)
    assert get(hook, "/healthz")[0] == 200
    hook.node.stop()  # the worker loop ends; the HTTP server keeps answering
    time.sleep(0.3 + 6 * hook.settings.record_rescan_interval)
    status, body = get(hook, "/healthz")
    assert status == 503 and "the worker loop is stuck" in body


class _Monitor:
    """A netlink monitor whose watchers cannot listen (the real one: tests/netns/test_monitor.py)."""

    def health(self) -> tuple[bool, str]:
        return False, "netlink monitor rtnetlink: not listening for 20s (7 restarts; OSError: [Errno 24])"

    def describe(self) -> dict[str, dict[str, object]]:
        return {"rtnetlink": {"listening": False}}


def test_healthz_fails_when_the_monitor_cannot_listen(hook: Hook) -> None:
    hook.settle(lambda: hook.engine.generation > 0)
    assert get(hook, "/healthz")[0] == 200
    hook.view.monitor = _Monitor()
    status, body = get(hook, "/healthz")
    assert status == 503 and body.startswith("netlink monitor rtnetlink: not listening for 20s")
    assert hook.view.status()["monitor"] == {"rtnetlink": {"listening": False}}
