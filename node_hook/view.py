"""The one read-only view of a node's hook: what status, peers, routes, pods, check, `wgcni check`, /readyz and the
metrics all read. `NodeView` wraps an `Engine`; nothing here changes the engine or the kernel (reads of the
dataplane run on the engine's worker thread, the one user of the appliers' sockets).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import heapq
import ipaddress
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from node_hook.addresses import address_texts, host_prefix
from node_hook.contracts import PeerState
from node_hook.diagnose import Observed, analyse
from node_hook.engine import Engine, route_key
from node_hook.model import LOCAL, DesiredPeer, RouteKind
from node_hook.planner import publication_gate
from node_hook.strict import enforcing

RECENT_HANDSHAKE_SECONDS = 180.0  # WireGuard's REJECT_AFTER_TIME: an older session can no longer carry data
PUBLICATION_GRACE_SECONDS = 10.0  # a write on its way for less than this is normal (writes are rate limited)
UNPUBLISHED_LISTED = 20  # status lists at most this many local IPs the API does not hold yet
STRICT_SAMPLE_SECONDS = 1.0  # `wgcni check` compares strict counters at least this far apart: drops still growing
STRICT_SAMPLE_MAX_AGE = 300.0  # an earlier reading (a scrape's) older than this is not used: check reads twice


def key_fingerprint(public_key: str) -> str:
    return hashlib.sha256(base64.b64decode(public_key)).hexdigest()[:16]


def peer_programmed(desired: DesiredPeer, state: PeerState | None) -> bool:
    """The device holds this peer with exactly the AllowedIPs the model wants."""
    return state is not None and state.allowed_ips == desired.allowed_ips


@dataclass
class MetricsSnapshot:
    """The node's state for one scrape, copied on the worker thread."""

    status: dict[str, Any]
    desired_peers: int = 0
    device_peers: int = 0
    programmed_peers: int = 0
    allowed_ips: int = 0
    routes_by_kind: dict[str, int] = field(default_factory=dict)
    peers: list[tuple[str, float, int, int]] = field(default_factory=list)  # node, handshake, rx, tx


class DataplaneMonitor(Protocol):
    """What the view reads of the netlink monitor (node_hook.apply.monitor.NetlinkMonitor)."""

    def health(self) -> tuple[bool, str]: ...

    def describe(self) -> dict[str, dict[str, Any]]: ...


class NodeView:
    """Read-only answers about one engine (any thread)."""

    def __init__(self, engine: Engine, cni_conf_dir: Path, monitor: DataplaneMonitor | None = None) -> None:
        self.engine = engine
        self.cni_conf_dir = cni_conf_dir  # where `diagnose` looks for the conflist's wgcni entry
        # the latest reading of the strict counters: (monotonic time, {"dropped": ..., "counted": ...})
        self._strict_sample: tuple[float, dict[str, dict[str, int]]] | None = None
        self.monitor = monitor  # the netlink monitor (node_hook.apply.monitor), None where the node runs without

    def monitor_health(self) -> tuple[bool, str]:
        """Whether the outside changes are being watched (the monitor's watchers listen): part of /healthz."""
        return self.monitor.health() if self.monitor is not None else (True, "no netlink monitor")

    # facts the probes read
    @property
    def generation(self) -> int:
        return self.engine.generation

    @property
    def converged(self) -> bool:
        return self.engine.reconciler.converged

    @property
    def last_error(self) -> str | None:
        return self.engine.last_error

    @property
    def last_pass_at(self) -> float:
        return self.engine.last_pass_at

    @property
    def peers_complete(self) -> bool:
        return self.engine.peers_complete

    @property
    def record_rescan_interval(self) -> float:
        return self.engine.settings.record_rescan_interval

    def status(self) -> dict[str, Any]:
        engine = self.engine
        converged = engine.reconciler.converged
        with engine.model_lock:
            problems = engine.model.problems()
            local_pods = self.pods()
            counts = {
                "peers": len(engine.model.peers),
                "remoteNodes": len(engine.model.remote_nodes),
                "localPods": len(local_pods),
                "podRecords": len(engine.records_meta),
                "podsWithoutRecord": sum(1 for pod in local_pods if pod["sources"] == ["route"]),
                "routes": len(engine.model.routes),
            }
        source_error = getattr(engine.peer_source, "error", None)
        if engine.last_error:
            message = f"reconcile error (retrying): {engine.last_error}"
        elif not engine.peers_complete:
            message = "waiting for the first complete peer list"
        elif problems:
            message = f"dataplane programmed; {len(problems)} problem(s): {problems[0].message}"
        else:
            message = "dataplane programmed"
        sync_status = getattr(engine.peer_source, "status", None)
        return {
            "ready": converged and engine.generation > 0,
            "dataplane_programmed": converged,
            "message": message,
            "node": engine.settings.node_name,
            "publicKey": engine.key.public_key,
            "keyFingerprint": key_fingerprint(engine.key.public_key),
            "keyRotation": engine.key_state(),
            "backend": engine.appliers.wireguard.kind,
            "interface": engine.settings.interface,
            "listenPort": engine.settings.listen_port,
            "endpoint": engine.environment.endpoint,
            "nodeIPs": sorted(engine.environment.node_ips),
            "mtu": engine.environment.mtu,
            "mtuReason": engine.environment.mtu_reason,
            "underlayInterface": engine.environment.underlay_interface,
            "azure": engine.environment.azure,
            "azureReason": engine.environment.azure_reason,
            "hostEncryption": engine.host_encryption,
            "fwmark": f"{engine.settings.fwmark:#x}",
            "routeTable": engine.settings.route_table,
            "rulePriority": engine.settings.rule_priority,
            "inSync": dict(engine.reconciler.in_sync),
            "peersComplete": engine.peers_complete,
            "peerSourceError": source_error,
            "publication": self.publication_status(),
            "strict": self.strict_status(),
            "sync": _plain(sync_status),
            "counts": counts,
            "problems": [{"kind": p.kind, "subject": p.subject, "message": p.message} for p in problems],
            "recordErrors": list(engine.record_errors),
            "lastError": engine.last_error,
            "passes": engine.reconciler.passes,
            "errors": engine.reconciler.errors,
            "generation": engine.generation,
            "monitor": self.monitor.describe() if self.monitor is not None else None,
        }

    def check(self, ips: list[str]) -> dict[str, Any]:
        """Are these local pod IPs programmed (local, throw route, in no peer) and is everything in sync?"""
        engine = self.engine
        missing: list[str] = []
        with engine.model_lock:  # asked from the API thread while the worker applies events
            for text in ips:
                try:
                    ip = ipaddress.ip_address(text)
                except ValueError:
                    missing.append(text)
                    continue
                if (engine.model.owner_of(ip) != LOCAL
                        or engine.model.routes.get(host_prefix(ip)) is not RouteKind.THROW):
                    missing.append(text)
        programmed = not missing and engine.reconciler.converged
        if missing:
            message = f"not programmed yet: {', '.join(missing)}"
        elif not engine.reconciler.converged:
            message = f"dataplane not in sync: {engine.last_error or 'reconciling'}"
        else:
            message = "programmed"
        return {"programmed": programmed, "missing": missing, "message": message}

    def peers(self, offset: int = 0, limit: int | None = None, node: str | None = None) -> dict[str, Any]:
        """Peers sorted by node name, `limit` of them from `offset` (all without a limit), and a summary of all.

        Only the returned page is rendered (AllowedIPs, pod IPs): at 5 000 peers the answer stays small and fast.
        """
        engine = self.engine
        device = engine.appliers.wireguard.read()
        live = device.peers if device is not None else {}
        desired = engine.model.peers
        selected = [peer for peer in desired.values() if node is None or peer.node == node]
        end = None if limit is None else offset + limit
        page = (sorted(selected, key=lambda peer: peer.node)[offset:end] if end is None
                else heapq.nsmallest(end, selected, key=lambda peer: peer.node)[offset:])
        remote = engine.model.remote_nodes
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
                "programmed": peer_programmed(peer, state),
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
            programmed += peer_programmed(peer, state)
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
        linear in routes (docs/benchmarks.md, P8).
        """
        engine = self.engine
        by_kind = {kind.value: count for kind, count in engine.model.route_counts().items() if count}  # O(nodes)
        remote = engine.model.remote_nodes
        names = sorted(remote)
        groups: list[str]
        if owner is not None:
            groups = [LOCAL] if owner == "local" else [owner] if owner in remote else []
        elif after is None:
            groups = [LOCAL, *names]
        else:
            groups = names if after == "local" else names[bisect.bisect_right(names, after):]
        pod_of_ip = {ip: f"{meta.get('podNamespace') or '-'}/{meta.get('podName') or meta.get('containerID')}"
                     for meta in engine.records_meta.values() for ip in meta.get("ips") or ()}
        out: list[dict[str, Any]] = []
        listed = 0  # groups listed
        for group in groups:
            if limit is not None and len(out) >= limit:
                break
            label = "local" if group == LOCAL else group
            for prefix, kind in engine.model.owned_routes(group):
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

    def pods(self) -> list[dict[str, Any]]:
        """Every local pod and where the hook learned it (`sources`: "record", "route" or both): each pod record,
        with the host interface whose route carries its IPs, then each pod interface no record names."""
        engine = self.engine
        with engine.model_lock:
            records, route_pods = dict(engine.records_meta), dict(engine.route_pods)
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

    def publication_status(self) -> dict[str, Any]:
        """Whether the API holds this node's publication - its key and every local IP - and if not, why:
        `state` is confirmed | unknown | opted-out | pending | denied | unreachable | stale; `overdue` once it has
        not been confirmed for PUBLICATION_GRACE_SECONDS."""
        engine = self.engine
        with engine.model_lock:
            publication, local = engine.publication, engine.local_ips()
            since, held_before = engine.unpublished_since, engine.key_held_before()
        tunnel, bypass = publication_gate(publication, engine.key.public_key, local, held_before)
        held_key = publication.public_key
        if publication.state == "unknown":
            state, message = "unknown", "waiting for the API's copy of this node's WireguardNode"
        elif publication.state == "opted-out":
            state, message = "opted-out", "WireGuard is disabled on this node by its label wgcni.io/wireguard"
        elif tunnel and not bypass:
            state, message = "confirmed", "the API holds this node's key and every local IP"
        elif publication.state in ("denied", "unreachable"):
            state, message = publication.state, publication.reason
        elif held_key and held_key != engine.key.public_key:
            state, message = "stale", "the API holds another public key for this node (an old disk or a cloned one)"
        else:
            state, message = "pending", "the latest publication is on its way to the API"
        if state not in ("confirmed", "unknown", "opted-out"):
            scope = "all its traffic" if not tunnel else f"{len(bypass)} local IP(s)"
            if enforcing(engine.settings, publication):
                message += f"; until the API holds it, the traffic of {scope} is dropped (strict mode)"
            else:
                message += (f"; until the API holds it, {scope} leave(s) in plaintext (peers could not take it "
                            "encrypted)")
        age = 0.0 if since is None else max(0.0, engine.clock() - since)
        published = engine.key.public_key in (held_key, publication.next_public_key)
        return {"state": state, "message": message, "tunnel": tunnel, "keyPublished": published,
                "unpublished": sorted(bypass)[:UNPUBLISHED_LISTED], "unpublishedCount": len(bypass),
                "unpublishedSeconds": round(age, 1), "overdue": age >= PUBLICATION_GRACE_SECONDS}


    def strict_status(self) -> dict[str, Any]:
        """Strict mode as the hook applies it (node_hook/strict.py) and the strict table's kernel counters."""
        engine = self.engine
        spec = engine.targets.firewall.strict
        if spec is None:
            return {"mode": "off", "strictMode": engine.settings.strict_mode}
        mode = "strict" if spec.enforce else ("opted-out" if engine.settings.strict_mode else "permissive")
        out: dict[str, Any] = {
            "mode": mode, "strictMode": engine.settings.strict_mode, "table": f"inet {spec.table}",
            "cluster": [str(network) for network in spec.cluster], "allow": [str(network) for network in spec.allow],
            "exempt": [str(network) for network in spec.exempt][:UNPUBLISHED_LISTED], "exemptCount": len(spec.exempt),
            "published": len(spec.published), "host": spec.host, "bootFile": spec.boot_file if spec.enforce else "",
        }
        try:
            counters = engine.appliers.firewall.counters()
        except Exception as error:  # noqa: BLE001 - status still answers; the message says what failed
            out["error"] = str(error)
            return out
        out["tablePresent"] = counters is not None
        if counters is not None:
            out["dropped"], out["counted"] = counters.dropped, counters.counted
            self._strict_sample = (time.monotonic(), {"dropped": counters.dropped, "counted": counters.counted})
            out["top"] = {direction: [{"address": address, "packets": packets} for address, packets in hits]
                          for direction, hits in counters.top.items()}
        return out

    def strict_growth(self, seconds: float = STRICT_SAMPLE_SECONDS) -> dict[str, Any]:
        """The strict status plus `growth`: the packets each verdict and direction gained since an earlier reading -
        the last one any status, scrape or check took, when it is between `seconds` and STRICT_SAMPLE_MAX_AGE old
        (a scraped hook answers at once), else one taken now and `seconds` later (caller's thread: it sleeps)."""
        earlier = self._strict_sample
        now = self.strict_status()
        if not now.get("tablePresent"):
            return now
        if earlier is None or not seconds <= time.monotonic() - earlier[0] <= STRICT_SAMPLE_MAX_AGE:
            earlier = self._strict_sample
            time.sleep(seconds)
            now = self.strict_status()
            if not now.get("tablePresent"):
                return now
        assert earlier is not None
        then, before = earlier
        now["growth"] = {kind: {direction: now[kind][direction] - before[kind][direction]
                                for direction in now[kind]} for kind in ("dropped", "counted")}
        now["sampledSeconds"] = round(time.monotonic() - then, 1)
        return now

    # ---- reads of the dataplane (on the worker) -------------------------------------------------------------

    def observe(self) -> Observed:
        """Read the dataplane back and copy the desired state, for `analyse` (worker thread)."""
        engine = self.engine
        return Observed(
            device=engine.appliers.wireguard.read(),
            table=engine.appliers.routing.read(),
            sysctls=engine.appliers.sysctls.read(sorted(engine.targets.sysctls)),
            firewall_present=engine.appliers.firewall.read() is not None,
            desired_peers=dict(engine.model.peers),
            desired_routes=dict(engine.model.routes.items()),  # a snapshot: the model's routes are derived on demand
            problems=engine.model.problems(),
            peers_complete=engine.peers_complete,
            last_error=engine.last_error,
            record_errors=list(engine.record_errors),
            unrecorded_pods=self.unrecorded_pods(),
            source_error=getattr(engine.peer_source, "error", None),
            publication=self.publication_status(),
            sync_status=getattr(engine.peer_source, "status", None),
            targets=engine.targets,
            settings=engine.settings,
            environment=engine.environment,
        )

    def diagnose(self) -> dict[str, Any]:
        """Read the dataplane back (on the worker) and list what is wrong (node_hook/diagnose.py); the strict counters
        are sampled twice on the caller's thread (drops that keep growing)."""
        observed = self.engine.on_worker(self.observe)
        return analyse(replace(observed, strict=self.strict_growth()), self.cni_conf_dir)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The state one scrape reports (worker thread: it reads the device back)."""
        engine = self.engine
        snapshot = MetricsSnapshot(self.status())
        device = engine.appliers.wireguard.read()
        live = device.peers if device is not None else {}
        snapshot.device_peers = len(live)
        snapshot.desired_peers = len(engine.model.peers)
        for key, peer in engine.model.peers.items():
            snapshot.allowed_ips += len(peer.allowed_ips)
            state = live.get(key)
            snapshot.programmed_peers += peer_programmed(peer, state)
            snapshot.peers.append((peer.node, state.latest_handshake, state.rx_bytes, state.tx_bytes) if state
                                  else (peer.node, 0.0, 0, 0))
        snapshot.routes_by_kind = {kind.value: count for kind, count in engine.model.route_counts().items()}
        return snapshot


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
