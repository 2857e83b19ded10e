"""The event-driven reconciler daemon: sources -> model -> reconciler, on one worker thread.

Only the worker thread touches the model and the appliers' write paths. Other threads (local API, peer source,
netlink monitor, wireguard-go watcher) enqueue events and wake it:
- a pod notification re-reads that one record and applies at once (the caller waits up to a bound for the pass);
- the records directory is rescanned every `recordRescanInterval` (the record, not the notification, is the truth);
- local pods are also learned from the main table's pod host routes (node_hook.pod_routes): a pod without a record
  (it predates wgcni, or started while the conflist lacked the wgcni entry) is local and published all the same;
  netlink says when such a route or a pod interface comes or goes, and the routes are re-read with every rescan;
- netlink says our device or its address, a rule pointing at our table, or a route we want in it was removed, or wireguard-go
  exited -> that aspect is marked out of sync and repaired in the next pass (well within 2 s), with the same key;
- every `resyncInterval` every aspect is read back in full and diffed;
- a failed pass is retried after a short backoff (max 1 s) and reads back what failed.
After each pass the local announcement (key, endpoint, node IPs, local pod IPs, MTU, readiness) is published to
the peer source, which coalesces. The source reports back what the API holds of it (`Publication`), and the rules
follow that (`planner.publication_gate`): a node trusts its own publication only once it sees it in the API, so a
node whose writes are refused or lost is never a black hole - its traffic stays in the main table (plaintext)
instead of entering a tunnel no peer can take, and each new local IP leaves by the main table until it is listed.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import heapq
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from node_hook.addresses import IPNetwork, address_of, address_texts, host_keys, host_prefix
from node_hook.config import Settings
from node_hook.contracts import DeviceSpec, FirewallSpec, WireGuardBackend
from node_hook.detect import Environment, kernel_wireguard_available
from node_hook.install import DEFAULT_CONF_DIR as DEFAULT_CNI_CONF_DIR
from node_hook.keys import NodeKey
from node_hook.model import (
    LOCAL,
    UNKNOWN_PUBLICATION,
    LocalAnnouncement,
    NodeModel,
    Publication,
    RemoteNode,
    RouteKind,
)
from node_hook.planner import desired_rules, publication_gate
from node_hook.pod_routes import MAIN_TABLE, PodRouteSource, is_pod_interface
from node_hook.reconciler import Reconciler, Targets

log = logging.getLogger(__name__)

FIREWALL_TABLE = "wgcni"
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
WORKER_REQUEST_TIMEOUT = 10.0  # a read-back asked of the worker (diagnose) waits at most this for a busy pass
RECENT_HANDSHAKE_SECONDS = 180.0  # WireGuard's REJECT_AFTER_TIME: an older session can no longer carry data
PUBLICATION_GRACE_SECONDS = 10.0  # a write on its way for less than this is normal (writes are rate limited)
UNPUBLISHED_LISTED = 20  # status lists at most this many local IPs the API does not hold yet


def record_key(network: str, container_id: str, ifname: str) -> str:
    return f"{network}/{container_id}@{ifname}"


ROUTE_KEY_PREFIX = "route:"  # model keys of the pods learned from host routes: "route:<host interface>"


def route_key(interface: str) -> str:
    return f"{ROUTE_KEY_PREFIX}{interface}"


def host_encryption_enabled(settings: Settings, environment: Environment) -> bool:
    return environment.azure if settings.host_encryption == "auto" else settings.host_encryption == "true"


def desired_sysctls(settings: Settings) -> dict[str, str]:
    return {
        # the fwmark set in PREROUTING counts in the reverse-path lookup (plaintext from the underlay passes)
        "net/ipv4/conf/all/src_valid_mark": "1",
        # loose reverse-path check on the tunnel: WireGuard already checks every inner source against AllowedIPs
        f"net/ipv4/conf/{settings.interface}/rp_filter": "2",
    }


def key_fingerprint(public_key: str) -> str:
    return hashlib.sha256(base64.b64decode(public_key)).hexdigest()[:16]


@dataclass
class _Appliers:
    wireguard: WireGuardBackend
    routing: Any
    firewall: Any
    sysctls: Any


def real_wireguard_backend(settings: Settings, on_exit: Callable[[int], None]) -> WireGuardBackend:
    """The backend the settings ask for; `auto` = kernel when the WireGuard module is available."""
    backend = settings.backend
    if backend == "auto":
        backend = "kernel" if kernel_wireguard_available() else "userspace"
    if backend == "kernel":
        from node_hook.apply.wg_kernel import KernelWireGuard  # imported only when chosen

        return KernelWireGuard(settings.interface)
    from node_hook.apply.wg_uapi import UserspaceWireGuard

    return UserspaceWireGuard(settings.interface, settings.wireguard_go, on_exit=on_exit,
                              log_file=settings.state_dir / f"wireguard-go-{settings.interface}.log")


class Daemon:
    def __init__(
        self,
        settings: Settings,
        key: NodeKey,
        environment: Environment,
        peer_source: Any,
        appliers: _Appliers | None = None,
        record_store: Any = None,
        monitor_netlink: bool = True,
        clock: Callable[[], float] = time.monotonic,
        observer: Any = None,
        cni_conf_dir: Path = DEFAULT_CNI_CONF_DIR,
        pod_routes: PodRouteSource | None = None,
    ) -> None:
        self.settings = settings
        self.key = key
        self.environment = environment
        self.peer_source = peer_source
        self.clock = clock
        self.observer = observer  # node_hook.metrics.HookMetrics: told, on the worker, what was seen and applied
        self.cni_conf_dir = cni_conf_dir  # where `diagnose` looks for the conflist's wgcni entry
        self.host_encryption = host_encryption_enabled(settings, environment)
        self.model = NodeModel(settings.node_name, environment.node_ips, self.host_encryption,
                               settings.persistent_keepalive, local_public_key=key.public_key)
        if appliers is None:
            from node_hook.apply.firewall import NftFirewall
            from node_hook.apply.routes import PyrouteRouting
            from node_hook.apply.sysctl import Sysctls

            appliers = _Appliers(
                real_wireguard_backend(settings, self._wireguard_exited),
                PyrouteRouting(settings.route_table, settings.interface, settings.bypass_rule_priority),
                NftFirewall(FIREWALL_TABLE),
                Sysctls(settings.sysctl_originals_file),
            )
        self.appliers = appliers
        targets = Targets(
            DeviceSpec(settings.interface, key.private, key.public_key, settings.listen_port, settings.fwmark,
                       environment.mtu),
            desired_rules(settings.rule_priority, settings.fwmark, settings.route_table),
            FirewallSpec(FIREWALL_TABLE, settings.fwmark, settings.interface, settings.pod_interface_prefixes,
                         settings.listen_port),
            desired_sysctls(settings),
        )
        self.reconciler = Reconciler(self.model, targets, appliers.wireguard, appliers.routing,
                                     appliers.firewall, appliers.sysctls)
        if record_store is None:
            from cni_plugin.records import RecordStore

            record_store = RecordStore(str(settings.state_dir))
        self.records = record_store
        if pod_routes is None:
            from node_hook.pod_routes import KernelPodRoutes

            pod_routes = KernelPodRoutes(settings.pod_interface_prefixes)
        self.pod_routes = pod_routes
        self.route_pods: dict[str, frozenset[str]] = {}  # host interface -> pod IPs, from the main table
        self._pod_routes_pending = False
        self.monitor_netlink = monitor_netlink
        self._lock = threading.Lock()
        # Held by the worker while it changes the model (events, rescans) and by other threads while they read
        # more than one value of it (status): a consistent view, and no "dict changed size during iteration".
        self._model_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._events: list[Callable[[], None]] = []
        self._out_of_sync: set[str] = set()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self.generation = 0  # passes completed
        self.last_error: str | None = None
        self.record_errors: list[str] = []
        self.peers_complete = False
        self.last_pass_at = 0.0
        self._retry_index = 0
        self._last_announcement: LocalAnnouncement | None = None
        self.records_meta: dict[str, dict[str, Any]] = {}
        self.publication: Publication = UNKNOWN_PUBLICATION  # what the API holds of this node (peer source)
        self._unpublished_since: float | None = None  # monotonic time the publication stopped covering this node

    @property
    def targets(self) -> Targets:
        """The desired state that does not come from the model (the rules follow the publication)."""
        return self.reconciler.targets

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._rescan_pod_routes()
        self._rescan_records()
        self._worker = threading.Thread(target=self._run, name="wgcni-reconcile", daemon=True)
        self._worker.start()
        if self.monitor_netlink:
            self._monitor = threading.Thread(target=self._watch_netlink, name="wgcni-netlink", daemon=True)
            self._monitor.start()
        self.peer_source.start(self.on_nodes, on_published=self.on_published)

    def stop(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        self.peer_source.stop()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.appliers.wireguard.close()
        self.pod_routes.close()

    # ---- events (any thread) ----------------------------------------------------------------------------

    def _enqueue(self, event: Callable[[], None] | None = None, out_of_sync: tuple[str, ...] = ()) -> int:
        with self._wake:
            if event is not None:
                self._events.append(event)
            self._out_of_sync.update(out_of_sync)
            self._wake.notify_all()
            return self.generation + 1

    def wait_for_pass(self, after_generation: int, timeout: float) -> bool:
        deadline = self.clock() + timeout
        with self._wake:
            while self.generation < after_generation:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def pod_changed(self, network: str, container_id: str, ifname: str, wait: float = 0.15) -> None:
        """A notification from the plugin: re-read that record now and answer once it is applied (at most `wait`
        seconds), so a reused IP is local before the pod's first packet (docs/design.md, local API)."""
        seen_at = time.monotonic()
        generation = self._enqueue(lambda: self._load_record(network, container_id, ifname, seen_at))
        self.wait_for_pass(generation, wait)

    def on_nodes(self, nodes: dict[str, RemoteNode], complete: bool) -> None:
        """From the peer source. Peers are pruned only once a complete list has been seen."""
        def apply() -> None:
            if self.observer is not None:
                # Only the nodes that are new objects: the peer source hands over the whole list on every event
                # and re-delivers unchanged nodes as the same objects; comparing all their pod IP sets cost 42 ms
                # per event at 5 000 x 250.
                previous = self.model.remote_nodes
                changed = {name: node for name, node in nodes.items() if previous.get(name) is not node}
                self.observer.remote_nodes_received(previous, changed)
            if complete:
                self.peers_complete = True
                self.model.replace_remote_nodes(nodes)
            else:
                self.model.update_remote_nodes(nodes)
        self._enqueue(apply)

    def on_published(self, publication: Publication) -> None:
        """From the peer source (any thread): what the API now holds of this node's publication."""
        def apply() -> None:
            self.publication = publication
        self._enqueue(apply)

    def pod_routes_changed(self) -> None:
        """A main-table host route or a pod interface came or went (netlink thread): re-read the pod routes once,
        however many such changes arrive before the worker gets to it."""
        with self._wake:
            if self._pod_routes_pending:
                return
            self._pod_routes_pending = True
        self._enqueue(self._rescan_pod_routes)

    def _wireguard_exited(self, code: int) -> None:
        self._enqueue(out_of_sync=("device",))

    def trigger_resync(self) -> int:
        return self._enqueue(out_of_sync=("firewall", "device", "sysctls", "peers", "routes", "rules"))

    # ---- worker -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        now = self.clock()
        next_rescan = now + self.settings.record_rescan_interval
        next_resync = now + self.settings.resync_interval
        retry_at: float | None = now
        while not self._stopping.is_set():
            with self._wake:
                while not self._events and not self._out_of_sync and not self._stopping.is_set():
                    deadline = min(next_rescan, next_resync, retry_at if retry_at is not None else next_resync)
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                events, self._events = self._events, []
                out_of_sync, self._out_of_sync = self._out_of_sync, set()
            if self._stopping.is_set():
                return
            now = self.clock()
            with self._model_lock:
                for event in events:
                    try:
                        event()
                    except Exception as error:  # noqa: BLE001 - a bad record or peer list must not stop the loop
                        log.error("%s", error)
                if now >= next_rescan:
                    self._rescan_pod_routes()
                    self._rescan_records()
                    next_rescan = now + self.settings.record_rescan_interval
            if now >= next_resync:
                out_of_sync.update(("firewall", "device", "sysctls", "peers", "routes", "rules"))
                next_resync = now + self.settings.resync_interval
            if out_of_sync:
                self.reconciler.mark_out_of_sync(*sorted(out_of_sync))
            self.reconciler.prune = self.peers_complete
            with self._model_lock:
                self._gate_rules()
            started = time.monotonic()
            result = self.reconciler.reconcile()
            if self.observer is not None:
                self.observer.pass_done(result, time.monotonic() - started)
            if result.error is None:
                retry_at = None
                self._retry_index = 0
                if result.applied:
                    log.info("applied %s", ", ".join(f"{k}={v}" for k, v in result.applied.items()))
            else:
                retry_at = self.clock() + RETRY_DELAYS[min(self._retry_index, len(RETRY_DELAYS) - 1)]
                self._retry_index += 1
            with self._wake:
                self.last_error = result.error
                self.last_pass_at = time.time()
                self.generation += 1
                self._wake.notify_all()
            self._publish()

    def _local_ips(self) -> frozenset[str]:
        return frozenset(str(address_of(key)) for key in self.model.local_pod_ips) | self.environment.node_ips

    def _gate_rules(self) -> None:
        """Worker thread, before a pass: the rules as the publication allows them (planner.publication_gate)."""
        tunnel, bypass = publication_gate(self.publication, self.key.public_key, self._local_ips())
        settings = self.settings
        self.reconciler.set_rules(desired_rules(settings.rule_priority, settings.fwmark, settings.route_table,
                                                tunnel, bypass))
        covered = tunnel and not bypass
        if covered or self.publication.state == "unknown":
            self._unpublished_since = None
        elif self._unpublished_since is None:
            self._unpublished_since = self.clock()

    def publication_status(self) -> dict[str, Any]:
        """Whether the API holds this node's publication - its key and every local IP - and if not, why:
        `state` is confirmed | unknown | opted-out | pending | denied | unreachable | stale; `overdue` once it has
        not been confirmed for PUBLICATION_GRACE_SECONDS."""
        with self._model_lock:
            publication, local = self.publication, self._local_ips()
            since = self._unpublished_since
        tunnel, bypass = publication_gate(publication, self.key.public_key, local)
        held_key = publication.public_key
        if publication.state == "unknown":
            state, message = "unknown", "waiting for the API's copy of this node's WireguardNode"
        elif publication.state == "opted-out":
            state, message = "opted-out", "WireGuard is disabled on this node by its label wgcni.io/wireguard"
        elif tunnel and not bypass:
            state, message = "confirmed", "the API holds this node's key and every local IP"
        elif publication.state in ("denied", "unreachable"):
            state, message = publication.state, publication.reason
        elif held_key and held_key != self.key.public_key:
            state, message = "stale", "the API holds another public key for this node (an old disk or a cloned one)"
        else:
            state, message = "pending", "the latest publication is on its way to the API"
        if state not in ("confirmed", "unknown", "opted-out"):
            scope = "all its traffic" if not tunnel else f"{len(bypass)} local IP(s)"
            message += f"; until the API holds it, {scope} leave(s) in plaintext (peers could not take it encrypted)"
        age = 0.0 if since is None else max(0.0, self.clock() - since)
        return {"state": state, "message": message, "tunnel": tunnel, "keyPublished": held_key == self.key.public_key,
                "unpublished": sorted(bypass)[:UNPUBLISHED_LISTED], "unpublishedCount": len(bypass),
                "unpublishedSeconds": round(age, 1), "overdue": age >= PUBLICATION_GRACE_SECONDS}

    def _load_record(self, network: str, container_id: str, ifname: str, seen_at: float) -> None:
        from cni_plugin.records import RecordError

        key = record_key(network, container_id, ifname)
        try:
            record = self.records.read(network, container_id, ifname)
        except RecordError as error:
            log.error("pod record %s: %s (ignored until it is valid)", key, error)
            return
        if record is None:
            self.model.remove_local_pod(key)
            self.records_meta.pop(key, None)
        else:
            self.model.set_local_pod(key, record["ips"])
            self.records_meta[key] = _record_meta(record)
        if self.observer is not None:  # a change the next successful pass applies
            self.observer.pod_seen(key, seen_at)

    def _rescan_records(self) -> None:
        errors: list[str] = []
        records = self.records.list(errors=errors)
        local: dict[str, Iterable[str | IPNetwork]] = {}
        meta: dict[str, dict[str, Any]] = {}
        for record in records:
            key = record_key(record["network"], record["containerID"], record["ifname"])
            try:
                local[key] = host_keys(record["ips"], key)  # the one parse: the model and the publication share these
            except ValueError:
                errors.append(f"{key}: invalid IP in {record['ips']!r}")
                continue
            meta[key] = _record_meta(record)
        for error in errors:
            if error not in self.record_errors:
                log.error("pod record %s", error)
        if self.observer is not None:
            seen_at = time.monotonic()
            for key in meta.keys() ^ self.records_meta.keys():
                self.observer.pod_seen(key, seen_at)
            for key in meta.keys() & self.records_meta.keys():
                if meta[key]["ips"] != self.records_meta[key]["ips"]:
                    self.observer.pod_seen(key, seen_at)
        self.record_errors = errors
        local.update((route_key(interface), sorted(ips)) for interface, ips in self.route_pods.items())
        self.model.replace_local_pods(local)
        self.records_meta = meta

    def _rescan_pod_routes(self) -> None:
        """Worker thread: take the pod host routes of the main table as local pods (keyed by interface)."""
        with self._wake:
            self._pod_routes_pending = False
        try:
            found = self.pod_routes.read()
        except Exception as error:  # noqa: BLE001 - keep what was learned; the next rescan reads again
            log.error("reading the pod routes of the main table: %s", error)
            return
        seen_at = time.monotonic()
        for interface in self.route_pods.keys() - found.keys():
            self.model.remove_local_pod(route_key(interface))
            if self.observer is not None:
                self.observer.pod_seen(route_key(interface), seen_at)
        for interface, ips in found.items():
            if self.route_pods.get(interface) != ips:
                self.model.set_local_pod(route_key(interface), sorted(ips))
                if self.observer is not None:
                    self.observer.pod_seen(route_key(interface), seen_at)
        self.route_pods = found

    def _publish(self) -> None:
        announcement = LocalAnnouncement(
            name=self.settings.node_name,
            public_key=self.key.public_key,
            endpoint_ip=self.environment.endpoint,
            endpoint_port=self.settings.listen_port,
            node_ips=self.environment.node_ips,
            pod_ips=self.model.local_pod_ips,
            mtu=self.environment.mtu,
            ready=self.reconciler.converged,
            message=self.last_error or "dataplane programmed",
        )
        if announcement != self._last_announcement:
            self._last_announcement = announcement
            try:
                self.peer_source.publish(announcement)
            except Exception as error:  # noqa: BLE001 - the source retries; never stop the worker
                log.error("publishing this node's state: %s", error)

    # ---- netlink monitor --------------------------------------------------------------------------------

    def _watch_netlink(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_IFADDR,
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV4_RULE,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_IPV6_RULE,
            RTMGRP_LINK,
        )

        table = self.settings.route_table
        pod_prefixes = self.settings.pod_interface_prefixes
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
                     | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
            wireguard_index = (ipr.link_lookup(ifname=self.settings.interface) or [None])[0]
            while not self._stopping.is_set():
                for message in ipr.get():
                    event = message["event"]
                    if event in ("RTM_DELLINK", "RTM_NEWLINK") and message.get("ifname") == self.settings.interface:
                        wireguard_index = message["index"]
                        if event == "RTM_DELLINK" or not message["flags"] & 1:
                            self._enqueue(out_of_sync=("device",))
                    elif event == "RTM_DELADDR" and message["index"] == wireguard_index:
                        self._enqueue(out_of_sync=("routes",))
                    elif event == "RTM_DELRULE" and message.get("table") == table:
                        self._enqueue(out_of_sync=("rules",))
                    elif event == "RTM_DELROUTE" and message.get("table") == table:
                        prefix = ipaddress.ip_network(f"{message.get('dst')}/{message['dst_len']}", strict=False)
                        self._enqueue(lambda prefix=prefix: self._route_removed(prefix))
                    elif event in ("RTM_NEWROUTE", "RTM_DELROUTE") and message.get("table") == MAIN_TABLE:
                        if message["dst_len"] in (32, 128):
                            self.pod_routes_changed()
                    elif event == "RTM_DELLINK" and is_pod_interface(message.get("ifname"), pod_prefixes):
                        self.pod_routes_changed()  # IPv4 removes a deleted link's routes without RTM_DELROUTE

    def _route_removed(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        """Worker thread: a route left our table; repair it if we still want it (our own deletes are not)."""
        if prefix in self.model.routes:
            self.reconciler.mark_out_of_sync("routes")

    # ---- queries (any thread; read-only snapshots) ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        converged = self.reconciler.converged
        with self._model_lock:
            problems = self.model.problems()
            local_pods = self.pods()
            counts = {
                "peers": len(self.model.peers),
                "remoteNodes": len(self.model.remote_nodes),
                "localPods": len(local_pods),
                "podRecords": len(self.records_meta),
                "podsWithoutRecord": sum(1 for pod in local_pods if pod["sources"] == ["route"]),
                "routes": len(self.model.routes),
            }
        source_error = getattr(self.peer_source, "error", None)
        if self.last_error:
            message = f"reconcile error (retrying): {self.last_error}"
        elif not self.peers_complete:
            message = "waiting for the first complete peer list"
        elif problems:
            message = f"dataplane programmed; {len(problems)} problem(s): {problems[0].message}"
        else:
            message = "dataplane programmed"
        sync_status = getattr(self.peer_source, "status", None)
        return {
            "ready": converged and self.generation > 0,
            "dataplane_programmed": converged,
            "message": message,
            "node": self.settings.node_name,
            "publicKey": self.key.public_key,
            "keyFingerprint": key_fingerprint(self.key.public_key),
            "backend": self.appliers.wireguard.kind,
            "interface": self.settings.interface,
            "listenPort": self.settings.listen_port,
            "endpoint": self.environment.endpoint,
            "nodeIPs": sorted(self.environment.node_ips),
            "mtu": self.environment.mtu,
            "mtuReason": self.environment.mtu_reason,
            "underlayInterface": self.environment.underlay_interface,
            "azure": self.environment.azure,
            "azureReason": self.environment.azure_reason,
            "hostEncryption": self.host_encryption,
            "fwmark": f"{self.settings.fwmark:#x}",
            "routeTable": self.settings.route_table,
            "rulePriority": self.settings.rule_priority,
            "inSync": dict(self.reconciler.in_sync),
            "peersComplete": self.peers_complete,
            "peerSourceError": source_error,
            "publication": self.publication_status(),
            "sync": _plain(sync_status),
            "counts": counts,
            "problems": [{"kind": p.kind, "subject": p.subject, "message": p.message} for p in problems],
            "recordErrors": list(self.record_errors),
            "lastError": self.last_error,
            "passes": self.reconciler.passes,
            "errors": self.reconciler.errors,
            "generation": self.generation,
        }

    def check(self, ips: list[str]) -> dict[str, Any]:
        """Are these local pod IPs programmed (local, throw route, in no peer) and is everything in sync?"""
        missing: list[str] = []
        with self._model_lock:  # asked from the API thread while the worker applies events
            for text in ips:
                try:
                    ip = ipaddress.ip_address(text)
                except ValueError:
                    missing.append(text)
                    continue
                if self.model.owner_of(ip) != LOCAL or self.model.routes.get(host_prefix(ip)) is not RouteKind.THROW:
                    missing.append(text)
        programmed = not missing and self.reconciler.converged
        if missing:
            message = f"not programmed yet: {', '.join(missing)}"
        elif not self.reconciler.converged:
            message = f"dataplane not in sync: {self.last_error or 'reconciling'}"
        else:
            message = "programmed"
        return {"programmed": programmed, "missing": missing, "message": message}

    def peers(self, offset: int = 0, limit: int | None = None, node: str | None = None) -> dict[str, Any]:
        """Peers sorted by node name, `limit` of them from `offset` (all without a limit), and a summary of all.

        Only the returned page is rendered (AllowedIPs, pod IPs): at 5 000 peers the answer stays small and fast.
        """
        device = self.appliers.wireguard.read()
        live = device.peers if device is not None else {}
        desired = self.model.peers
        selected = [peer for peer in desired.values() if node is None or peer.node == node]
        end = None if limit is None else offset + limit
        page = (sorted(selected, key=lambda peer: peer.node)[offset:end] if end is None
                else heapq.nsmallest(end, selected, key=lambda peer: peer.node)[offset:])
        remote = self.model.remote_nodes
        now = time.time()
        out = []
        for peer in page:
            state = live.get(peer.public_key)
            node_info = remote.get(peer.node)
            out.append({
                "node": peer.node,
                "publicKey": peer.public_key,
                "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}",
                "allowedIPs": sorted(str(p) for p in peer.allowed_ips),
                "programmed": state is not None and state.allowed_ips == peer.allowed_ips,
                "latestHandshake": state.latest_handshake if state else 0.0,
                "rxBytes": state.rx_bytes if state else 0,
                "txBytes": state.tx_bytes if state else 0,
                "persistentKeepalive": peer.persistent_keepalive,
                "podIPs": address_texts(node_info.pod_ips) if node_info else [],
                "nodeIPs": address_texts(node_info.node_ips) if node_info else [],
            })
        programmed = recent = never = 0
        for key, peer in desired.items():
            state = live.get(key)
            if state is None:
                continue
            programmed += state.allowed_ips == peer.allowed_ips
            never += state.latest_handshake == 0
            recent += 0 < now - state.latest_handshake <= RECENT_HANDSHAKE_SECONDS
        summary = {"peers": len(desired), "programmed": programmed, "handshakeRecent": recent,
                   "handshakeNever": never, "devicePeers": len(live)}
        return {"peers": out, "total": len(selected), "offset": offset, "summary": summary}

    def routes(self, limit: int | None = None, owner: str | None = None, after: str | None = None) -> dict[str, Any]:
        """Routes in the table grouped by owner — this node's pods first (owner `local`, with namespace/name from
        their records), then each remote node by name — and by address within a group. A page holds whole groups
        until it has at least `limit` routes; `next` is the owner to pass as `after` for the next page (None at the
        end). `owner` (a node name or `local`) selects one group.

        Keyset pages: a page costs a sort of the node names plus its own routes, never a walk over the routes
        before it, so listing all 150 000 routes of 5 000 nodes x 30 pods (or 1.25 M at 250) page by page stays
        linear in routes. A page sorted by address took 645 ms at 150 000 routes; a page of groups 31 ms (P8).
        """
        by_kind = {kind.value: count for kind, count in self.model.route_counts().items() if count}  # O(nodes)
        remote = self.model.remote_nodes
        names = sorted(remote)
        groups: list[str]
        if owner is not None:
            groups = [LOCAL] if owner == "local" else [owner] if owner in remote else []
        elif after is None:
            groups = [LOCAL, *names]
        else:
            groups = names if after == "local" else names[bisect.bisect_right(names, after):]
        pod_of_ip = {ip: f"{meta.get('podNamespace') or '-'}/{meta.get('podName') or meta.get('containerID')}"
                     for meta in self.records_meta.values() for ip in meta.get("ips") or ()}
        out: list[dict[str, Any]] = []
        listed = 0  # groups listed
        for group in groups:
            if limit is not None and len(out) >= limit:
                break
            label = "local" if group == LOCAL else group
            for prefix, kind in self.model.owned_routes(group):
                entry = {"prefix": str(prefix), "kind": kind.value, "owner": label}
                if group == LOCAL and str(prefix.network_address) in pod_of_ip:
                    entry["pod"] = pod_of_ip[str(prefix.network_address)]
                out.append(entry)
            listed += 1
        more = listed < len(groups)
        last = groups[listed - 1] if listed else None
        next_after = ("local" if last == LOCAL else last) if more and last is not None else None
        total = sum(by_kind.values()) if owner is None else len(out)
        return {"routes": out, "total": total, "next": next_after, "byKind": by_kind}

    def on_worker(self, function: Callable[[], Any], timeout: float = WORKER_REQUEST_TIMEOUT) -> Any:
        """Run `function` on the worker thread (the only user of the appliers' netlink sockets) and return its
        result; raises TimeoutError when the worker does not get to it in time."""
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def event() -> None:
            try:
                outcome["value"] = function()
            except Exception as error:  # noqa: BLE001 - handed back to the asking thread
                outcome["error"] = error
            finally:
                done.set()

        self._enqueue(event)
        if not done.wait(timeout):
            raise TimeoutError(f"the reconcile worker did not answer within {timeout:.0f} s (a long pass?)")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def diagnose(self) -> dict[str, Any]:
        """Read the dataplane back (on the worker) and list what is wrong (here): node_hook/diagnose.py."""
        from node_hook.diagnose import analyse, observe

        return analyse(self.on_worker(lambda: observe(self)), self.cni_conf_dir)

    def pods(self) -> list[dict[str, Any]]:
        """Every local pod and where the hook learned it (`sources`: "record", "route" or both): each pod record,
        with the host interface whose route carries its IPs, then each pod interface no record names."""
        with self._model_lock:
            records, route_pods = dict(self.records_meta), dict(self.route_pods)
        interface_of = {ip: interface for interface, ips in route_pods.items() for ip in ips}
        out: list[dict[str, Any]] = []
        recorded: set[str] = set()
        for key, meta in sorted(records.items()):
            interfaces = sorted({interface_of[ip] for ip in _normal_ips(meta.get("ips")) if ip in interface_of})
            recorded.update(interfaces)
            out.append(dict(meta, key=key, sources=["record", "route"] if interfaces else ["record"],
                            hostInterface=interfaces[0] if interfaces else None))
        for interface, ips in sorted(route_pods.items()):
            if interface not in recorded:
                out.append({"key": route_key(interface), "network": None, "containerID": None, "ifname": None,
                            "podNamespace": None, "podName": None, "ips": sorted(ips), "netns": None,
                            "sources": ["route"], "hostInterface": interface})
        return out

    def unrecorded_pods(self) -> list[dict[str, Any]]:
        """The local pods known only from their host routes (no pod record)."""
        return [pod for pod in self.pods() if pod["sources"] == ["route"]]


def _record_meta(record: dict[str, Any]) -> dict[str, Any]:
    return {field: record.get(field) for field in ("network", "containerID", "ifname", "podNamespace", "podName",
                                                    "ips", "netns")}


def _normal_ips(ips: Any) -> list[str]:
    """A record's IPs in the form the model and the routes use; anything that is not an address is left out."""
    out = []
    for ip in ips or ():
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            continue
    return out


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return str(value)
