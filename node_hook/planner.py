"""Planner (pure): desired state vs state read back from the appliers -> ordered operations.

Only objects the hook owns are ever diffed: its WireGuard device and peers, the routes in its table, the rules
pointing at its table, its own nftables table and the sysctls it sets. Every diff function takes an optional
scope (the peer keys / prefixes the model marked dirty) so an event costs O(what changed), and diffs everything
when the scope is None (after an error or at the periodic resync).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from node_hook.addresses import IPNetwork
from node_hook.addresses import prefix_order as _prefix_order
from node_hook.contracts import (
    DEVICE_ADDRESS,
    FOREIGN_ROUTE,
    MAIN_TABLE,
    AddDeviceAddress,
    AddRule,
    DeleteRoute,
    DeleteRule,
    DeviceSpec,
    DeviceState,
    FirewallSpec,
    PeerOp,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    RoutingOp,
    RuleSpec,
    SetRoute,
    UpsertPeer,
)
from node_hook.model import DesiredPeer, Publication, RouteKind

# The apply order, in ONE place. Each step runs only after the previous one succeeded.
APPLY_ORDER: tuple[str, ...] = (
    "firewall",  # rp_filter marks and the WireGuard port first: nothing below may make plaintext replies drop
    "device",  # the WireGuard device (key, port, fwmark, MTU, up) before anything refers to it
    "device_address",  # its link-scope address, without which the reverse-path check drops what it receives
    "sysctls",  # src_valid_mark (so the marks count in the reverse-path check) and the device's rp_filter
    "peer_reshape",  # a peer's new prefixes that only regroup IPs it already has: no IP ever has no peer
    "peer_removals",  # IPs leave old peers (and IPs that became local leave every peer) before anyone gains them
    "route_deletes",  # route deletes before adds
    "route_sets",  # throw for new local IPs (their peers lost them above); dev routes before peers gain the IPs,
    #                so a moving IP is briefly dropped, never sent in plaintext
    "peer_adds",  # new peers, new IPs, endpoint/keepalive changes
    "rules",  # the rule last, once device, peers and routes are in place
)


_KINDS: tuple[RouteKind, ...] = tuple(RouteKind)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}


class RouteSets(Sequence[SetRoute]):
    """The `route_sets` step: SetRoute ops made one at a time as the applier takes them. A full plan at 5 000 x 250
    scattered pod IPs sets 1.25 M routes: a list of prefixes and a byte per kind is a fraction of 1.25 M op objects
    (docs/benchmarks.md, P3)."""

    __slots__ = ("_prefixes", "_kinds")

    def __init__(self, ops: Iterable[SetRoute] = ()) -> None:
        self._prefixes: list[IPNetwork] = []
        self._kinds = bytearray()
        for op in ops:
            self.add(op.prefix, op.kind)

    def add(self, prefix: IPNetwork, kind: RouteKind) -> None:
        self._prefixes.append(prefix)
        self._kinds.append(_KIND_CODES[kind])

    def __len__(self) -> int:
        return len(self._prefixes)

    @overload
    def __getitem__(self, index: int) -> SetRoute: ...

    @overload
    def __getitem__(self, index: slice) -> list[SetRoute]: ...

    def __getitem__(self, index: int | slice) -> SetRoute | list[SetRoute]:
        if isinstance(index, slice):
            return list(map(SetRoute, self._prefixes[index], map(_KINDS.__getitem__, self._kinds[index])))
        return SetRoute(self._prefixes[index], _KINDS[self._kinds[index]])

    def __iter__(self) -> Iterator[SetRoute]:
        return map(SetRoute, self._prefixes, map(_KINDS.__getitem__, self._kinds))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RouteSets, list)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RouteSets({list(self)!r})"


@dataclass
class Plan:
    firewall: FirewallSpec | None = None
    device: DeviceSpec | None = None
    device_address: list[RoutingOp] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    peer_reshape: list[PeerOp] = field(default_factory=list)
    peer_removals: list[PeerOp] = field(default_factory=list)
    route_deletes: list[RoutingOp] = field(default_factory=list)
    route_sets: RouteSets = field(default_factory=RouteSets)
    peer_adds: list[PeerOp] = field(default_factory=list)
    rules: list[RoutingOp] = field(default_factory=list)

    def steps(self) -> list[tuple[str, object]]:
        """(step name, payload) in APPLY_ORDER, empty steps left out."""
        return [(name, getattr(self, name)) for name in APPLY_ORDER if getattr(self, name)]

    def __bool__(self) -> bool:
        return bool(self.steps())


def plan_device(spec: DeviceSpec, actual: DeviceState | None) -> DeviceSpec | None:
    """The spec to ensure when the device is missing or differs in key, port, fwmark, MTU or link state."""
    if (
        actual is None
        or not actual.up
        or actual.public_key != spec.public_key
        or actual.listen_port != spec.listen_port
        or actual.fwmark != spec.fwmark
        or actual.mtu != spec.mtu
    ):
        return spec
    return None


def only_key_differs(spec: DeviceSpec, actual: DeviceState | None) -> bool:
    """A key rotation's switch: the device is up and as wanted but for its private key (its peers stay)."""
    return (actual is not None and actual.up and actual.public_key != spec.public_key
            and (actual.listen_port, actual.fwmark, actual.mtu) == (spec.listen_port, spec.fwmark, spec.mtu))


def greetings(ops: Iterable[PeerOp]) -> dict[str, int]:
    """The peers of `ops` that are new on the device (added whole, with an endpoint) -> their persistent keepalive:
    each is sent one keepalive, so the pair has a session at once (see WireGuardBackend.greet)."""
    return {op.public_key: op.persistent_keepalive for op in ops
            if isinstance(op, UpsertPeer) and op.replace_allowed_ips and op.endpoint is not None}


def _normal_endpoint(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
    if endpoint is None:
        return None
    return (str(ipaddress.ip_address(endpoint[0])), endpoint[1])


def _within(prefix: IPNetwork, covering: frozenset[IPNetwork]) -> bool:
    """True when `prefix` lies inside one of `covering` (the IPs it names already route to that peer)."""
    return any(prefix.supernet(new_prefix=length) in covering for length in range(prefix.prefixlen, -1, -1))


def plan_peers(
    desired: Mapping[str, DesiredPeer],
    actual: Mapping[str, PeerState],
    keys: Iterable[str] | None = None,
) -> tuple[list[PeerOp], list[PeerOp], list[PeerOp]]:
    """(reshape, removals, adds) for the peers named by `keys` (all when None)."""
    scope = sorted(set(desired) | set(actual)) if keys is None else sorted(set(keys))
    reshape: list[PeerOp] = []
    removals: list[PeerOp] = []
    adds: list[PeerOp] = []
    for key in scope:
        _plan_peer(key, desired.get(key), actual.get(key), reshape, removals, adds)
    return reshape, removals, adds


def plan_peers_streamed(
    desired: Mapping[str, DesiredPeer], actual: Iterable[PeerState]
) -> tuple[list[PeerOp], list[PeerOp], list[PeerOp]]:
    """`plan_peers` of every peer against a device read back peer by peer: each peer is diffed as it arrives and
    let go, so a full diff holds one read-back peer at a time, not the whole device."""
    reshape: list[PeerOp] = []
    removals: list[PeerOp] = []
    adds: list[PeerOp] = []
    seen: set[str] = set()
    for have in actual:
        seen.add(have.public_key)
        _plan_peer(have.public_key, desired.get(have.public_key), have, reshape, removals, adds)
    for key in desired.keys() - seen:
        _plan_peer(key, desired[key], None, reshape, removals, adds)
    for ops in (reshape, removals, adds):  # in key order, as `plan_peers` makes them
        ops.sort(key=_op_key)
    return reshape, removals, adds


def _op_key(op: PeerOp) -> str:
    return op.public_key


def _plan_peer(key: str, want: DesiredPeer | None, have: PeerState | None, reshape: list[PeerOp],
               removals: list[PeerOp], adds: list[PeerOp]) -> None:
    if want is None:
        if have is not None:
            removals.append(RemovePeer(key))
        return
    if have is None:
        adds.append(UpsertPeer(key, want.endpoint, tuple(sorted(want.allowed_ips, key=_prefix_order)), True,
                               want.persistent_keepalive))
        return
    to_add = want.allowed_ips - have.allowed_ips
    to_remove = have.allowed_ips - want.allowed_ips
    regrouped = sorted((p for p in to_add if _within(p, have.allowed_ips)), key=_prefix_order)
    gained = sorted(to_add.difference(regrouped), key=_prefix_order)
    if regrouped:
        reshape.append(UpsertPeer(key, want.endpoint, tuple(regrouped), False, want.persistent_keepalive))
    if to_remove:
        removals.append(RemoveAllowedIPs(key, tuple(sorted(to_remove, key=_prefix_order))))
    settings_differ = (
        _normal_endpoint(have.endpoint) != _normal_endpoint(want.endpoint)
        or have.persistent_keepalive != want.persistent_keepalive
    )
    if gained or settings_differ:
        adds.append(UpsertPeer(key, want.endpoint, tuple(gained), False, want.persistent_keepalive))


def plan_routes(
    desired: Mapping[IPNetwork, RouteKind],
    actual: Mapping[IPNetwork, str | None],
    prefixes: Iterable[IPNetwork],
) -> tuple[list[RoutingOp], RouteSets]:
    """(deletes, sets) for `prefixes` (the ones that may differ). Foreign routes in our table are replaced."""
    ordered = sorted(set(prefixes), key=_prefix_order)
    deletes: list[RoutingOp] = []
    sets = RouteSets()
    for prefix in ordered:
        want = desired.get(prefix)
        have = actual.get(prefix)
        if want is None:
            if have is not None:
                deletes.append(DeleteRoute(prefix))
        elif have != want._value_ or have == FOREIGN_ROUTE:  # _value_: `.value` is a slow property (x3)
            sets.add(prefix, want)
    return deletes, sets


def plan_routes_counted(
    desired: Mapping[IPNetwork, RouteKind], actual: Iterable[tuple[IPNetwork, str | None]]
) -> tuple[list[RoutingOp], RouteSets, dict[IPNetwork, str]] | None:
    """`plan_routes` of every prefix against a table read back route by route, keeping nothing of it but the routes
    that differ: (deletes, sets, what the table holds for each deleted prefix). A table that has every desired
    prefix is recognised by counting them (a table holds a prefix once, or its few variants - metrics - one after
    the other); None when some are missing, which `plan_routes_streamed` then finds on a second read."""
    get = desired.get
    extra: dict[IPNetwork, str] = {}  # routes the model does not want: what the table holds (pruning needs it)
    different: list[IPNetwork] = []
    found = 0
    previous: IPNetwork | None = None
    for prefix, have in actual:
        want = get(prefix)
        if want is None:
            if have is not None:
                extra[prefix] = have
            continue
        if prefix != previous:
            found += 1
            previous = prefix
        if have != want._value_ or have == FOREIGN_ROUTE:  # _value_: `.value` is a slow property (x3)
            different.append(prefix)
    if found < len(desired):
        return None
    sets = RouteSets()
    for prefix in sorted(set(different), key=_prefix_order):
        sets.add(prefix, desired[prefix])
    deletes: list[RoutingOp] = [DeleteRoute(prefix) for prefix in sorted(extra, key=_prefix_order)]
    return deletes, sets, extra


# A byte per desired route while a streamed table is diffed: not in the table yet, as wanted, to be set.
_ABSENT, _AS_WANTED, _DIFFERENT = 0, 1, 2
_TO_SET = bytes.maketrans(bytes((_ABSENT, _AS_WANTED, _DIFFERENT)), b"\x01\x00\x01")


def plan_routes_streamed(
    desired: Mapping[IPNetwork, RouteKind], actual: Iterable[tuple[IPNetwork, str | None]]
) -> tuple[list[RoutingOp], RouteSets, dict[IPNetwork, str]]:
    """`plan_routes_counted` for a table that lacks desired routes (a hook starting, or damage): (deletes, sets,
    what the table holds for each deleted prefix). No read-back route is kept but the few to delete: the desired
    prefixes are sorted once (the model's own objects) with a byte each for what the table showed, and each route
    read back is found in that list - in O(1) while the table comes in network order, as the kernel dumps it, by
    bisection otherwise."""
    ordered = sorted(desired)  # packed prefixes: int order is network order, no key list
    count = len(ordered)
    seen = bytearray(count)
    extra: dict[IPNetwork, str] = {}  # routes the model does not want: what the table holds (pruning needs it)
    cursor = 0
    for prefix, have in actual:
        prefix = _prefix_order(prefix)
        if cursor < count and ordered[cursor] == prefix:
            index = cursor
        else:
            index = bisect_left(ordered, prefix)
            if index == count or ordered[index] != prefix:
                if have is not None:
                    extra[prefix] = have
                continue
        cursor = index + 1
        if seen[index] != _DIFFERENT:
            want = desired[ordered[index]]
            seen[index] = _DIFFERENT if have != want._value_ or have == FOREIGN_ROUTE else _AS_WANTED
    sets = RouteSets()
    marks = seen.translate(_TO_SET)
    del seen
    index = marks.find(1)
    while index >= 0:
        prefix = ordered[index]
        sets.add(prefix, desired[prefix])
        index = marks.find(1, index + 1)
    deletes: list[RoutingOp] = [DeleteRoute(prefix) for prefix in sorted(extra, key=_prefix_order)]
    return deletes, sets, extra


def desired_rules(priority: int, fwmark: int, table: int, tunnel: bool = True,
                  bypass_sources: Iterable[str] = ()) -> frozenset[RuleSpec]:
    """The tunnel rule `not fwmark M/M lookup <table>` for IPv4 and IPv6, and one priority earlier
    `from <source> lookup main` for each bypass source; no rule at all without `tunnel`."""
    if not tunnel:
        return frozenset()
    rules = {RuleSpec(family, priority, fwmark, fwmark, table, True) for family in (4, 6)}
    for source in bypass_sources:
        network = ipaddress.ip_network(source)
        rules.add(RuleSpec(network.version, priority - 1, 0, 0, MAIN_TABLE, False, network))
    return frozenset(rules)


def publication_gate(publication: Publication, public_key: str, local_ips: Iterable[str],
                     held_before: bool = True) -> tuple[bool, frozenset[str]]:
    """(tunnel, bypass sources): whether this node may send into the tunnel at all, and which of its own IPs must
    not, judged by what the API holds of its publication (peers program exactly that).

    Nothing seen yet: the tunnel as it is when the API held this key when last seen (`held_before`: a restarted
    hook must not drop a working mesh before its first list), else none - a key no peer can know (a reimage, a lost
    key file) must not send the node's first requests, those to the API server among them, into the tunnel.
    The API holds another key, or none: no tunnel - no peer could take what it sends, so the node's traffic stays
    in the main table (plaintext) instead of vanishing. The key a rotation announced as next counts as held: peers
    switch to it at the announced time (node_hook.rotation). Otherwise every local IP the API does not list yet is a
    bypass source: peers would drop it as an unallowed source, so it leaves by the main table until it is there."""
    if publication.state == "unknown":
        return held_before, frozenset()
    if not public_key or public_key not in (publication.public_key, publication.next_public_key):
        return False, frozenset()
    return True, frozenset(local_ips) - publication.ips


def plan_rules(desired: frozenset[RuleSpec], actual: frozenset[RuleSpec]) -> list[RoutingOp]:
    """Rules of ours that are not exactly desired are deleted first, then the missing ones added."""
    order = lambda rule: (rule.family, rule.priority, rule.fwmark, rule.mask, rule.invert,  # noqa: E731
                          str(rule.source or ""))
    ops: list[RoutingOp] = [DeleteRule(rule) for rule in sorted(actual - desired, key=order)]
    ops += [AddRule(rule) for rule in sorted(desired - actual, key=order)]
    return ops


def plan_device_address(addresses: frozenset[IPNetwork]) -> list[RoutingOp]:
    return [] if DEVICE_ADDRESS in addresses else [AddDeviceAddress(DEVICE_ADDRESS)]


def plan_sysctls(desired: Mapping[str, str], actual: Mapping[str, str | None]) -> dict[str, str]:
    return {name: value for name, value in sorted(desired.items()) if actual.get(name) != value}


def plan_firewall(spec: FirewallSpec, listing: str | None, applied_listing: str | None,
                  applied_spec: FirewallSpec | None = None) -> FirewallSpec | None:
    """Re-apply when the spec changed since the last apply (`applied_spec`; the strict table follows the model) or
    the kernel no longer lists exactly what it listed right after it."""
    if spec != applied_spec or listing is None or applied_listing is None or listing != applied_listing:
        return spec
    return None
