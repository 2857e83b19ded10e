"""The engine of the hook: sources -> model -> reconciler, on one worker thread.

Only the worker thread touches the model and the appliers' write paths. Other threads (local API, peer source,
netlink monitor, wireguard-go watcher) enqueue events and wake it:
- a pod notification re-reads that one record and applies at once (the caller waits up to a bound for the pass);
- the records directory is rescanned every `recordRescanInterval` (the record, not the notification, is the truth);
- local pods are also learned from the main table's pod host routes (node_hook.pod_routes): a pod without a record
  (it predates wgcni, or started while the conflist lacked the wgcni entry) is local and published all the same;
  the netlink monitor says when such a route or a pod interface comes or goes, and every rescan reads them again;
- the netlink monitor (node_hook.apply.monitor) says our device, its address, a rule of ours, our nftables tables
  or a sysctl changed, or wireguard-go exited -> that aspect is marked out of sync and repaired in the next pass,
  with the same key; a route of our table that is not what the model wants is rechecked alone;
- every `resyncInterval` every aspect is read back in full and diffed;
- key rotation (node_hook.rotation): `rotate_key()` (or `keyRotationInterval`) creates the next key, which is
  published with a switch time; once the API holds both, the device switches at that time. A remote node announcing
  a rotation is handed to the model with the key its peers use at the moment, and again when that changes;
- a failed pass is retried after a short backoff (max 1 s) and reads back what failed.
After each pass the local announcement (key, endpoint, node IPs, local pod IPs, MTU, readiness) is published to
the peer source, which coalesces. The source reports back what the API holds of it (`Publication`), and the rules
follow that (`planner.publication_gate`): a node trusts its own publication only once it sees it in the API, so a
node whose writes are refused or lost is never a black hole - its traffic stays in the main table (plaintext)
instead of entering a tunnel no peer can take, and each new local IP leaves by the main table until it is listed.

The engine's state is read through `node_hook.view.NodeView` (status, peers, routes, pods, check, metrics,
diagnose); `node_hook.node.build_node` wires an engine with its appliers, sources, monitor and view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from node_hook.addresses import IPNetwork, address_of, host_keys
from node_hook.config import Settings, with_live_settings
from node_hook.contracts import (
    DeviceSpec,
    FirewallApplier,
    FirewallSpec,
    RoutingApplier,
    SysctlApplier,
    WireGuardBackend,
    WireGuardChange,
)
from node_hook.detect import Environment
from node_hook.keys import KeyStore, NodeKey
from node_hook.model import UNKNOWN_PUBLICATION, LocalAnnouncement, NodeModel, Publication, RemoteNode
from node_hook.peers import PeerSource
from node_hook.planner import desired_rules, publication_gate
from node_hook.pod_routes import PodRouteSource
from node_hook.reconciler import ASPECTS, PassResult, Reconciler, Targets
from node_hook.rotation import SWITCH_LEAD, confirmed, effective, next_change, switch_time
from node_hook.strict import desired_strict, enforcing

log = logging.getLogger(__name__)

FIREWALL_TABLE = "wgcni"
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
WORKER_REQUEST_TIMEOUT = 10.0  # a read-back asked of the worker (diagnose) waits at most this for a busy pass
ROUTES_SEEN_LIMIT = 10_000  # routes reported changed, pending a check, past which the table is read back whole
ROUTE_KEY_PREFIX = "route:"  # model keys of the pods learned from host routes: "route:<host interface>"


def record_key(network: str, container_id: str, ifname: str) -> str:
    return f"{network}/{container_id}@{ifname}"


def route_key(interface: str) -> str:
    return f"{ROUTE_KEY_PREFIX}{interface}"


def host_encryption_enabled(settings: Settings, environment: Environment) -> bool:
    """`hostEncryption`; auto = on Azure, and always in strict mode (without it pod traffic to node IPs would be
    dropped; config.py refuses strictMode with hostEncryption false)."""
    if settings.host_encryption == "auto":
        return environment.azure or settings.strict_mode
    return settings.host_encryption == "true"


def desired_sysctls(settings: Settings) -> dict[str, str]:
    return {
        # the fwmark set in PREROUTING counts in the reverse-path lookup (plaintext from the underlay passes)
        "net/ipv4/conf/all/src_valid_mark": "1",
        # loose reverse-path check on the tunnel: WireGuard already checks every inner source against AllowedIPs
        f"net/ipv4/conf/{settings.interface}/rp_filter": "2",
    }


class KeyRotationError(RuntimeError):
    """A key rotation cannot start on this hook (the message says why)."""


# ---- seams -----------------------------------------------------------------------------------------------------

@dataclass
class Appliers:
    """The only code that writes to the kernel (node_hook.apply), real or fake."""

    wireguard: WireGuardBackend
    routing: RoutingApplier
    firewall: FirewallApplier
    sysctls: SysctlApplier


class RecordSource(Protocol):
    """The plugin's pod records (cni_plugin.records.RecordStore)."""

    def read(self, network: str, container_id: str, ifname: str) -> dict[str, Any] | None: ...

    def list(self, network: str | None = None, errors: list[str] | None = None) -> list[dict[str, Any]]: ...


class Observer(Protocol):
    """Told on the worker thread what was seen and applied (node_hook.metrics.HookMetrics)."""

    def pod_seen(self, key: str, seen_at: float) -> None: ...

    def remote_node_received(self, old: RemoteNode | None, new: RemoteNode) -> None: ...

    def pass_done(self, result: PassResult, seconds: float) -> None: ...


# ---- the engine ------------------------------------------------------------------------------------------------

class Engine:
    """The worker loop and the state it keeps; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        key: NodeKey,
        environment: Environment,
        peer_source: PeerSource,
        appliers: Appliers,
        records: RecordSource,
        pod_routes: PodRouteSource,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
        key_store: KeyStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.key = key
        self.environment = environment
        self.peer_source = peer_source
        self.appliers = appliers
        self.records = records
        self.pod_routes = pod_routes
        self.clock = clock
        self.observer = observer
        self.key_store = key_store
        self.wall_clock = wall_clock
        self.next_key: NodeKey | None = None  # a rotation under way: the key switched to at `key_switch_at`
        self.key_switch_at = 0.0  # unix time
        self.key_rotated_at: float | None = None  # unix time of this process's last switch
        self.key_rotations = 0
        self._rotating_nodes: dict[str, RemoteNode] = {}  # remote nodes announcing a rotation, as published
        self.host_encryption = host_encryption_enabled(settings, environment)
        self.model = NodeModel(settings.node_name, environment.node_ips, self.host_encryption,
                               settings.persistent_keepalive, local_public_key=key.public_key)
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
        self.route_pods: dict[str, frozenset[str]] = {}  # host interface -> pod IPs, from the main table
        self._pod_routes_pending = False
        self._routes_seen: dict[IPNetwork, str | None] = {}  # reported by the monitor, not checked yet
        self._lock = threading.Lock()
        # Held by the worker while it changes the model (events, rescans) and by other threads while they read
        # more than one value of it (the view): a consistent view, and no "dict changed size during iteration".
        self.model_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._events: list[Callable[[], None]] = []
        self._out_of_sync: set[str] = set()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.generation = 0  # passes completed
        self.last_error: str | None = None
        self.record_errors: list[str] = []
        self.peers_complete = False
        self.last_pass_at = 0.0
        self._retry_index = 0
        self._last_announcement: LocalAnnouncement | None = None
        self.records_meta: dict[str, dict[str, Any]] = {}
        self.publication: Publication = UNKNOWN_PUBLICATION  # what the API holds of this node (peer source)
        self.unpublished_since: float | None = None  # monotonic time the publication stopped covering this node

    @property
    def targets(self) -> Targets:
        """The desired state that does not come from the model (the rules follow the publication)."""
        return self.reconciler.targets

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.key_store is not None:
            self.next_key = self.key_store.pending()  # a rotation this hook started before a restart goes on
            self.key_switch_at = self.wall_clock() + SWITCH_LEAD
        self._rescan_pod_routes()
        self._rescan_records()
        self._worker = threading.Thread(target=self._run, name="wgcni-reconcile", daemon=True)
        self._worker.start()
        self.peer_source.start(self)

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

    def pod_changed(self, network: str, container_id: str, ifname: str, wait: float = 0.15,
                    hold: float = 0.0) -> None:
        """A notification from the plugin: re-read that record now and answer once it is applied (at most `wait`
        seconds), so a reused IP is local before the pod's first packet (docs/design.md, local API). With `hold`
        (strict mode's ADD) answer only once the API holds the pod's IPs too, at most `hold` s after it came."""
        seen_at = time.monotonic()
        generation = self._enqueue(lambda: self._load_record(network, container_id, ifname, seen_at))
        self.wait_for_pass(generation, wait)
        if hold > 0:
            self._wait_published(record_key(network, container_id, ifname), seen_at + hold)

    def _wait_published(self, key: str, deadline: float) -> bool:
        """Wait until what the API holds of this node lists every IP of the record `key` (or `deadline`)."""
        with self._wake:
            while True:
                ips = (self.records_meta.get(key) or {}).get("ips")
                if ips and self.publication.ips.issuperset(ips):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)

    # PeerSink: the peer source's deltas
    def nodes_synced(self, nodes: Mapping[str, RemoteNode]) -> None:
        """A complete list: the remote nodes are exactly these (pruning is allowed from now on)."""
        nodes = dict(nodes)

        def apply() -> None:
            self._rotating_nodes = {name: node for name, node in nodes.items() if node.next_public_key}
            now = self.wall_clock()
            programmed = {name: effective(node, now) for name, node in nodes.items()}
            if self.observer is not None:
                # Only the nodes that are new objects: a source re-delivers unchanged nodes as the same objects;
                # comparing all their pod IP sets would cost a pass over every address per delivery.
                previous = self.model.remote_nodes
                for name, node in programmed.items():
                    if previous.get(name) is not node:
                        self.observer.remote_node_received(previous.get(name), node)
            self.peers_complete = True
            self.model.replace_remote_nodes(programmed)
        self._enqueue(apply)

    def node_changed(self, node: RemoteNode) -> None:
        def apply() -> None:
            if node.next_public_key:
                self._rotating_nodes[node.name] = node
            else:
                self._rotating_nodes.pop(node.name, None)
            self._set_remote(effective(node, self.wall_clock()))
        self._enqueue(apply)

    def _set_remote(self, node: RemoteNode) -> None:
        if self.observer is not None:
            self.observer.remote_node_received(self.model.remote_nodes.get(node.name), node)
        self.model.set_remote_node(node)

    def node_gone(self, name: str) -> None:
        def apply() -> None:
            self._rotating_nodes.pop(name, None)
            self.model.remove_remote_node(name)
        self._enqueue(apply)

    def published(self, publication: Publication) -> None:
        """What the API now holds of this node's publication."""
        def apply() -> None:
            self.publication = publication
            key = self.key.public_key
            if self.key_store is not None and publication.state != "unknown" and key in (
                    publication.public_key, publication.next_public_key):
                self._mark_published(key)
        self._enqueue(apply)

    def _mark_published(self, public_key: str) -> None:
        assert self.key_store is not None
        try:
            self.key_store.mark_published(public_key)
        except OSError as error:  # a restart would then wait for the first list before using the tunnel
            log.warning("cannot record the published key in %s: %s", self.key_store.published_path, error)

    def key_held_before(self) -> bool:
        """Whether the API held this node's current key when last seen (KeyStore.last_published)."""
        if self.key_store is None:
            return True
        last = self.key_store.last_published()
        return last is None or last == self.key.public_key

    def strict_settings_changed(self, new: Settings) -> None:
        """strictMode, strictCIDRs or strictAllow changed in the config file: the next pass applies them (live; the
        strict table's chains are replaced in one transaction)."""
        def apply() -> None:
            self.settings = with_live_settings(self.settings, new)
        self._enqueue(apply)

    # the netlink monitor's and the WireGuard backend's events
    def dataplane_changed(self, *aspects: str) -> None:
        """Something outside changed these aspects (device, routes, rules ...): read them back and repair."""
        self._enqueue(out_of_sync=aspects)

    def routes_seen(self, routes: Mapping[IPNetwork, str | None]) -> None:
        """Routes of our table added, changed (RouteKind value, or FOREIGN_ROUTE) or removed (None) by anyone:
        gathered into one pending set (the hook's own bulk writes come back as 1.25 M notifications at 5 000 x
        250), checked on the worker: each that is not what the model wants is rechecked alone. More than
        ROUTES_SEEN_LIMIT pending -> the table is read back whole instead, so memory stays bounded."""
        with self._wake:
            pending = self._routes_seen
            first = not pending
            pending.update(routes)
            if len(pending) > ROUTES_SEEN_LIMIT:
                pending.clear()
                self._out_of_sync.add("routes")
                self._wake.notify_all()
                return
        if first:
            self._enqueue(self._check_routes_seen)

    def _check_routes_seen(self) -> None:
        with self._wake:
            seen, self._routes_seen = self._routes_seen, {}
        wanted = self.model.routes
        differing = []
        for prefix, kind in seen.items():
            wanted_kind = wanted.get(prefix)  # one lookup: each derives the route from the owners
            if (None if wanted_kind is None else wanted_kind._value_) != kind:
                differing.append(prefix)
        if differing:
            self.reconciler.recheck_routes(differing)

    def pod_routes_changed(self) -> None:
        """A main-table host route or a pod interface came or went: re-read the pod routes once, however many such
        changes arrive before the worker gets to it."""
        with self._wake:
            if self._pod_routes_pending:
                return
            self._pod_routes_pending = True
        self._enqueue(self._rescan_pod_routes)

    def wireguard_changed(self, change: WireGuardChange) -> None:
        """Someone else wrote to our device (the backend saw it): the device and the peers it named, and those that
        held an AllowedIP it gave away, are rechecked on the worker."""
        def apply() -> None:
            if change.device:
                self.reconciler.mark_out_of_sync("device")
            if change.all_peers or any(prefix.num_addresses != 1 for prefix in change.allowed_ips):
                self.reconciler.mark_out_of_sync("peers")  # any peer may differ (a wide prefix cuts into any)
                return
            keys = set(change.peer_keys)
            for prefix in change.allowed_ips:
                owner = self.model.owner_of(prefix.network_address)
                peer_key = self.model.key_of_node(owner) if owner is not None else None
                if peer_key is not None:
                    keys.add(peer_key)
            if keys:
                self.reconciler.recheck_peers(keys)
        self._enqueue(apply)

    def wireguard_exited(self, code: int) -> None:
        self.dataplane_changed("device")

    def rotate_key(self) -> dict[str, Any]:
        """Start a key rotation (none when one is under way) and return `key_state()`; KeyRotationError when this
        hook cannot rotate."""
        return self.on_worker(self._start_rotation)

    def _start_rotation(self) -> dict[str, Any]:
        if self.key_store is None:
            raise KeyRotationError("this hook has no key file to rotate")
        if self.next_key is None:
            self.next_key = self.key_store.create_next()
            self.key_switch_at = self.wall_clock() + SWITCH_LEAD
            log.info("key rotation: next key %s... announced, switch in %.0f s", self.next_key.public_key[:8],
                     SWITCH_LEAD)
        return self.key_state()

    def key_state(self) -> dict[str, Any]:
        """The node's key and rotation, for status (any thread: a snapshot of plain values)."""
        next_key = self.next_key
        return {
            "publicKey": self.key.public_key,
            "nextPublicKey": next_key.public_key if next_key is not None else None,
            "switchAt": self.key_switch_at if next_key is not None else None,
            "rotatedAt": self.key_rotated_at,
            "rotations": self.key_rotations,
        }

    def trigger_resync(self) -> int:
        return self._enqueue(out_of_sync=ASPECTS)

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

    # ---- worker -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        now = self.clock()
        next_rescan = now + self.settings.record_rescan_interval
        next_resync = now + self.settings.resync_interval
        retry_at: float | None = now
        while not self._stopping.is_set():
            with self._wake:
                while not self._events and not self._out_of_sync and not self._stopping.is_set():
                    deadline = min(next_rescan, next_resync, retry_at if retry_at is not None else next_resync,
                                   self._next_key_event())
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                events, self._events = self._events, []
                out_of_sync, self._out_of_sync = self._out_of_sync, set()
            if self._stopping.is_set():
                return
            now = self.clock()
            with self.model_lock:
                for event in events:
                    try:
                        event()
                    except Exception as error:  # noqa: BLE001 - a bad record or peer list must not stop the loop
                        log.error("%s", error)
                if now >= next_rescan:
                    self._rescan_pod_routes()
                    self._rescan_records()
                    next_rescan = now + self.settings.record_rescan_interval
                self._follow_rotations()
                self._advance_rotation()
            if now >= next_resync:
                out_of_sync.update(ASPECTS)
                next_resync = now + self.settings.resync_interval
            if out_of_sync:
                self.reconciler.mark_out_of_sync(*sorted(out_of_sync))
            self.reconciler.prune = self.peers_complete
            with self.model_lock:
                self._gate_rules()
                self._gate_strict()
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

    def _next_key_event(self) -> float:
        """The monotonic time of the next rotation step: a remote node's switch, this node's switch or its next
        rotation by `keyRotationInterval` (infinity when none)."""
        wall = self.wall_clock()
        moments = []
        for name, node in self._rotating_nodes.items():
            current = self.model.remote_nodes.get(name)
            if current is None or current.public_key != effective(node, wall).public_key:
                moments.append(wall)  # its switch time passed since the last look: at once
            elif (moment := next_change(node, wall)) is not None:
                moments.append(moment)
        if self.next_key is not None:
            moments.append(self.key_switch_at)
        elif self.settings.key_rotation_interval and self.key_store is not None:
            moments.append(self._key_created_at() + self.settings.key_rotation_interval)
        return self.clock() + max(0.0, min(moments) - wall) if moments else float("inf")

    def _key_created_at(self) -> float:
        assert self.key_store is not None
        try:
            return self.key_store.created_at()
        except OSError:
            return self.wall_clock()

    def _follow_rotations(self) -> None:
        """Worker: hand the model each rotating remote node whose programmed key changed since (node_hook.rotation)."""
        now = self.wall_clock()
        for name, node in list(self._rotating_nodes.items()):
            programmed = effective(node, now)
            current = self.model.remote_nodes.get(name)
            if current is None or current.public_key != programmed.public_key:
                log.info("node %s: key %s... -> %s... (rotation)", name,
                         current.public_key[:8] if current else "", programmed.public_key[:8])
                self._set_remote(programmed)
            if next_change(node, now) is None:
                del self._rotating_nodes[name]

    def _advance_rotation(self) -> None:
        """Worker: this node's own rotation - start one when `keyRotationInterval` is due, switch once the API holds
        the announcement and the switch time came, announce a new time when the old one passed unannounced."""
        if self.key_store is None:
            return
        now = self.wall_clock()
        if self.next_key is None:
            interval = self.settings.key_rotation_interval
            if interval and now >= self._key_created_at() + interval:
                self._start_rotation()
            return
        next_public = self.next_key.public_key
        self.key_switch_at = switch_time(self.publication, next_public, self.key_switch_at, now)
        if now < self.key_switch_at:
            return
        if confirmed(self.publication, next_public, self.key_switch_at):
            self._switch_key()
            self._mark_published(next_public)
        elif self.publication.state == "opted-out":
            self._switch_key()
        else:  # peers cannot have known that time: a new one, announced again
            self.key_switch_at = now + SWITCH_LEAD

    def _switch_key(self) -> None:
        assert self.key_store is not None
        old = self.key
        self.key = self.key_store.promote_next()
        self.next_key = None
        self.reconciler.set_device_key(self.key.private, self.key.public_key)
        self.model.set_local_public_key(self.key.public_key)
        self.key_rotated_at = self.wall_clock()
        self.key_rotations += 1
        log.info("key rotation: switched from %s... to %s...", old.public_key[:8], self.key.public_key[:8])

    def local_ips(self) -> frozenset[str]:
        """This node's IPs: its node IPs and every local pod IP (any thread holding `model_lock`, or the worker)."""
        return frozenset(str(address_of(key)) for key in self.model.local_pod_ips) | self.environment.node_ips

    def _gate_rules(self) -> None:
        """Worker thread, before a pass: the rules as the publication allows them (planner.publication_gate)."""
        tunnel, bypass = publication_gate(self.publication, self.key.public_key, self.local_ips(),
                                          self.key_held_before())
        settings = self.settings
        if enforcing(settings, self.publication):  # strict: an unpublished IP's packets are dropped in the main
            bypass = frozenset()  # table; in the tunnel they reach every peer that has learned it already
        self.reconciler.set_rules(desired_rules(settings.rule_priority, settings.fwmark, settings.route_table,
                                                tunnel, bypass))
        covered = tunnel and not bypass
        if covered or self.publication.state == "unknown":
            self.unpublished_since = None
        elif self.unpublished_since is None:
            self.unpublished_since = self.clock()

    def _gate_strict(self) -> None:
        """Worker thread, before a pass: the strict table as the settings, remote nodes and publication want it."""
        strict = desired_strict(self.settings, self.environment, self.host_encryption, self.model, self.publication)
        self.reconciler.set_firewall(replace(self.targets.firewall, strict=strict))

    def _load_record(self, network: str, container_id: str, ifname: str, seen_at: float) -> None:
        from cni_plugin.records import RecordError

        key = record_key(network, container_id, ifname)
        try:
            record = self.records.read(network, container_id, ifname)
        except RecordError as error:
            log.error("pod record %s: %s (ignored until it is valid)", key, error)
            return
        previous = self.records_meta.get(key)
        if record is None:
            self.model.remove_local_pod(key)
            self.records_meta.pop(key, None)
        else:
            self.model.set_local_pod(key, record["ips"])
            self.records_meta[key] = _record_meta(record)
        current = self.records_meta.get(key)
        # A change the next successful pass applies - unless a rescan took this record in already (and counted it).
        if self.observer is not None and _ips_of(previous) != _ips_of(current):
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
            for key in meta.keys() | self.records_meta.keys():
                if _ips_of(meta.get(key)) != _ips_of(self.records_meta.get(key)):
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
            next_public_key=self.next_key.public_key if self.next_key is not None else "",
            key_switch_at=self.key_switch_at if self.next_key is not None else 0.0,
        )
        if announcement != self._last_announcement:
            self._last_announcement = announcement
            try:
                self.peer_source.publish(announcement)
            except Exception as error:  # noqa: BLE001 - the source retries; never stop the worker
                log.error("publishing this node's state: %s", error)



def _ips_of(meta: dict[str, Any] | None) -> list[str] | None:
    """A pod record's IPs as the hook holds them (None: no record): what a pod convergence is counted on."""
    return None if meta is None else meta["ips"]


def _record_meta(record: dict[str, Any]) -> dict[str, Any]:
    return {field: record.get(field) for field in ("network", "containerID", "ifname", "podNamespace", "podName",
                                                    "ips", "netns")}
