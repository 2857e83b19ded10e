"""`wgcni check` on the hook side: read the node back and say, one finding per failure mode, what is wrong and what
to do.

Two halves: `NodeView.observe()` (node_hook/view.py) runs on the engine's worker thread (`NodeView.diagnose` →
`Engine.on_worker`), the only thread that may use the appliers' netlink sockets, and only reads everything back and
copies the model's desired state into an `Observed`, so the worker is held for no longer than a full resync pass
reads; `analyse(observed, conf_dir)` here is pure and runs on the asking thread. The dataplane findings reuse the
planner: whatever the planner would still change against
the read-back is, by definition, what is missing or wrong right now (the hook repairs such drift within a pass, so a
finding here means it keeps coming back or the repair keeps failing).

A finding is `{"check", "severity", "message", "fix"}`; severity `error` and `warning` make `wgcni check` exit 1,
`info` (a node deliberately without WireGuard, for instance) is shown but does not.
"""

from __future__ import annotations

import heapq
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_hook.contracts import AddDeviceAddress, AddRule, DeleteRule, RemovePeer
from node_hook.detect import AZURE_UNDERLAY_LOSS, WIREGUARD_OVERHEAD
from node_hook.install.conflist_files import active_config
from node_hook.install.conflist_text import has_entry
from node_hook.planner import plan_device_address, plan_peers, plan_rules, plan_sysctls

SYS_CLASS_NET = Path("/sys/class/net")
CHECKS = ("sync", "publication", "reconcile", "device", "mtu", "peers", "rules", "routes", "sysctls", "firewall",
          "strict", "conflicts", "handshakes", "records", "conflist")
HANDSHAKE_REJECT_AFTER = 180.0  # WireGuard's REJECT_AFTER_TIME: older session keys no longer carry data
EXAMPLES = 3  # a finding names at most this many peers/prefixes, then "and N more"
LOGS = "kubectl -n kube-system logs ds/wgcni-node -c wgcni-node"


def _finding(check: str, severity: str, message: str, fix: str) -> dict[str, str]:
    return {"check": check, "severity": severity, "message": message, "fix": fix}


def _some(items: list[str], total: int | None = None) -> str:
    """The first EXAMPLES of `items`, and how many more there are (of `total` when only examples were passed)."""
    total = len(items) if total is None else total
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f" and {total - EXAMPLES} more" if total > EXAMPLES else "")


def underlay_mtu(interface: str, sys_class_net: Path | None = None) -> int | None:
    """The underlay interface's MTU now (None when it is gone)."""
    try:
        return int(((sys_class_net or SYS_CLASS_NET) / interface / "mtu").read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Observed:
    """Everything the analysis needs, read back or copied on the worker thread."""

    device: Any  # DeviceState | None
    table: Any  # TableState
    sysctls: dict[str, str | None]
    firewall_present: bool
    desired_peers: dict[str, Any]  # public key -> DesiredPeer
    desired_routes: dict[Any, Any]  # prefix -> RouteKind
    problems: list[Any]
    peers_complete: bool
    last_error: str | None
    record_errors: list[str]
    unrecorded_pods: list[dict[str, Any]]  # local pods known only from their host routes
    source_error: str | None
    publication: dict[str, Any]  # NodeView.publication_status()
    sync_status: Any
    targets: Any
    settings: Any
    environment: Any
    strict: dict[str, Any] | None = None  # NodeView.strict_growth(): strict mode, its counters read twice


def analyse(observed: Observed, conf_dir: Path) -> dict[str, Any]:
    """All findings for this node, plus the names of the checks that ran (any thread)."""
    findings: list[dict[str, str]] = []
    for check in (_sync, _publication, _reconcile, _device, _mtu, _peers, _rules, _routes, _sysctls, _firewall,
                  _strict, _conflicts, _handshakes, _records):
        findings += check(observed)
    findings += _conflist(conf_dir)
    return {"findings": findings, "checks": list(CHECKS)}


def _sync(o: Observed) -> list[dict[str, str]]:
    source_error, status = o.source_error, o.sync_status
    out = []
    if not o.peers_complete:
        why = f" ({source_error})" if source_error else ""
        out.append(_finding("sync", "error", f"no complete peer list yet{why}: peers are added but none is pruned",
                            "check that the hook reaches the API server and its RBAC (conf/rbac.yaml); " + LOGS))
    elif source_error:
        out.append(_finding("sync", "warning", f"peer source: {source_error} (the last good list stays in force)",
                            "fix the peer source; " + LOGS))
    last_error: object = getattr(status, "last_error", "")
    if status is not None and last_error and not getattr(status, "published", True):
        out.append(_finding("sync", "warning", f"this node's state is not published yet: {status.last_error}",
                            "other nodes keep the old view of this node until it is; check API access: " + LOGS))
    invalid = getattr(status, "invalid_objects", None) or {}
    if invalid:
        names = [f"{name} ({why})" for name, why in sorted(invalid.items())]
        out.append(_finding("sync", "warning", f"{len(invalid)} WireguardNode object(s) ignored: {_some(names)}",
                            "kubectl get wireguardnodes -o yaml; the owning node's hook rewrites its object"))
    return out


def _publication(o: Observed) -> list[dict[str, str]]:
    """The API must hold this node's key and IPs, or peers cannot take what it sends (it then sends plaintext)."""
    publication = o.publication
    state = publication["state"]
    if state in ("confirmed", "unknown", "opted-out") or (state in ("pending", "unreachable")
                                                          and not publication["overdue"]):
        return []
    fixes = {
        "denied": "check the hook's RBAC and the admission policy (conf/rbac.yaml) and that nodeName / NODE_NAME "
                  "is this node's Node name: kubectl auth can-i update wireguardnodes/status --as "
                  "system:serviceaccount:kube-system:wgcni-node; " + LOGS,
        "unreachable": "check that the node reaches the API server; " + LOGS,
        "stale": "the hook rewrites its object within seconds; if it does not, " + LOGS,
        "pending": "writes are rate limited to a few per second; if it stays, " + LOGS,
    }
    severity = "warning" if state == "pending" else "error"
    return [_finding("publication", severity, f"this node's publication is {state} "
                     f"({publication['unpublishedSeconds']:.0f}s): {publication['message']}", fixes[state])]


def _reconcile(o: Observed) -> list[dict[str, str]]:
    if o.last_error:
        return [_finding("reconcile", "error", f"the last dataplane pass failed: {o.last_error} (retrying)",
                         "see the error; " + LOGS)]
    return []


def _device(o: Observed) -> list[dict[str, str]]:
    spec, device = o.targets.device, o.device
    if device is None:
        return [_finding("device", "error", f"WireGuard device {spec.name} does not exist",
                         "the hook recreates it; if it keeps disappearing, look for another agent removing it; "
                         + LOGS)]
    wrong = []
    if not device.up:
        wrong.append("is down")
    if device.public_key != spec.public_key:
        wrong.append("holds another key than this node's")
    if device.listen_port != spec.listen_port:
        wrong.append(f"listens on {device.listen_port}, not {spec.listen_port}")
    if device.fwmark != spec.fwmark:
        wrong.append(f"has fwmark {device.fwmark:#x}, not {spec.fwmark:#x}")
    if wrong:
        return [_finding("device", "error", f"WireGuard device {spec.name} " + "; ".join(wrong),
                         "the hook resets it; something else is configuring the device: " + LOGS)]
    return []


def _mtu(o: Observed) -> list[dict[str, str]]:
    environment, device = o.environment, o.device
    out = []
    if device is not None and device.mtu != environment.mtu:
        out.append(_finding("mtu", "error", f"device MTU is {device.mtu}, the hook wants {environment.mtu} "
                            f"({environment.mtu_reason})", "the hook resets it; something else changes it: " + LOGS))
    current = underlay_mtu(environment.underlay_interface)
    if current is None:
        return out
    version = ipaddress.ip_address(environment.endpoint).version
    needed = environment.mtu + WIREGUARD_OVERHEAD[version] + (AZURE_UNDERLAY_LOSS if environment.azure else 0)
    if current < needed:
        out.append(_finding("mtu", "error", f"underlay {environment.underlay_interface} MTU is {current}, but "
                            f"WireGuard MTU {environment.mtu} needs {needed}: large packets are dropped",
                            "restart wgcni-node to detect the MTU again, or lower 'mtu' in the settings"))
    elif current != environment.underlay_mtu:
        out.append(_finding("mtu", "warning", f"underlay {environment.underlay_interface} MTU changed from "
                            f"{environment.underlay_mtu} to {current} since start",
                            "restart wgcni-node so the WireGuard MTU follows it"))
    return out


def _peers(o: Observed) -> list[dict[str, str]]:
    if o.device is None:
        return []
    desired = o.desired_peers
    reshape, removals, adds = plan_peers(desired, o.device.peers)
    missing = sorted({desired[op.public_key].node for op in reshape + removals + adds if op.public_key in desired})
    extra = sorted(op.public_key[:8] + "..." for op in removals if isinstance(op, RemovePeer))
    out = []
    if missing:
        out.append(_finding("peers", "error", f"{len(missing)} peer(s) missing or with wrong AllowedIPs/endpoint on "
                            f"the device: {_some(missing)}", "the hook re-programs a peer written by others as "
                            "soon as it sees the write (wireguard-go: every `wg set` passes its UAPI proxy; kernel: "
                            "with nlmon, see `monitor` in `wgcni status --json`), every peer at the next resync (every "
                            f"{o.settings.resync_interval:g} s); still wrong after that: " + LOGS))
    if extra and o.peers_complete:
        out.append(_finding("peers", "warning", f"{len(extra)} unknown peer(s) on the device: {_some(extra)}",
                            "the hook removes them; something else adds peers to the device"))
    return out


def _rules(o: Observed) -> list[dict[str, str]]:
    ops = plan_rules(o.targets.rules, o.table.rules)
    missing = [op.rule.describe() for op in ops if isinstance(op, AddRule)]
    foreign = [op.rule.describe() for op in ops if isinstance(op, DeleteRule)]
    out = []
    if missing:
        out.append(_finding("rules", "error", f"ip rule missing: {_some(missing)}; pod traffic bypasses WireGuard",
                            "the hook re-adds it within seconds; if it keeps disappearing, another agent deletes "
                            "rules pointing at table " + str(o.settings.route_table)))
    if foreign:
        out.append(_finding("rules", "warning", f"unexpected rule(s) pointing at table "
                            f"{o.settings.route_table}: {_some(foreign)}", "the hook removes them"))
    return out


def _routes(o: Observed) -> list[dict[str, str]]:
    desired, actual = o.desired_routes, o.table.routes
    # plan_routes' rule (a route is wrong when the table does not hold exactly the wanted kind; a route nobody
    # wants is extra), applied without sorting the whole table: only the examples shown are ordered, so a check of
    # a badly damaged table stays fast (docs/benchmarks.md, P8).
    wrong_routes = [(prefix, kind) for prefix, kind in desired.items() if actual.get(prefix) != kind]  # str enum
    extra_routes = [prefix for prefix in actual if prefix not in desired]
    wrong = [f"{prefix} ({kind.value})" for prefix, kind in heapq.nsmallest(EXAMPLES, wrong_routes, key=_route_order)]
    extra = [str(prefix) for prefix in heapq.nsmallest(EXAMPLES, extra_routes, key=_prefix_order)]
    out = []
    if wrong:
        out.append(_finding("routes", "error", f"{len(wrong_routes)} route(s) missing or wrong in table "
                            f"{o.settings.route_table}: {_some(wrong, len(wrong_routes))}",
                            "the hook repairs a route within a second of its change or removal (netlink "
                            "notifications) and the whole table at each resync; if routes keep disappearing, "
                            f"another agent flushes table {o.settings.route_table}"))
    if extra and o.peers_complete:
        out.append(_finding("routes", "warning", f"{len(extra_routes)} route(s) in table {o.settings.route_table} "
                            f"that the hook does not want: {_some(extra, len(extra_routes))}",
                            "the hook removes them"))
    if any(isinstance(op, AddDeviceAddress) for op in plan_device_address(o.table.device_addresses)):
        out.append(_finding("routes", "error", f"{o.settings.interface} lost its address; the reverse-path "
                            "check drops tunnelled replies", "the hook re-adds it; " + LOGS))
    return out


def _prefix_order(prefix: Any) -> tuple[int, int]:
    return prefix.version, int(prefix.network_address)


def _route_order(route: tuple[Any, Any]) -> tuple[int, int]:
    return _prefix_order(route[0])


def _sysctls(o: Observed) -> list[dict[str, str]]:
    wanted, actual = o.targets.sysctls, o.sysctls
    wrong = [f"{name.replace('/', '.')} is {actual.get(name)}, needs {value}"
             for name, value in plan_sysctls(wanted, actual).items()]
    if wrong:
        return [_finding("sysctls", "error", "; ".join(wrong), "the hook restores them at its next full resync "
                         "(resyncInterval, 90 s by default); if they keep coming back, another agent (sysctl.d, a "
                         "node tuning DaemonSet) resets them: make it leave these keys alone")]
    return []


def _firewall(o: Observed) -> list[dict[str, str]]:
    if not o.firewall_present:
        name = o.targets.firewall.table
        return [_finding("firewall", "error", f"nftables table inet {name} is missing: WireGuard's own packets "
                         "are not marked and may loop", "the hook recreates it; something flushes the ruleset "
                         "(nft flush ruleset / iptables-restore with nft backend?)")]
    return []


def _hits(strict: dict[str, Any], direction: str) -> str:
    top = strict.get("top", {}).get(direction) or []
    return _some([f"{hit['address']} ({hit['packets']})" for hit in top])


def _strict(o: Observed) -> list[dict[str, str]]:
    strict = o.strict
    if not strict or strict.get("mode") == "off":
        return []
    if "error" in strict:
        return [_finding("strict", "warning", f"cannot read the strict table's counters: {strict['error']}", LOGS)]
    if not strict.get("tablePresent"):
        severity = "error" if strict["mode"] == "strict" else "warning"
        return [_finding("strict", severity, f"nftables table {strict['table']} is missing: plaintext between "
                         "WireGuard nodes is neither dropped nor counted", "the hook recreates it at its next pass; "
                         "something flushes the ruleset (nft flush ruleset?)")]
    growth = strict.get("growth")
    if growth is None:
        return []
    out = []
    seconds = strict.get("sampledSeconds", 0)
    for direction, what in (("out", "to cluster addresses not reached through the tunnel (destinations hit most: "),
                            ("in", "into local pods from WireGuard nodes' addresses (sources hit most: ")):
        if strict["mode"] == "strict" and growth["dropped"][direction] > 0:
            out.append(_finding("strict", "warning", f"strict mode keeps dropping plaintext packets {what}"
                                f"{_hits(strict, direction)}): {growth['dropped'][direction]} in {seconds:g} s, "
                                f"{strict['dropped'][direction]} in all",
                                "a destination no peer programs: a pod that is new for a moment, a node whose hook "
                                "is down or cannot publish (`wgcni peers`, its `wgcni check`), or an address outside "
                                "the WireGuard nodes that belongs in strictAllow"))
        elif strict["mode"] != "strict" and growth["counted"][direction] > 0:
            out.append(_finding("strict", "info", f"{growth['counted'][direction]} plaintext packet(s) in {seconds:g}"
                                f" s {what}{_hits(strict, direction)}): strict mode would drop them",
                                "see which node or address they go to before turning strictMode on"))
    return out


def _conflicts(o: Observed) -> list[dict[str, str]]:
    out = []
    by_kind: dict[str, list[str]] = {}
    for problem in o.problems:
        by_kind.setdefault(problem.kind, []).append(problem.message)
    if "key-conflict" in by_kind:
        out.append(_finding("conflicts", "error", "; ".join(by_kind["key-conflict"][:EXAMPLES]),
                            "two nodes share a private key (cloned disk image?): run 'wgcni-node rotate-key' on all "
                            "but one of them (make-before-break, no restart)"))
    if "ip-conflict" in by_kind:
        claims = by_kind["ip-conflict"]
        out.append(_finding("conflicts", "error", f"{len(claims)} IP(s) claimed by more than one node: "
                            f"{_some(claims)}", "a stale pod record on the losing node; run 'wgcni pods' there "
                            "and remove the pod, or wait for the CNI GC"))
    if "no-endpoint" in by_kind:
        out.append(_finding("conflicts", "warning", _some(by_kind["no-endpoint"]),
                            "that node's hook has not published an endpoint; check it with 'wgcni status' there"))
    if "no-key" in by_kind:
        out.append(_finding("conflicts", "info", f"{len(by_kind['no-key'])} node(s) without WireGuard (opted out "
                            f"or not running wgcni): {_some(by_kind['no-key'])}",
                            "intended for nodes labelled wgcni.io/wireguard=disabled; otherwise check their hook"))
    return out


def _handshakes(o: Observed) -> list[dict[str, str]]:
    if o.device is None:
        return []
    now = time.time()
    never, stale = [], []
    for key, peer in o.desired_peers.items():
        state = o.device.peers.get(key)
        if state is None:
            continue
        if state.latest_handshake == 0 and state.tx_bytes > 0:
            never.append(peer.node)
        elif (peer.persistent_keepalive and state.latest_handshake
              and now - state.latest_handshake > HANDSHAKE_REJECT_AFTER + peer.persistent_keepalive):
            stale.append(f"{peer.node} ({now - state.latest_handshake:.0f}s ago)")
    out = []
    if never:
        out.append(_finding("handshakes", "warning", f"no handshake with {len(never)} peer(s) although packets "
                            f"were sent: {_some(sorted(never))}", "check that UDP "
                            f"{o.settings.listen_port} is open between the nodes (NSG) and that the peer's "
                            "published key is the one its device holds ('wgcni status' there)"))
    if stale:
        out.append(_finding("handshakes", "warning", f"{len(stale)} peer(s) with keepalive have a stale handshake: "
                            f"{_some(sorted(stale))}", "the peer is down or UDP is blocked on the way; check it"))
    return out


def _records(o: Observed) -> list[dict[str, str]]:
    out = []
    if o.record_errors:
        out.append(_finding("records", "warning", f"{len(o.record_errors)} pod record(s) unreadable: "
                            f"{_some(o.record_errors)}", "those pods are not programmed; recreate the pods or "
                            "remove the broken files under <stateDir>/pods"))
    if o.unrecorded_pods:
        described = [f"{','.join(pod['ips'])} on {pod['hostInterface']}" for pod in o.unrecorded_pods]
        out.append(_finding("records", "warning", f"{len(o.unrecorded_pods)} pod(s) have no pod record: "
                            f"{_some(described)}; the hook learned their IPs from the node's routes and encrypts "
                            "them, but without a record their IPs are known only once azure-vnet's route exists "
                            "and they carry no pod name", "they predate wgcni or started while the conflist lacked "
                            "the wgcni entry: recreate them (kubectl delete pod) once 'wgcni check' shows no "
                            "conflist finding"))
    return out


def _conflist(conf_dir: Path) -> list[dict[str, str]]:
    path = active_config(conf_dir)
    if path is None:
        return [_finding("conflist", "error", f"no CNI config in {conf_dir}: the runtime cannot start pods",
                         "Azure CNS writes it at node start; check the node's CNI installation")]
    try:
        text = path.read_text()
    except OSError as error:
        return [_finding("conflist", "warning", f"cannot read {path}: {error.strerror}",
                         "mount the CNI config dir into the hook (conf/daemonset.yaml) to check it")]
    if not has_entry(text):
        return [_finding("conflist", "error", f"{path} has no wgcni entry: new pods start without a pod record "
                         "(the hook learns them from their routes, later and without their names)",
                         "check the install-cni-watch container (kubectl -n kube-system logs ds/wgcni-node -c "
                         "install-cni-watch); 'wgcni-node install-cni' re-inserts it")]
    return []
