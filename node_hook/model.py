"""Desired state of one node (pure): local pods, remote nodes and the settings they are programmed with.

`NodeModel` is fed events (a local pod record appeared or went away, a remote node changed or went away)
and keeps the desired WireGuard peers and table routes up to date *incrementally*: an event touches only the
IPs it names and the peers that own them, so one pod event costs O(IPs of that pod + IPs of the affected peers),
independent of the number of nodes in the cluster (sized for 5 000 peers x 250 pod IPs). Every change marks
the affected peer keys and route prefixes dirty; `take_changes()` hands them to the planner.

Rules computed here (identically on every node; see docs/design.md "Conflict rules"):
- an IP that is local (a pod record on this node, or one of this node's IPs) is never given to a remote peer;
  local pod IPs get a `throw` route so they leave the table and use the main table's veth route;
- an IP claimed by several remote nodes belongs to the one that claimed *that IP* last: the highest claim revision
  (`RemoteNode.pod_ip_claims`: the API's resourceVersion after which the node first published the IP, the same
  ordering on every node whatever their clocks); claims without a revision (a publisher from before them) rank
  below any with one and among themselves by `pod_ips_changed_at`; ties: lowest node name;
- a node is a peer only with a non-empty key that no other node claims and an endpoint; the IPs of a node that
  is not a peer get `throw` (plaintext, reported in `problems()`);
- a peer's AllowedIPs are its pod IPs *and* its node IPs, aggregated exactly. Node IPs are always allowed as
  sources, even with host encryption off, so replies from host-network pods that come back through the tunnel
  are not dropped as "unallowed src" (Calico #9751); with host encryption on, node IPs also get `dev <wg>` routes.
"""

from __future__ import annotations

import gc
from collections.abc import Collection, ItemsView, Iterable, Iterator, Mapping, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from node_hook.addresses import IPAddress, IPNetwork, address_of, aggregate, host_keys, host_prefix, outside

LOCAL = "\x00local"  # owner marker for IPs of this node (not a valid node name)


@dataclass(frozen=True)
class RemoteNode:
    """Another node as the sync layer sees it in the Kubernetes API."""

    name: str
    public_key: str  # base64 X25519; "" = no WireGuard on that node (mixed cluster or opted out)
    endpoint_ip: str | None  # underlay address peers send UDP to
    endpoint_port: int
    # The node's addresses as the model's keys (packed host prefixes, see `addresses.host_keys`): given as text,
    # `ipaddress` addresses or keys, they are parsed once here - ValueError for anything that is not an address - so
    # every later use (the model, the peers' AllowedIPs, the routes) shares these objects. `address_texts()` prints
    # them.
    node_ips: frozenset[IPNetwork]
    pod_ips: frozenset[IPNetwork]  # host addresses; the sync layer expands published prefixes
    pod_ips_changed_at: float = 0.0  # unix time the node last changed its published pod IPs (legacy conflict rule)
    # (claim revision, pod IPs claimed after it), revisions ascending: when the node claimed each IP (conflict rule)
    pod_ip_claims: tuple[tuple[int, frozenset[IPNetwork]], ...] = ()
    next_public_key: str = ""  # a rotation under way: the key it switches to at `key_switch_at` (node_hook.rotation)
    key_switch_at: float = 0.0  # unix time

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_ips", host_keys(self.node_ips, f"node {self.name} node IPs"))
        object.__setattr__(self, "pod_ips", host_keys(self.pod_ips, f"node {self.name} pod IPs"))
        if self.pod_ip_claims:
            object.__setattr__(self, "pod_ip_claims", tuple(
                (int(revision), host_keys(keys, f"node {self.name} claimed pod IPs"))
                for revision, keys in self.pod_ip_claims))

    def claim_rank(self, key: IPNetwork) -> tuple[int, float]:
        """How late this node claimed `key`, comparable across nodes: (claim revision, 0) or, without one,
        (0, pod_ips_changed_at)."""
        for revision, keys in self.pod_ip_claims:
            if key in keys:
                return revision, 0.0
        return 0, self.pod_ips_changed_at


@dataclass(frozen=True)
class LocalAnnouncement:
    """What this node publishes about itself through the sync layer."""

    name: str
    public_key: str  # "" when opted out or without WireGuard
    endpoint_ip: str | None
    endpoint_port: int
    node_ips: frozenset[str]
    pod_ips: frozenset[IPNetwork]  # the model's keys of the local pod IPs (text is parsed once, as in RemoteNode)
    mtu: int
    ready: bool
    message: str
    next_public_key: str = ""  # a rotation under way: the key this node switches to at `key_switch_at`
    key_switch_at: float = 0.0  # unix time

    def __post_init__(self) -> None:
        object.__setattr__(self, "pod_ips", host_keys(self.pod_ips, f"node {self.name} local pod IPs"))


@dataclass(frozen=True)
class Publication:
    """What the API holds of this node's own publication, as the peer source last saw it (the object's copy
    in the API server, not what was sent), and how the last write went.

    `state`: "unknown" (nothing seen yet: the first list has not answered), "written" (the latest announcement is
    what the API holds), "pending" (a write is on its way), "denied" (the API refused the write: RBAC, admission,
    no Node of this name), "unreachable" (no answer, or a server error). `public_key` and `ips` (node and pod IPs)
    are what the API holds, whatever the state: peers program exactly that."""

    state: str
    public_key: str = ""
    ips: frozenset[str] = frozenset()
    reason: str = ""
    next_public_key: str = ""  # a rotation's next key and switch time, as the API holds them
    key_switch_at: float = 0.0


UNKNOWN_PUBLICATION = Publication("unknown")
# How the hook judges its publication (NodeView.publication_status): confirmed = the API holds its key and every local
# IP.
PUBLICATION_STATES = ("confirmed", "unknown", "opted-out", "pending", "denied", "unreachable", "stale")


class RouteKind(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member, which logs show
    """What a route in the hook's table does."""

    WIREGUARD = "dev"  # dst -> the WireGuard device
    THROW = "throw"  # leave the table: the main table decides (local veth route, or plaintext via eth0)


@dataclass(frozen=True, slots=True)
class DesiredPeer:
    node: str
    public_key: str
    endpoint: tuple[str, int]
    allowed_ips: frozenset[IPNetwork]  # exact aggregation of the IPs the node owns
    persistent_keepalive: int


@dataclass(frozen=True)
class Problem:
    """Something that keeps traffic plaintext or ambiguous; shown in status, logs and metrics."""

    kind: str  # "key-conflict" | "ip-conflict" | "no-key" | "no-endpoint"
    subject: str
    message: str


# More route prefixes changed than this since the last `take_changes()` and the model stops listing them: the next
# pass reads the table back and diffs every route, instead of the model holding a dict as large as the table (at
# 5 000 x 250 scattered pod IPs a full plan would list 1.25 M prefixes: bench/p3_scale.py). Events change a few
# hundred at most (a node of 250 pods); only bulk changes - a hook starting, hundreds of nodes at once - overflow.
CHANGED_ROUTES_LISTED = 65_536


@dataclass(frozen=True)
class Changes:
    """What may differ from what was last handed out: peer keys, and route prefixes with the route each had then
    (None: no route). The reconciler diffs those against the model when the table is in sync: what the model
    wanted at the last pass is what the table holds. `previous_routes` is None when more than
    CHANGED_ROUTES_LISTED changed: any route may have."""

    peer_keys: frozenset[str]
    previous_routes: dict[IPNetwork, RouteKind | None] | None

    def __bool__(self) -> bool:
        return bool(self.peer_keys) or self.previous_routes is None or bool(self.previous_routes)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Cyclic garbage collection paused for a bulk update (reference counting still frees everything at once).
    The model's and the planner's structures hold no reference cycles, but a full collection in the middle of
    building a million of them re-scans all of them (docs/benchmarks.md, P3).
    Nests: only the outermost use re-enables collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class NodeModel:
    """Incrementally maintained desired peers and routes of this node.

    Internal state is kept per address key: who claims it (`_claims`: one node name, the common case, without a
    container; IPs claimed by several nodes are listed in `_contested`) and, per remote node, the keys it claims but
    does not win (`_lost`: none for most nodes); who owns an address is derived from those and the local pods
    (`_winner`), and a node's owned addresses are its claims minus its losses (`_owned`). A remote node's update
    is diffed against its previous version, so it costs
    O(its addresses) and dirties only the addresses that changed; the peer's AllowedIPs are re-aggregated and its
    routes re-derived only where something they depend on changed.
    """

    def __init__(
        self,
        node_name: str,
        local_node_ips: Iterable[str] = (),
        host_encryption: bool = True,
        persistent_keepalive: int = 0,
        local_public_key: str = "",
    ) -> None:
        self.node_name = node_name
        self.host_encryption = host_encryption
        self.persistent_keepalive = persistent_keepalive
        self._local_node_keys = host_keys(local_node_ips, "local node IP")
        self._local_records: dict[str, frozenset[IPNetwork]] = {}
        self._local_count: dict[IPNetwork, int] = {}
        self._remotes: dict[str, RemoteNode] = {}
        self._claims: dict[IPNetwork, str | set[str]] = {}  # remote claimant(s) per address
        self._contested: set[IPNetwork] = set()  # addresses claimed by more than one remote node
        # Remote node -> addresses it claims but does not win (local, or won by another claimant); only nodes with
        # such addresses have an entry, so memory follows the rare losses, not every node's addresses.
        self._lost: dict[str, set[IPNetwork]] = {}
        # Our own key counts as held by this node: a remote node publishing it (a cloned disk, a copied state dir)
        # is a key conflict like any other, never a peer (the kernel would silently ignore it anyway).
        self._key_holders: dict[str, set[str]] = {local_public_key: {node_name}} if local_public_key else {}
        self._local_public_key = local_public_key
        self._peer_of_node: dict[str, str] = {}  # node -> key it is programmed under (usable nodes only)
        self.peers: dict[str, DesiredPeer] = {}
        self.routes = DesiredRoutes(self)
        self._dirty_nodes: set[str] = set()
        # Addresses whose owner may have changed -> their owner before the first such change (`_winner()` of the
        # state then). Owners are not stored (a dict of every address's owner is table-sized): `_winner()` derives
        # them from the claims and the local pods. Every change of what `_winner()`
        # reads is preceded by `_note()` of the addresses it touches.
        self._dirty_keys: dict[IPNetwork, str | None] = {}
        self._changed_keys: set[str] = set()
        # Addresses whose route may have changed since the last take_changes() -> their route then; None after
        # more than CHANGED_ROUTES_LISTED (any route may have changed).
        self._previous_routes: dict[IPNetwork, RouteKind | None] | None = {}
        # Bumped by every change of a remote node, and of a local pod that takes or frees an address a remote node
        # claims (the losses of that node change): strict_addresses() caches on it.
        self._owners_version = 0
        self._strict_outside: dict[str, tuple[RemoteNode, tuple[IPNetwork, ...]]] = {}
        self._strict_result: tuple[object, tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]] | None = None

    # ---- events -------------------------------------------------------------------------------------------

    def set_local_pod(self, record_key: str, ips: Iterable[str | IPNetwork]) -> None:
        """A pod record on this node was created or updated (`ips`: its host addresses, as text or as keys)."""
        new = host_keys(ips, f"pod record {record_key}")
        old = self._local_records.get(record_key, frozenset())
        if new == old:
            return
        if new:
            self._local_records[record_key] = new
        else:
            self._local_records.pop(record_key, None)
        note, claims = self._note, self._claims
        for key in old - new:
            count = self._local_count[key] - 1
            if count:
                self._local_count[key] = count
            else:
                note(key)
                del self._local_count[key]
                if key in claims:
                    self._owners_version += 1
        for key in new - old:
            note(key)
            if key in claims and key not in self._local_count:
                self._owners_version += 1
            self._local_count[key] = self._local_count.get(key, 0) + 1
        self._settle()

    def remove_local_pod(self, record_key: str) -> None:
        self.set_local_pod(record_key, ())

    def replace_local_pods(self, records: Mapping[str, Iterable[str | IPNetwork]]) -> None:
        """Make the local pods exactly `records` (a rescan of the records directory)."""
        with paused_gc():
            for key in set(self._local_records) - set(records):
                self.set_local_pod(key, ())
            for key, ips in records.items():
                self.set_local_pod(key, ips)

    def set_remote_node(self, node: RemoteNode) -> None:
        if node.name == self.node_name:
            return
        name = node.name
        old = self._remotes.get(name)
        if old is not None and (old is node or old == node):  # compared before parsing: a re-delivered node is cheap
            return
        self._owners_version += 1
        new_node_keys, new_pod_keys = node.node_ips, node.pod_ips
        new_keys = new_pod_keys | new_node_keys
        if old is None:
            old_pod_keys: frozenset[IPNetwork] = frozenset()
            old_node_keys: frozenset[IPNetwork] = frozenset()
        else:
            old_node_keys, old_pod_keys = old.node_ips, old.pod_ips
        old_keys = old_pod_keys | old_node_keys
        lost, gained = old_keys - new_keys, new_keys - old_keys
        note = self._note
        # Noted before anything `_winner()` reads changes (the node's timestamp decides contested addresses):
        for key in lost:
            note(key)
        for key in gained:
            note(key)
        # An address that stayed but became (or stopped being) a node IP, or a node IP that became (or stopped
        # being) also a pod IP, may change its route kind (found by tests/hook/test_model_incremental.py).
        for key in (old_node_keys ^ new_node_keys) | ((old_pod_keys ^ new_pod_keys) & (old_node_keys | new_node_keys)):
            note(key)
        if old is not None and (old.pod_ips_changed_at != node.pod_ips_changed_at
                                or old.pod_ip_claims != node.pod_ip_claims):
            # the winner of a contested address may change with its claim (new claims are noted above)
            for key in old_keys & new_keys:
                if key in self._contested:
                    note(key)
        self._remotes[name] = node
        for key in lost:
            self._unclaim(key, name)
        for key in gained:
            self._claim(key, name)
        if old is None or old.public_key != node.public_key:
            if old is not None:
                self._release_key(old.public_key, name)
            if node.public_key:
                holders = self._key_holders.setdefault(node.public_key, set())
                holders.add(name)
                self._dirty_nodes.update(holders)
        self._dirty_nodes.add(name)
        self._settle()

    def set_local_public_key(self, public_key: str) -> None:
        """This node now uses `public_key` (a key rotation switched): a remote node still claiming the old one is no
        longer in conflict with this node, one claiming the new one is."""
        if public_key == self._local_public_key:
            return
        self._release_key(self._local_public_key, self.node_name)
        self._local_public_key = public_key
        if public_key:
            holders = self._key_holders.setdefault(public_key, set())
            holders.add(self.node_name)
            self._dirty_nodes.update(holders)
        self._dirty_nodes.discard(self.node_name)
        self._settle()

    def remove_remote_node(self, name: str) -> None:
        old = self._remotes.get(name)
        if old is None:
            return
        self._owners_version += 1
        keys = old.pod_ips | old.node_ips
        for key in keys:
            self._note(key)
        del self._remotes[name]
        for key in keys:
            self._unclaim(key, name)
        self._lost.pop(name, None)
        self._release_key(old.public_key, name)
        self._dirty_nodes.add(name)
        self._settle()

    def replace_remote_nodes(self, nodes: dict[str, RemoteNode]) -> None:
        """Make the remote nodes exactly `nodes` (a complete list from the peer source)."""
        remotes = self._remotes
        # The sync layer hands over the same object for a node that did not change: those are skipped in one pass
        # of identity checks, not one update call per node.
        changed = [node for name, node in nodes.items() if remotes.get(name) is not node]
        gone = remotes.keys() - nodes.keys() if len(remotes) + len(changed) != len(nodes) else ()
        with paused_gc():
            for name in gone:
                self.remove_remote_node(name)
            for node in changed:
                self.set_remote_node(node)

    def update_remote_nodes(self, nodes: dict[str, RemoteNode]) -> None:
        """Add or update `nodes` without pruning others (a partial list before the first complete one)."""
        with paused_gc():
            for node in nodes.values():
                self.set_remote_node(node)

    def take_changes(self) -> Changes:
        changes = Changes(frozenset(self._changed_keys), self._previous_routes)
        self._changed_keys.clear()
        self._previous_routes = {}
        return changes

    # ---- queries ------------------------------------------------------------------------------------------

    @property
    def local_pod_ips(self) -> frozenset[IPNetwork]:
        """The keys of the local pod IPs (what this node publishes; `addresses.address_texts` prints them)."""
        return frozenset(self._local_count)

    @property
    def remote_nodes(self) -> dict[str, RemoteNode]:
        return dict(self._remotes)

    def owned_routes(self, owner: str) -> list[tuple[IPNetwork, RouteKind]]:
        """The routes of the addresses `owner` (LOCAL or a remote node's name) owns, in address order."""
        if owner == LOCAL:
            return [(key, RouteKind.THROW) for key in sorted(self._local_count)]
        usable = owner in self._peer_of_node
        routes = ((key, self._kind_for(key, owner, usable)) for key in sorted(self._owned(owner)))
        return [(key, kind) for key, kind in routes if kind is not None]

    def owner_of(self, ip: IPAddress) -> str | None:
        """LOCAL, the remote node that owns `ip`, or None."""
        return self._winner(host_prefix(ip))

    def node_of_key(self, public_key: str) -> str | None:
        peer = self.peers.get(public_key)
        return peer.node if peer else None

    def key_of_node(self, name: str) -> str | None:
        """The key remote node `name` is a peer under, or None when it is not a peer."""
        return self._peer_of_node.get(name)

    def strict_addresses(self, cluster: tuple[IPNetwork, ...]) -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
        """Strict mode's view of the remote nodes (docs/design.md "Strict mode"): (exempt, published), each aggregated
        exactly - the addresses won by nodes without a key (opted out: reached in plaintext), and the addresses of
        nodes with a key that lie outside `cluster` (inside, the cluster's ranges already cover them). Recomputed
        only after a remote node changed or a local pod took or freed an address a remote node claims: O(remote
        nodes) plus the addresses of keyless nodes and of nodes whose object changed (each node's outside addresses
        are kept with the node object they come from)."""
        if self._strict_result is not None and self._strict_result[0] == (self._owners_version, cluster):
            return self._strict_result[1]
        cache = self._strict_outside
        if self._strict_result is None or self._strict_result[0][1] != cluster:  # type: ignore[index]
            cache.clear()
        exempt: list[IPNetwork] = []
        published: list[IPNetwork] = []
        for name, node in self._remotes.items():
            if not node.public_key:
                exempt.extend(self._owned(name))
                continue
            entry = cache.get(name)
            if entry is None or entry[0] is not node:
                entry = cache[name] = (node, tuple(outside(node.pod_ips | node.node_ips, cluster)))
            published.extend(entry[1])
        if len(cache) > len(self._remotes):
            for name in cache.keys() - self._remotes.keys():
                del cache[name]
        result = (tuple(aggregate(exempt)), tuple(aggregate(set(published))))
        self._strict_result = ((self._owners_version, cluster), result)
        return result

    def problems(self) -> list[Problem]:
        """Costs O(nodes + contested addresses), never O(all addresses)."""
        out: list[Problem] = []
        for key, holders in sorted(self._key_holders.items()):
            if len(holders) > 1:
                names = ", ".join(sorted(holders))
                out.append(Problem("key-conflict", names, f"public key {key[:8]}... claimed by {names}: none of them "
                                   "is a peer, their traffic stays plaintext"))
        for name, remote in sorted(self._remotes.items()):
            if not remote.public_key:
                out.append(Problem("no-key", name, f"node {name} has no WireGuard key: its traffic stays plaintext"))
            elif remote.endpoint_ip is None:
                out.append(Problem("no-endpoint", name, f"node {name} has no endpoint: its traffic stays plaintext"))
        for contested in sorted(self._contested):
            ip = address_of(contested)
            owner = self._winner(contested)
            winner = "this node" if owner == LOCAL else owner
            claimants = ", ".join(sorted(self._claims[contested]))
            out.append(Problem("ip-conflict", str(ip), f"{ip} claimed by {claimants}; "
                               f"routed to {winner}"))
        return out

    # ---- internals ----------------------------------------------------------------------------------------

    def _claim(self, key: IPNetwork, name: str) -> None:
        claim = self._claims.get(key)
        if claim is None:
            self._claims[key] = name
        elif isinstance(claim, str):
            self._claims[key] = {claim, name}
            self._contested.add(key)
        else:
            claim.add(name)

    def _unclaim(self, key: IPNetwork, name: str) -> None:
        lost = self._lost.get(name)
        if lost is not None:
            lost.discard(key)
            if not lost:
                del self._lost[name]
        claim = self._claims[key]
        if isinstance(claim, str):
            del self._claims[key]
        else:
            claim.discard(name)
            if len(claim) == 1:
                self._claims[key] = next(iter(claim))
                self._contested.discard(key)

    def _note(self, key: IPNetwork) -> None:
        """`key`'s owner may be about to change: remember the owner it has now (once per settle) and its route."""
        if key not in self._dirty_keys:
            owner = self._dirty_keys[key] = self._winner(key)
            self._note_route(key, owner, owner in self._peer_of_node)

    def _note_route(self, key: IPNetwork, owner: str | None, usable: bool) -> None:
        """`key`'s route may be about to change: remember the route it has now (once per take_changes())."""
        previous = self._previous_routes
        if previous is not None and key not in previous:
            previous[key] = self._kind_for(key, owner, usable)
            if len(previous) > CHANGED_ROUTES_LISTED:
                self._previous_routes = None

    def _release_key(self, public_key: str, name: str) -> None:
        if not public_key:
            return
        holders = self._key_holders[public_key]
        holders.discard(name)
        if not holders:
            del self._key_holders[public_key]
        self._dirty_nodes.update(holders)

    def _usable(self, name: str) -> bool:
        node = self._remotes.get(name)
        if node is None or not node.public_key or node.endpoint_ip is None:
            return False
        return len(self._key_holders.get(node.public_key, ())) == 1

    def _winner(self, key: IPNetwork) -> str | None:
        if key in self._local_count or key in self._local_node_keys:
            return LOCAL
        claim = self._claims.get(key)
        if claim is None or isinstance(claim, str):
            return claim
        def rank(name: str) -> tuple[int, float, str]:
            revision, changed_at = self._remotes[name].claim_rank(key)
            return -revision, -changed_at, name

        return min(claim, key=rank)

    def _owned(self, name: str) -> frozenset[IPNetwork]:
        """The addresses remote node `name` wins: its claims minus its losses."""
        node = self._remotes.get(name)
        if node is None:
            return frozenset()
        keys = node.pod_ips | node.node_ips if node.node_ips else node.pod_ips
        lost = self._lost.get(name)
        return keys - lost if lost else keys

    def _settle(self) -> None:
        """Recompute owners of dirty addresses, then the peers they touch (routes are derived: `DesiredRoutes`)."""
        dirty = self._dirty_keys
        self._dirty_keys = {}
        # This loop runs once per address of a joining node (1.25 M times for a full plan at 5 000 x 250):
        # attributes are bound to locals, and the common case (one claimant, who wins) is one failed dict lookup.
        lost_by, claims, dirty_nodes, winner = self._lost, self._claims, self._dirty_nodes, self._winner
        for key, old_owner in dirty.items():
            new_owner = winner(key)
            claim = claims.get(key)
            if claim is not None:  # every claimant but the winner has the address among its losses
                for name in (claim,) if isinstance(claim, str) else claim:
                    lost = lost_by.get(name)
                    if name == new_owner:
                        if lost is not None and key in lost:
                            lost.discard(key)
                            if not lost:
                                del lost_by[name]
                    elif lost is None:
                        lost_by[name] = {key}
                    else:
                        lost.add(key)
            if new_owner == old_owner:
                continue
            if old_owner is not None and old_owner != LOCAL:
                dirty_nodes.add(old_owner)
            if new_owner is not None and new_owner != LOCAL:
                dirty_nodes.add(new_owner)
        for name in dirty_nodes:
            was_peer = name in self._peer_of_node
            self._settle_peer(name)
            if was_peer != (name in self._peer_of_node) and self._previous_routes is not None:
                for key in self._owned(name):  # usable or not: every route of its addresses flips
                    self._note_route(key, name, was_peer)
        dirty_nodes.clear()

    def _settle_peer(self, name: str) -> None:
        old_key = self._peer_of_node.pop(name, None)
        if old_key is not None:
            if self.peers.get(old_key) is not None and self.peers[old_key].node == name:
                del self.peers[old_key]
            self._changed_keys.add(old_key)
        if not self._usable(name):
            return
        node = self._remotes[name]
        assert node.endpoint_ip is not None
        self.peers[node.public_key] = DesiredPeer(
            node=name,
            public_key=node.public_key,
            endpoint=(node.endpoint_ip, node.endpoint_port),
            allowed_ips=frozenset(aggregate(self._owned(name))),
            persistent_keepalive=self.persistent_keepalive,
        )
        self._peer_of_node[name] = node.public_key
        self._changed_keys.add(node.public_key)

    def _kind_for(self, key: IPNetwork, owner: str | None, usable: bool) -> RouteKind | None:
        """The route of `key` when `owner` owns it and is (`usable`) or is not a peer."""
        if owner is None:
            return None
        if owner == LOCAL:
            return RouteKind.THROW if key in self._local_count else None
        if not usable:
            return RouteKind.THROW
        node = self._remotes[owner]
        if self.host_encryption or key not in node.node_ips or key in node.pod_ips:  # pod IPs, and node IPs with
            return RouteKind.WIREGUARD  # host encryption; a node IP that is also a pod IP (rare) too
        return None  # a remote node IP without host encryption: main table, plaintext

    def _route_kind(self, key: IPNetwork) -> RouteKind | None:
        """`_kind_for(key, _winner(key), ...)` in one call: a full resync looks up every route of the table.
        tests/hook/test_model.py (test_a_route_looked_up_is_the_route_listed) holds the two to the same routes."""
        if key in self._local_count:
            return RouteKind.THROW
        if key in self._local_node_keys:
            return None
        claim = self._claims.get(key)
        if claim is None:
            return None
        owner = claim if isinstance(claim, str) else self._winner(key)
        if owner not in self._peer_of_node:
            return RouteKind.THROW
        node = self._remotes[owner]
        if self.host_encryption or key not in node.node_ips or key in node.pod_ips:
            return RouteKind.WIREGUARD
        return None

    def _iter_routes(self) -> Iterator[tuple[IPNetwork, RouteKind]]:
        for key in self._local_count:
            yield key, RouteKind.THROW
        kind_for = self._kind_for
        for name in self._remotes:
            usable = name in self._peer_of_node
            for key in self._owned(name):
                kind = kind_for(key, name, usable)
                if kind is not None:
                    yield key, kind

    def route_counts(self) -> dict[RouteKind, int]:
        """Routes by kind, in O(nodes) (status, metrics)."""
        throw, wireguard = len(self._local_count), 0
        for name, node in self._remotes.items():
            lost: Collection[IPNetwork] = self._lost.get(name, frozenset())
            extra_node_ips = [key for key in node.node_ips if key not in node.pod_ips]
            owned = len(node.pod_ips) + len(extra_node_ips) - len(lost)
            if name not in self._peer_of_node:
                throw += owned
            elif self.host_encryption:
                wireguard += owned
            else:
                wireguard += owned - sum(1 for key in extra_node_ips if key not in lost)
        return {RouteKind.WIREGUARD: wireguard, RouteKind.THROW: throw}


class DesiredRoutes(Mapping[IPNetwork, RouteKind]):
    """The routes a `NodeModel` wants in the hook's table (prefix -> kind), derived on demand from its owners and
    peers: `throw` for local pods, `dev` for addresses of remote peers (`throw` while their node is not a peer).
    Not stored, because a dict of every route is table-sized (docs/benchmarks.md, P3): a lookup derives the kind,
    iteration goes node by node, `len()` is O(nodes)."""

    __slots__ = ("_model",)

    def __init__(self, model: NodeModel) -> None:
        self._model = model

    def __getitem__(self, prefix: IPNetwork) -> RouteKind:
        kind = self._model._route_kind(prefix)
        if kind is None:
            raise KeyError(prefix)
        return kind

    def get(self, prefix: IPNetwork, default: RouteKind | None = None) -> RouteKind | None:  # type: ignore[override]
        kind = self._model._route_kind(prefix)
        return default if kind is None else kind

    def __contains__(self, prefix: object) -> bool:
        return self._model._route_kind(prefix) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[IPNetwork]:
        return (prefix for prefix, _ in self._model._iter_routes())

    def __len__(self) -> int:
        return sum(self._model.route_counts().values())

    def items(self) -> ItemsView[IPNetwork, RouteKind]:
        return _RouteItems(self)

    def values(self) -> ValuesView[RouteKind]:
        return _RouteKinds(self)


class _RouteItems(ItemsView[IPNetwork, RouteKind]):
    _mapping: DesiredRoutes  # what MappingView.__init__ stores

    def __iter__(self) -> Iterator[tuple[IPNetwork, RouteKind]]:
        return self._mapping._model._iter_routes()


class _RouteKinds(ValuesView[RouteKind]):
    _mapping: DesiredRoutes  # what MappingView.__init__ stores

    def __iter__(self) -> Iterator[RouteKind]:
        return (kind for _, kind in self._mapping._model._iter_routes())
