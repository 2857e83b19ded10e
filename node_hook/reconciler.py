"""One reconcile pass: model changes + read-back -> planner -> appliers, with one in-sync flag per aspect.

When an aspect is in sync, only the model's dirty peer keys / prefixes are diffed against what was last applied
(O(change)): for peers a cache of the desired peers of the last pass, for routes the kinds the model hands over with
its changes (what it wanted at the last pass is what the table holds; no copy of a 1.25 M-route table is kept).
Any error, or an outside event (the netlink monitor: device, rule, address, nftables table or sysctl changed;
wireguard-go exited), clears that aspect's flag; the next pass reads the whole aspect back from the kernel and diffs
all of it. The `rules` aspect reads the rules and the device's address only, never the table's routes; a route seen
changed or removed outside is rechecked alone (`recheck_routes`: set as the model wants it, or deleted), so
repairing a rule or a route costs no dump of a 1.25 M-route table; likewise a peer written outside (`recheck_peers`:
programmed whole again, or removed), without reading back a device of 5 000 peers.
An aspect whose ops were not all applied stays out of sync, so a pass that fails half-way converges on the next.

The device step is applied before the rest is planned, because whether the device had to be (re)created decides
what the peers look like; everything else follows `planner.APPLY_ORDER`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from node_hook.addresses import IPNetwork
from node_hook.contracts import (
    FOREIGN_ROUTE,
    DeviceSpec,
    DeviceStream,
    FirewallApplier,
    FirewallSpec,
    PeerOp,
    PeerState,
    RemovePeer,
    RoutingApplier,
    RuleSpec,
    SysctlApplier,
    WireGuardBackend,
)
from node_hook.model import Changes, DesiredPeer, NodeModel, RouteKind, paused_gc
from node_hook.planner import (
    APPLY_ORDER,
    Plan,
    RouteSets,
    greetings,
    only_key_differs,
    plan_device,
    plan_device_address,
    plan_firewall,
    plan_peers,
    plan_peers_streamed,
    plan_routes,
    plan_routes_counted,
    plan_routes_streamed,
    plan_rules,
    plan_sysctls,
)

log = logging.getLogger(__name__)

ASPECTS = ("firewall", "device", "sysctls", "peers", "routes", "rules")
_ASPECT_OF_STEP = {
    "firewall": "firewall", "device": "device", "device_address": "rules", "sysctls": "sysctls",
    "peer_reshape": "peers", "peer_removals": "peers", "peer_adds": "peers", "route_deletes": "routes",
    "route_sets": "routes", "rules": "rules",
}


@dataclass(frozen=True)
class Targets:
    """Desired state that does not come from the model."""

    device: DeviceSpec
    rules: frozenset[RuleSpec]
    firewall: FirewallSpec
    sysctls: dict[str, str]


@dataclass(frozen=True)
class PassResult:
    applied: dict[str, int]  # step -> number of ops (1 for firewall/device)
    error: str | None  # the one error of this pass (the pass stops at the first)
    full: tuple[str, ...]  # aspects that were read back in full
    failed_step: str | None = None  # the step `error` happened in (metrics count errors by step)


def _merged(earlier: Changes | None, later: Changes) -> Changes:
    """`later` on top of `earlier`'s unapplied changes: a route keeps the kind it had before both (what the table
    holds), any overflow stays an overflow."""
    if earlier is None:
        return later
    if earlier.previous_routes is None or later.previous_routes is None:
        routes = None
    else:
        routes = {**later.previous_routes, **earlier.previous_routes}
    return Changes(earlier.peer_keys | later.peer_keys, routes)


def _drain(device: DeviceStream | None) -> None:
    """Take the rest of a device's stream (a backend's read-back is taken whole), for a pass that does not diff its
    peers."""
    if device is not None:
        for _ in device.peers:
            pass


def _as_state(peer: DesiredPeer) -> PeerState:
    return PeerState(peer.public_key, peer.endpoint, peer.allowed_ips, peer.persistent_keepalive)


class Reconciler:
    def __init__(
        self,
        model: NodeModel,
        targets: Targets,
        wireguard: WireGuardBackend,
        routing: RoutingApplier,
        firewall: FirewallApplier,
        sysctls: SysctlApplier,
        on_step: Callable[[str, int], None] | None = None,
    ) -> None:
        self.model = model
        self.targets = targets
        self.wireguard = wireguard
        self.routing = routing
        self.firewall = firewall
        self.sysctls = sysctls
        self.on_step = on_step
        self.in_sync = {aspect: False for aspect in ASPECTS}
        self._peers: dict[str, PeerState] = {}  # what the device holds, as far as we know (valid when in sync)
        self._rules: frozenset[RuleSpec] = frozenset()
        self._rules_changed = False  # the desired rules changed since the last pass: diff them against `_rules`
        self._firewall_listing: str | None = None
        self._firewall_spec: FirewallSpec | None = None  # what `_firewall_listing` is the listing of
        self._recheck_routes: set[IPNetwork] = set()  # prefixes whose route the table may not hold as last applied
        self._recheck_peers: set[str] = set()  # peers the device may not hold as last applied
        # The model's changes taken by a pass that failed: an aspect that stayed in sync has not applied them yet,
        # so the next pass diffs them too (else a failure in another step - the device's, say - lost them for good).
        self._unapplied: Changes | None = None
        self.passes = 0
        self.errors = 0
        # False until the peer source delivered its first complete list: peers and routes the model does not know
        # (yet) are then left alone, so a restarted hook never wipes a live mesh (the routes to pods it knows, and
        # local pods' throw routes, are still programmed).
        self.prune = True

    def set_rules(self, rules: frozenset[RuleSpec]) -> None:
        """New desired rules (the bypass rules follow what the API holds of this node's publication). Applied by
        the next pass as a diff against the rules last applied; no read-back of the table while it is in sync."""
        if rules != self.targets.rules:
            self.targets = replace(self.targets, rules=rules)
            self._rules_changed = True

    def set_device_key(self, private_key: bytes, public_key: str) -> None:
        """A key rotation switched: the next pass gives the device this key (its peers stay) and greets every peer."""
        self.targets = replace(self.targets, device=replace(self.targets.device, private_key=private_key,
                                                            public_key=public_key))
        self.in_sync["device"] = False

    def set_firewall(self, spec: FirewallSpec) -> None:
        """The desired firewall (the strict table follows the remote nodes and the strict settings); the next pass
        applies it when it differs from the one last applied (compared there, once per pass)."""
        self.targets = replace(self.targets, firewall=spec)

    def recheck_routes(self, prefixes: Iterable[IPNetwork]) -> None:
        """Routes of our table seen changed or removed outside: the next pass sets each as the model wants it (or
        deletes it), without reading the whole table back."""
        self._recheck_routes.update(prefixes)

    def recheck_peers(self, keys: Iterable[str]) -> None:
        """Peers written outside (node_hook.contracts.WireGuardChange): the next pass programs each desired one whole
        (endpoint, keepalive, AllowedIPs replaced) and removes the others, without reading the device back."""
        self._recheck_peers.update(keys)

    def _unknown_peers(self, keys: frozenset[str]) -> dict[str, PeerState]:
        """The peer cache with `keys` unknown: a desired one as absent (re-added whole), another present (removed)."""
        actual = dict(self._peers)
        desired = self.model.peers
        for key in keys:
            actual.pop(key, None)
            if key not in desired:
                actual[key] = PeerState(key, None, frozenset(), 0)
        return actual

    def mark_out_of_sync(self, *aspects: str) -> None:
        for aspect in aspects or ASPECTS:
            self.in_sync[aspect] = False

    @property
    def converged(self) -> bool:
        return all(self.in_sync.values())

    def reconcile(self) -> PassResult:
        """One pass. Never raises for applier errors: returns the error and leaves the aspect out of sync."""
        with paused_gc():  # a full pass builds and diffs a million objects at 5 000 x 250 (see model.paused_gc)
            return self._reconcile()

    def _reconcile(self) -> PassResult:
        self.passes += 1
        changes = _merged(self._unapplied, self.model.take_changes())
        self._unapplied = None
        rechecked, self._recheck_routes = self._recheck_routes, set()
        rechecked_peers, self._recheck_peers = frozenset(self._recheck_peers), set()
        applied: dict[str, int] = {}
        full: list[str] = [aspect for aspect in ASPECTS if not self.in_sync[aspect]]
        step = "read"
        device: DeviceStream | None = None  # a device read back for the device step, its peers for the peers step
        try:
            step = "device"
            if not self.in_sync["device"]:
                device = self.wireguard.read_stream()
                spec = plan_device(self.targets.device, device.device if device is not None else None)
                if spec is not None:
                    rekey = only_key_differs(spec, device.device if device is not None else None)
                    _drain(device)  # it is about to change
                    device = None
                    self.wireguard.ensure_device(spec)
                    applied["device"] = 1
                    self._step_done("device", 1)
                    if rekey:  # every session ended with the old key: each peer is greeted to start a new one
                        self.wireguard.greet({peer.public_key: peer.persistent_keepalive
                                              for peer in self.model.peers.values() if peer.endpoint is not None})
                    else:
                        # A (re)created device has no peers, its routes went with the old link and its own sysctls
                        # are back to defaults: read those aspects back in full.
                        for aspect in ("peers", "routes", "sysctls"):
                            self.in_sync[aspect] = False
                            if aspect not in full:
                                full.append(aspect)
                self.in_sync["device"] = True
            step = "read"
            plan = Plan()
            # The peers first: a device read back for the device step is still streaming.
            if self.in_sync["peers"]:
                _drain(device)
                device = None
                peer_scope: frozenset[str] | None = changes.peer_keys
                actual_peers: Mapping[str, PeerState] = self._peers
                if rechecked_peers:  # what the device holds of these is not known: programmed whole again
                    peer_scope = changes.peer_keys | rechecked_peers
                    actual_peers = self._unknown_peers(rechecked_peers)
                plan.peer_reshape, plan.peer_removals, plan.peer_adds = plan_peers(self.model.peers, actual_peers,
                                                                                   peer_scope)
                del actual_peers
            else:
                if device is None:
                    device = self.wireguard.read_stream()
                self._peers = {}  # refilled from the model once applied
                peer_scope = None
                # Streamed: one read-back peer at a time, never the whole device.
                plan.peer_reshape, plan.peer_removals, plan.peer_adds = plan_peers_streamed(
                    self.model.peers, device.peers if device is not None else ())
                device = None
            if not self.in_sync["firewall"]:
                plan.firewall = plan_firewall(self.targets.firewall, self.firewall.read(), self._firewall_listing,
                                              self._firewall_spec)
            elif self.targets.firewall != self._firewall_spec:
                plan.firewall = self.targets.firewall
            if not self.in_sync["sysctls"]:
                plan.sysctls = plan_sysctls(self.targets.sysctls, self.sysctls.read(sorted(self.targets.sysctls)))
            if changes.previous_routes is None:  # a bulk change: any route may differ, read the table back
                self.in_sync["routes"] = False
                if "routes" not in full:
                    full.append("routes")
            actual_routes: Mapping[IPNetwork, str | None]
            if self.in_sync["routes"]:
                actual_routes = changes.previous_routes  # type: ignore[assignment]
                if not self.in_sync["rules"]:  # a rule to repair: the rules read back, not the 1.25 M routes
                    self._read_rules(plan)
                if rechecked:  # what the table holds there is not known: replaced (or deleted) as the model wants
                    actual_routes = {**actual_routes, **dict.fromkeys(rechecked, FOREIGN_ROUTE)}
                plan.route_deletes, plan.route_sets = plan_routes(self.model.routes, actual_routes, actual_routes)
            else:
                # Streamed too: what is kept of the table is the kind of each route to delete.
                table = self.routing.read_stream()
                self._rules = table.table.rules
                plan.device_address = plan_device_address(table.table.device_addresses)
                planned = plan_routes_counted(self.model.routes, table.routes)
                if planned is None:  # some desired routes are missing: which ones takes a second read
                    planned = plan_routes_streamed(self.model.routes, self.routing.read_stream().routes)
                plan.route_deletes, plan.route_sets, actual_routes = planned
            if not self.in_sync["rules"] or self._rules_changed:
                plan.rules = plan_rules(self.targets.rules, self._rules)
            held_back = False if self.prune else self._hold_back_pruning(plan, actual_routes)
            del actual_routes
            # An aspect is in sync again only once all its steps below have been applied.
            touched = {_ASPECT_OF_STEP[name] for name, _ in plan.steps()}
            for aspect in touched:
                self.in_sync[aspect] = False
            for name, payload in plan.steps():
                step = name
                self._apply(name, payload)
                count = len(payload) if isinstance(payload, (list, dict, RouteSets)) else 1
                applied[name] = count
                self._step_done(name, count)
            self._remember(peer_scope)
            self._rules_changed = False
            for aspect in ASPECTS:
                self.in_sync[aspect] = True
            if held_back:  # the kernel still holds what was not pruned: read it back once pruning is allowed
                self.in_sync["peers"] = self.in_sync["routes"] = False
            return PassResult(applied, None, tuple(full))
        except Exception as error:  # noqa: BLE001 - every applier error is reported once and retried in full
            self._unapplied = changes
            self._recheck_routes |= rechecked
            self._recheck_peers |= rechecked_peers
            failed_aspect = _ASPECT_OF_STEP.get(step)
            self.mark_out_of_sync(*([failed_aspect] if failed_aspect else ASPECTS))
            self.errors += 1
            message = f"{step}: {error}"
            log.warning("reconcile failed in %s (will read back and retry): %s", step, error)
            return PassResult(applied, message, tuple(full), step)

    def _read_rules(self, plan: Plan) -> None:
        """The table's rules and the device's address read back (no routes) into the rule cache and `plan`."""
        table = self.routing.read(routes=False)
        self._rules = table.rules
        plan.device_address = plan_device_address(table.device_addresses)

    def _hold_back_pruning(self, plan: Plan, actual_routes: Mapping[IPNetwork, str | None]) -> bool:
        """Drop peer removals and deletions of `dev` routes from `plan`; True when something was dropped.
        (Deleting a `throw` route changes nothing for traffic: without a route the lookup leaves the table too.)"""
        peer_removals: list[PeerOp] = [op for op in plan.peer_removals if not isinstance(op, RemovePeer)]
        route_deletes = [op for op in plan.route_deletes
                         if actual_routes.get(op.prefix) != RouteKind.WIREGUARD.value]  # type: ignore[union-attr]
        held_back = len(peer_removals) != len(plan.peer_removals) or len(route_deletes) != len(plan.route_deletes)
        plan.peer_removals, plan.route_deletes = peer_removals, route_deletes
        return held_back

    def _step_done(self, name: str, count: int) -> None:
        if self.on_step is not None:
            self.on_step(name, count)

    def _apply(self, name: str, payload: object) -> None:
        if name == "firewall":
            self._firewall_spec = None  # until the apply returns: a failed one leaves the kernel unknown
            self._firewall_listing = self.firewall.apply(payload)  # type: ignore[arg-type]
            self._firewall_spec = payload  # type: ignore[assignment]
        elif name == "sysctls":
            self.sysctls.write(payload)  # type: ignore[arg-type]
        elif name in ("peer_reshape", "peer_removals", "peer_adds"):
            self.wireguard.apply_peer_ops(payload)  # type: ignore[arg-type]
            if name == "peer_adds":
                self.wireguard.greet(greetings(payload))  # type: ignore[arg-type]
        else:
            self.routing.apply(payload)  # type: ignore[arg-type]

    def _remember(self, peer_scope: frozenset[str] | None) -> None:
        """After a fully applied pass the device holds the desired peers for everything in scope (the table needs no
        record: the model's next changes carry the routes it wants now)."""
        desired_peers = self.model.peers
        if peer_scope is None:
            self._peers = {key: _as_state(peer) for key, peer in desired_peers.items()}
        else:
            for key in peer_scope:
                if key in desired_peers:
                    self._peers[key] = _as_state(desired_peers[key])
                else:
                    self._peers.pop(key, None)
        self._rules = self.targets.rules


__all__ = ["APPLY_ORDER", "ASPECTS", "PassResult", "Reconciler", "Targets"]
