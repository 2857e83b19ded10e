"""Prometheus metrics and the health endpoints of the hook: `/metrics`, `/healthz`, `/readyz` on `metricsAddress`.

Two kinds of metrics:

- **Events**, counted as they happen by `HookMetrics` as the engine's observer (called on the worker thread):
  reconcile passes, their duration, ops by step, errors by applier and step, and the two convergence latencies —
  *record seen → applied locally* (from the plugin's notification or the rescan that found a changed record to the
  end of the pass that programmed it) and *published → applied on this node* (from the remote node's
  `podIPsChangedAt` to the end of the pass that programmed its new pod IPs here; changes published before this hook
  started are the initial sync, not propagation, and are not observed).
- **State**, read at scrape time by a custom collector (one snapshot taken on the worker thread, the only user of
  the appliers' sockets), so nothing has to update thousands of gauges on every change.

Per-peer series. Operators coming from Calico expect one series per peer for the latest handshake and the bytes
each way (Calico's `wireguard_latest_handshake_seconds`, `wireguard_bytes_rcvd`, `wireguard_bytes_sent`). wgcni
exposes exactly those three per peer, labelled only by the peer's node name (`peer`): a key or endpoint label would
churn series on key rotation or node IP change without adding information `wgcni peers` does not already show.
At 5 000 peers that is 15 000 series per node; a scrape of `/metrics?per_peer=0` (Prometheus: `params: {per_peer:
["0"]}`) leaves them out, and the fixed-cardinality aggregates (`wgcni_peer_handshake_age_seconds` as a gauge
histogram, byte totals, peer counts) still show the mesh's health.

Health. `/healthz` is 200 while the worker loop completes passes and the netlink monitor listens. The loop wakes at
least every `recordRescanInterval`, so no pass for `max(STUCK_AFTER_MIN, 6 × recordRescanInterval)` seconds means
it is stuck; a monitor watcher that cannot listen again (node_hook.apply.monitor, `DOWN_GRACE`) means outside
changes go unrepaired: both fail the probe, and the kubelet restarts the hook. `/readyz` is 200
once the dataplane is programmed (every aspect in sync after at least one pass) and the peer source delivered a
complete list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from cni_plugin import __version__
from node_hook.model import PUBLICATION_STATES, RemoteNode
from node_hook.view import MetricsSnapshot, NodeView

log = logging.getLogger(__name__)

STUCK_AFTER_MIN = 120.0  # seconds without a completed pass before /healthz fails (and the kubelet restarts us)
SNAPSHOT_TIMEOUT = 5.0  # a scrape waits at most this long for the worker; state metrics are skipped after that
CONVERGENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PASS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
HANDSHAKE_AGE_BUCKETS = (120.0, 180.0, 600.0, 3600.0, 86400.0)  # 120/180 s: WireGuard's rekey/reject times
APPLIER_OF_STEP = {
    "device": "wireguard", "peer_reshape": "wireguard", "peer_removals": "wireguard", "peer_adds": "wireguard",
    "device_address": "routing", "route_deletes": "routing", "route_sets": "routing", "rules": "routing",
    "firewall": "firewall", "sysctls": "sysctls", "read": "read-back",
}


class HookMetrics:
    """The engine's observer (events) and the registry's state collector (which reads the node's view)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.view: NodeView | None = None
        self.state_collector: _StateCollector | None = None
        self.started_at = time.time()
        self._pending_pods: dict[str, float] = {}  # record key -> monotonic time the change was seen
        self._pending_remote: dict[str, float] = {}  # node -> unix time it published its pod IPs
        self.passes = Counter("wgcni_reconcile_passes", "Reconcile passes run.", registry=self.registry)
        self.pass_seconds = Histogram("wgcni_reconcile_duration_seconds", "Duration of one reconcile pass.",
                                      buckets=PASS_BUCKETS, registry=self.registry)
        self.ops = Counter("wgcni_reconcile_ops", "Dataplane operations applied, by step.", ["step"],
                           registry=self.registry)
        self.errors = Counter("wgcni_reconcile_errors", "Failed reconcile passes, by the applier and step that "
                              "failed (the aspect is read back and retried).", ["applier", "step"],
                              registry=self.registry)
        self.pod_convergence = Histogram(
            "wgcni_pod_convergence_seconds", "From a pod record change seen by the hook (notification or rescan) "
            "to the end of the pass that programmed it.", buckets=CONVERGENCE_BUCKETS, registry=self.registry)
        self.remote_convergence = Histogram(
            "wgcni_remote_convergence_seconds", "From a remote node publishing new pod IPs (podIPsChangedAt) to "
            "the end of the pass that programmed them on this node.", buckets=CONVERGENCE_BUCKETS,
            registry=self.registry)

    def attach(self, view: NodeView) -> None:
        """Start collecting the state of the node behind `view` at scrape time (its engine must have this as its
        observer)."""
        self.view = view
        self.state_collector = _StateCollector(self)
        self.registry.register(self.state_collector)

    def _attached(self) -> NodeView:
        if self.view is None:
            raise RuntimeError("HookMetrics.attach() was not called")
        return self.view

    # ---- observer (worker thread) -----------------------------------------------------------------------

    def pod_seen(self, key: str, seen_at: float) -> None:
        self._pending_pods.setdefault(key, seen_at)

    def remote_node_received(self, old: RemoteNode | None, new: RemoteNode) -> None:
        if old is None:
            if new.pod_ips and new.pod_ips_changed_at > self.started_at:
                self._pending_remote.setdefault(new.name, new.pod_ips_changed_at)
        elif old.pod_ips != new.pod_ips and new.pod_ips_changed_at > old.pod_ips_changed_at:
            self._pending_remote.setdefault(new.name, new.pod_ips_changed_at)

    def pass_done(self, result: Any, seconds: float) -> None:
        self.passes.inc()
        self.pass_seconds.observe(seconds)
        for step, count in result.applied.items():
            self.ops.labels(step).inc(count)
        if result.error is not None:
            step = result.failed_step or "read"
            self.errors.labels(APPLIER_OF_STEP.get(step, step), step).inc()
            return
        now, wall = time.monotonic(), time.time()
        for seen_at in self._pending_pods.values():
            self.pod_convergence.observe(max(0.0, now - seen_at))
        for published_at in self._pending_remote.values():
            self.remote_convergence.observe(max(0.0, wall - published_at))  # clamp: clocks of two nodes
        self._pending_pods.clear()
        self._pending_remote.clear()

    # ---- health (any thread: reads only scalars) --------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        view = self._attached()
        stuck_after = max(STUCK_AFTER_MIN, 6 * view.record_rescan_interval)
        last = view.last_pass_at or self.started_at
        age = time.time() - last
        if age > stuck_after:
            return False, f"no reconcile pass for {age:.0f}s (limit {stuck_after:.0f}s): the worker loop is stuck"
        watching, message = view.monitor_health()
        if not watching:
            return False, f"{message}: outside changes would go unrepaired until the next resync"
        return True, f"ok: last pass {age:.1f}s ago, {message}"

    def readiness(self) -> tuple[bool, str]:
        view = self._attached()
        if not view.peers_complete:
            return False, "waiting for the first complete peer list"
        if view.generation == 0 or not view.converged:
            return False, f"dataplane not programmed yet: {view.last_error or 'reconciling'}"
        publication = view.publication_status()
        if publication["state"] in ("denied", "stale") or (publication["state"] not in ("confirmed", "opted-out")
                                                          and publication["overdue"]):
            return False, f"publication {publication['state']}: {publication['message']}"
        return True, "ok: dataplane programmed, peers synced, publication held by the API"


class _StateCollector(Collector):
    """State metrics, computed from one worker-thread snapshot per scrape."""

    def __init__(self, metrics: HookMetrics) -> None:
        self.metrics = metrics
        self.per_peer = threading.local()  # per request: the HTTP handler sets it from ?per_peer=

    def describe(self) -> Iterable[Metric]:
        return []  # state families depend on the node; never collected at registration

    def collect(self) -> Iterable[Metric]:
        try:
            view = self.metrics._attached()
            snapshot = view.engine.on_worker(view.metrics_snapshot, timeout=SNAPSHOT_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - a scrape must still return the event metrics
            log.warning("metrics: no state snapshot for this scrape: %s", error)
            return
        yield from state_families(snapshot, getattr(self.per_peer, "enabled", True), time.time())


def _strict_families(strict: dict[str, Any]) -> Iterable[Metric]:
    """The strict table's kernel counters (node_hook/apply/firewall.py): one series per direction, out = a local pod
    or the host to a cluster address not through the tunnel, in = a WireGuard node's address to a local pod."""
    yield _gauge("wgcni_strict_mode", "1 when strict mode drops plaintext between WireGuard nodes, 0 when it only "
                 "counts it (permissive, or this node is opted out).", int(strict.get("mode") == "strict"))
    for name, key, documentation in (
            ("wgcni_plaintext_dropped_packets", "dropped", "Packets strict mode dropped because they would have "
             "crossed the VNet unencrypted between WireGuard nodes."),
            ("wgcni_plaintext_packets", "counted", "Packets that crossed the VNet unencrypted between WireGuard "
             "nodes (permissive mode: what strict mode would drop).")):
        family = CounterMetricFamily(name, documentation, labels=["direction"])
        for direction, value in sorted((strict.get(key) or {"in": 0, "out": 0}).items()):
            family.add_metric([direction], value)
        yield family


def _gauge(name: str, documentation: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels) if labels else None)
    family.add_metric(list(labels.values()) if labels else [], value)
    return family


def state_families(snapshot: MetricsSnapshot, per_peer: bool, now: float) -> Iterable[Metric]:
    status = snapshot.status
    yield _gauge("wgcni_info", "This node's wgcni hook (value 1).", 1, {
        "node": status["node"], "backend": status["backend"], "interface": status["interface"],
        "key_fingerprint": status["keyFingerprint"], "version": __version__})
    yield _gauge("wgcni_ready", "1 when the dataplane is programmed and peers are synced (/readyz).",
                 int(status["ready"] and status["peersComplete"]))
    yield _gauge("wgcni_dataplane_programmed", "1 when every dataplane aspect is in sync.",
                 int(status["dataplane_programmed"]))
    yield _gauge("wgcni_peers_synced", "1 once the peer source delivered a complete list.",
                 int(status["peersComplete"]))
    in_sync = GaugeMetricFamily("wgcni_aspect_in_sync", "1 when the aspect matched the desired state at the last "
                                "pass.", labels=["aspect"])
    for aspect, value in sorted(status["inSync"].items()):
        in_sync.add_metric([aspect], int(value))
    yield in_sync
    yield _gauge("wgcni_mtu_bytes", "MTU of the WireGuard device.", status["mtu"])
    yield _gauge("wgcni_peers", "Peers this node wants (remote nodes with a usable key and endpoint).",
                 snapshot.desired_peers)
    yield _gauge("wgcni_device_peers", "Peers on the WireGuard device.", snapshot.device_peers)
    yield _gauge("wgcni_peers_programmed", "Wanted peers whose AllowedIPs on the device are exactly right.",
                 snapshot.programmed_peers)
    yield _gauge("wgcni_remote_nodes", "Remote nodes known from the peer source.", status["counts"]["remoteNodes"])
    yield _gauge("wgcni_allowed_ips", "AllowedIPs prefixes over all wanted peers.", snapshot.allowed_ips)
    routes = GaugeMetricFamily("wgcni_routes", "Routes in the hook's table, by kind (dev = into WireGuard, "
                               "throw = leave the table).", labels=["kind"])
    for kind in ("dev", "throw"):
        routes.add_metric([kind], snapshot.routes_by_kind.get(kind, 0))
    yield routes
    publication = GaugeMetricFamily("wgcni_publication", "1 for the state of this node's publication as the API "
                                    "holds it (confirmed: its key and every local IP; pending, denied, "
                                    "unreachable, stale: traffic the API does not cover leaves in plaintext).",
                                    labels=["state"])
    for state in PUBLICATION_STATES:
        publication.add_metric([state], int(status["publication"]["state"] == state))
    yield publication
    yield _gauge("wgcni_unpublished_local_ips", "Local IPs the API does not list for this node yet (they leave by "
                 "the main table, in plaintext, until it does).", status["publication"]["unpublishedCount"])
    yield _gauge("wgcni_pod_records", "Pod attachments recorded on this node.", status["counts"]["podRecords"])
    yield _gauge("wgcni_pods_without_record", "Local pods learned only from their host routes (no pod record: they "
                 "predate wgcni or started while the conflist lacked its entry).",
                 status["counts"]["podsWithoutRecord"])
    yield _gauge("wgcni_pod_record_errors", "Pod records that cannot be read (never programmed).",
                 len(status["recordErrors"]))
    conflicts = GaugeMetricFamily("wgcni_conflicts", "Problems that keep traffic plaintext or ambiguous, by kind: "
                                  "key-conflict, ip-conflict, no-key, no-endpoint.", labels=["kind"])
    counts: dict[str, int] = {"key-conflict": 0, "ip-conflict": 0, "no-key": 0, "no-endpoint": 0}
    for problem in status["problems"]:
        counts[problem["kind"]] = counts.get(problem["kind"], 0) + 1
    for kind, count in sorted(counts.items()):
        conflicts.add_metric([kind], count)
    yield conflicts
    yield from _strict_families(status.get("strict") or {})
    yield from _sync_families(status.get("sync"))
    yield from _peer_families(snapshot.peers, per_peer, now)


def _sync_families(sync: dict[str, Any] | None) -> Iterable[Metric]:
    if not isinstance(sync, dict):
        return
    for field_name, name, documentation in (
        ("writes", "wgcni_api_writes", "Writes of this node's WireguardNode and Node annotation."),
        ("write_errors", "wgcni_api_write_errors", "Failed writes to the API server (retried with backoff)."),
        ("watch_errors", "wgcni_api_watch_errors", "Failed lists/watches of the API server (retried)."),
        ("relists", "wgcni_api_relists", "Full relists (410 Gone or the periodic safety net)."),
    ):
        if isinstance(sync.get(field_name), int):
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], sync[field_name])
            yield family
    if isinstance(sync.get("invalid_objects"), dict):
        yield _gauge("wgcni_api_invalid_objects", "WireguardNode objects ignored as malformed.",
                     len(sync["invalid_objects"]))
    if isinstance(sync.get("published"), bool):
        yield _gauge("wgcni_published", "1 when this node's latest state is written to the API.",
                     int(sync["published"]))


def _peer_families(peers: list[tuple[str, float, int, int]], per_peer: bool, now: float) -> Iterable[Metric]:
    received = sent = 0
    ages: list[float] = []
    never = 0
    handshake = GaugeMetricFamily("wgcni_peer_latest_handshake_seconds", "Unix time of the latest handshake with "
                                  "the peer (0 = never).", labels=["peer"])
    rx = CounterMetricFamily("wgcni_peer_received_bytes", "Bytes received from the peer.", labels=["peer"])
    tx = CounterMetricFamily("wgcni_peer_sent_bytes", "Bytes sent to the peer.", labels=["peer"])
    for node, latest, received_bytes, sent_bytes in peers:
        received += received_bytes
        sent += sent_bytes
        if latest:
            ages.append(max(0.0, now - latest))
        else:
            never += 1
        if per_peer:
            handshake.add_metric([node], latest)
            rx.add_metric([node], received_bytes)
            tx.add_metric([node], sent_bytes)
    if per_peer:
        yield handshake
        yield rx
        yield tx
    buckets = [(str(bound), sum(age <= bound for age in ages)) for bound in HANDSHAKE_AGE_BUCKETS]
    buckets.append(("+Inf", len(ages)))
    yield GaugeHistogramMetricFamily("wgcni_peer_handshake_age_seconds", "Age of the latest handshake over the "
                                     "peers that had one.", buckets=buckets, gsum_value=sum(ages))
    yield _gauge("wgcni_peers_without_handshake", "Peers that never completed a handshake (idle or unreachable).",
                 never)
    total_rx = CounterMetricFamily("wgcni_received_bytes", "Bytes received over all current peers.")
    total_rx.add_metric([], received)
    yield total_rx
    total_tx = CounterMetricFamily("wgcni_sent_bytes", "Bytes sent over all current peers.")
    total_tx.add_metric([], sent)
    yield total_tx


class MetricsServer:
    """HTTP server for /metrics (prometheus_client's handler), /healthz and /readyz, on its own thread."""

    def __init__(self, address: str, metrics: HookMetrics) -> None:
        self.listen_address = address  # host:port, [v6]:port, or :port for every IPv4 address
        self.metrics = metrics
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 server's address
        return host, port

    def start(self) -> None:
        """Bind and serve; raises ValueError for a malformed address and OSError when it cannot bind."""
        host, _, port = self.listen_address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{port!r} is not a TCP port")
        metrics = self.metrics
        base = MetricsHandler.factory(metrics.registry)

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                if url.path in ("/healthz", "/readyz"):
                    ok, message = metrics.health() if url.path == "/healthz" else metrics.readiness()
                    body = (message + "\n").encode()
                    self.send_response(200 if ok else 503)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif url.path == "/metrics":
                    enabled = parse_qs(url.query).get("per_peer", ["1"])[-1] not in ("0", "false")
                    if metrics.state_collector is not None:
                        metrics.state_collector.per_peer.enabled = enabled
                    super().do_GET()
                else:
                    self.send_error(404, "try /metrics, /healthz or /readyz")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("metrics http: " + format, *args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = _family(host)

        self._server = Server((host, int(port)), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="wgcni-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
