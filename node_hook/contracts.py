"""Contracts between the planner and the appliers (pure data types and protocols, no side effects).

The planner emits these ops against the state the appliers read back through these protocols: routes, rules and
the device address (`RoutingApplier`), the nftables table (`FirewallApplier`), sysctls (`SysctlApplier`) and the
WireGuard device and its peers (`WireGuardBackend`). The real appliers in `apply/` (`routes.py`, `firewall.py`,
`sysctl.py`, `wg_kernel.py` over netlink, `wg_uapi.py` over wireguard-go's UAPI) and their fakes (`apply/fakes.py`)
implement them with the same observable behaviour; the model, the planner and the reconciler import only this.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from node_hook.addresses import IPNetwork
from node_hook.model import RouteKind

# ---- routes, rules, the device address, firewall and sysctls ------------------------------------------------

FOREIGN_ROUTE = "foreign"  # a route in our table that we did not put there in this shape (gets replaced/deleted)

# The WireGuard device's own address. The kernel's reverse-path check drops every packet arriving on a device
# without any IPv4 address unless rp_filter is 0 (Calico #8039/#8772), and rp_filter cannot be lowered below
# net.ipv4.conf.all.rp_filter; so the device gets the IPv4 "dummy address" of RFC 7600 (192.0.0.8/32), with
# scope link: it is never chosen as a source for traffic leaving the node and clashes with no VNet address.
DEVICE_ADDRESS = ipaddress.ip_network("192.0.0.8/32")


MAIN_TABLE = 254


@dataclass(frozen=True)
class RuleSpec:
    """An ip rule of the hook's: `[not] fwmark M/M lookup <table>` at `priority` (the tunnel rule), or, with
    `source`, `from <source> lookup main` (a bypass rule: a local IP whose publication the API does not hold yet
    leaves by the main table, not into a tunnel whose peers would drop it)."""

    family: int  # 4 | 6
    priority: int
    fwmark: int
    mask: int
    table: int
    invert: bool
    source: IPNetwork | None = None

    def describe(self) -> str:
        if self.source is not None:
            return f"{self.priority}: from {self.source} lookup {self.table} (v{self.family})"
        negation = "not " if self.invert else ""
        return f"{self.priority}: {negation}fwmark {self.fwmark:#x}/{self.mask:#x} lookup {self.table} (v{self.family})"


@dataclass(frozen=True)
class TableState:
    """Routes in the hook's table (prefix -> RouteKind value or FOREIGN_ROUTE) and the rules that point at it.
    Every `read()` returns new containers that the caller may keep and change (the reconciler's cache does)."""

    routes: dict[IPNetwork, str] = field(default_factory=dict)
    rules: frozenset[RuleSpec] = frozenset()
    device_addresses: frozenset[IPNetwork] = frozenset()  # addresses on the WireGuard device


@dataclass(frozen=True)
class TableStream:
    """A table read back route by route: `table` with every field but `routes`, then (prefix, RouteKind value or
    FOREIGN_ROUTE) per route of the table."""

    table: TableState
    routes: Iterator[tuple[IPNetwork, str]]


# The route and peer ops have __slots__: 48 bytes a SetRoute instead of 88 as a plain frozen dataclass (tracemalloc,
# CPython 3.11.7). The plan's route sets are made one at a time (planner.RouteSets), the peer ops are per peer.
@dataclass(frozen=True, slots=True)
class SetRoute:
    """Create or replace the route for `prefix` in the table."""

    prefix: IPNetwork
    kind: RouteKind


@dataclass(frozen=True, slots=True)
class DeleteRoute:
    prefix: IPNetwork


@dataclass(frozen=True)
class AddRule:
    rule: RuleSpec


@dataclass(frozen=True)
class DeleteRule:
    rule: RuleSpec


@dataclass(frozen=True)
class AddDeviceAddress:
    """Put `prefix` (scope link) on the WireGuard device."""

    prefix: IPNetwork


RoutingOp = SetRoute | DeleteRoute | AddRule | DeleteRule | AddDeviceAddress


class RoutingApplier(Protocol):
    """Routes in one table, rules pointing at it and the WireGuard device's address, in the current namespace."""

    def read(self, routes: bool = True) -> TableState:
        """The table's state; without `routes`, only its rules and the device's addresses (the routes left empty:
        no dump of a table of 1.25 M routes to repair a rule)."""

    def read_stream(self) -> TableStream:
        """The same read-back with the routes as they are decoded, none of them held. The caller takes the whole
        stream before it calls anything else on the applier."""

    def apply(self, ops: Iterable[RoutingOp]) -> None:
        """Apply in order, taking `ops` once (the plan's route sets are made as they are taken). Deleting what is
        already gone and adding what already exists both succeed."""

    def flush(self) -> None:
        """Remove every route in the table and every rule pointing at it."""


@dataclass(frozen=True)
class StrictSpec:
    """The strict-mode table (`inet <table>`, docs/design.md "Strict mode"): a packet from a local pod - and with
    `host` from the host - to an address in `cluster` or `published` that leaves by anything but the WireGuard
    device, lo or a pod veth is counted and, with `enforce`, dropped; so is a plaintext packet from an address that
    routes into the tunnel (a WireGuard node's) to a local pod. Exempt: `allow` (strictAllow and Azure's platform
    addresses), `exempt` (the addresses of nodes without a key: opted out), WireGuard's own UDP, and the replies of
    a connection that was opened in plaintext from outside the WireGuard nodes (an outside client of a NodePort).
    With `boot_file` the applier keeps the same table there, in a form `nft -f` loads only where it is missing (at
    boot, before the hook runs), while `enforce` holds; and removes the file otherwise."""

    table: str
    enforce: bool
    host: bool
    fwmark: int  # WireGuard's packets carry it; the same bit in the conntrack mark marks plaintext-origin connections
    wireguard_interface: str
    pod_interface_prefixes: tuple[str, ...]
    listen_port: int
    cluster: tuple[IPNetwork, ...]
    allow: tuple[IPNetwork, ...]
    exempt: tuple[IPNetwork, ...] = ()
    published: tuple[IPNetwork, ...] = ()
    boot_file: str = ""
    add_hold: float = 0.0  # written into the boot file: how long the plugin's ADD waits for the publication


@dataclass(frozen=True)
class FirewallSpec:
    """The hook's own nftables tables: rp_filter marks, the WireGuard port, MSS clamping into the tunnel; and the
    strict-mode table when `strict` is set."""

    table: str
    fwmark: int
    wireguard_interface: str
    pod_interface_prefixes: tuple[str, ...]
    listen_port: int
    strict: StrictSpec | None = None


@dataclass(frozen=True)
class PlaintextCounters:
    """The strict table's kernel counters: packets (and bytes) that matched, by verdict and direction ("out": a
    local pod or the host to the cluster, "in": a WireGuard node's address to a local pod), and the addresses hit
    most (destinations out, sources in) with their packet counts, most first."""

    dropped: dict[str, int]
    counted: dict[str, int]
    top: dict[str, list[tuple[str, int]]]


class FirewallApplier(Protocol):
    def read(self) -> str | None:
        """The kernel's listing of the hook's tables (without counter values and the strict table's dynamic sets),
        or None when one does not exist."""

    def apply(self, spec: FirewallSpec) -> str:
        """Replace the tables atomically with `spec` (keeping the strict table's counters); returns the listing."""

    def delete(self) -> None:
        """Remove the tables and the strict boot file; no error when they are already gone."""

    def counters(self) -> PlaintextCounters | None:
        """The strict table's counters, or None when it does not exist (any thread: it reads, writes nothing)."""


class SysctlApplier(Protocol):
    def read(self, names: list[str]) -> dict[str, str | None]:
        """Current values (None = no such sysctl, e.g. the device does not exist yet)."""

    def write(self, values: dict[str, str]) -> None:
        """Write values, remembering each original (persistently) the first time it is changed."""

    def restore(self) -> None:
        """Write every remembered original back and forget them."""

# ---- the WireGuard device and its peers: the kernel (netlink) and userspace (UAPI) backends give the same result

@dataclass(frozen=True)
class DeviceSpec:
    """What the device itself must look like (peers are handled by `PeerOp`s)."""

    name: str
    private_key: bytes  # 32 raw bytes; never logged
    public_key: str  # base64, of `private_key`: derived once where the key is loaded (keys.NodeKey)
    listen_port: int
    fwmark: int
    mtu: int


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer as read back from the device."""

    public_key: str  # base64
    endpoint: tuple[str, int] | None
    allowed_ips: frozenset[IPNetwork]
    persistent_keepalive: int = 0
    latest_handshake: float = 0.0  # unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    """The device as read back; `public_key` is derived from the private key the device holds."""

    name: str
    public_key: str
    listen_port: int
    fwmark: int
    mtu: int
    up: bool
    peers: dict[str, PeerState] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceStream:
    """A device read back peer by peer: `device` with every field but `peers` (empty), then each peer once."""

    device: DeviceState
    peers: Iterator[PeerState]


@dataclass(frozen=True)
class WireGuardChange:
    """A write to our device by someone else, as a backend saw it go by (the userspace backend's UAPI proxy, the
    kernel backend's netlink capture): what the hook must recheck."""

    peer_keys: frozenset[str] = frozenset()  # the peers it named
    allowed_ips: frozenset[IPNetwork] = frozenset()  # the AllowedIPs it gave (they may have left one of our peers)
    device: bool = False  # private key, port or fwmark set
    all_peers: bool = False  # replace_peers (wg setconf/syncconf): any peer may differ


class CaptureUnavailable(RuntimeError):
    """The kernel cannot show the writes by others to the device (no nlmon): they are found by the resync only."""


@dataclass(frozen=True, slots=True)
class UpsertPeer:
    """Create or update a peer. With `replace_allowed_ips` the list is the peer's whole set; otherwise it is added."""

    public_key: str
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[IPNetwork, ...]
    replace_allowed_ips: bool
    persistent_keepalive: int = 0


@dataclass(frozen=True, slots=True)
class RemoveAllowedIPs:
    """Take these prefixes away from a peer without touching its other AllowedIPs and without a window
    in which its other IPs are unreachable (per-IP remove flag where the kernel has it, else a temporary
    zero-key peer that takes the prefixes and is then deleted)."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class RemovePeer:
    public_key: str


PeerOp = UpsertPeer | RemoveAllowedIPs | RemovePeer


class WireGuardBackend(Protocol):
    """One WireGuard device in the current network namespace."""

    kind: str  # "kernel" | "userspace"

    def read(self) -> DeviceState | None:
        """The device and its peers, or None when the device does not exist."""

    def read_stream(self) -> DeviceStream | None:
        """The same read-back with the peers as they are decoded, each complete and none held, or None when the
        device does not exist. The caller takes the whole stream before it calls anything else on the backend."""

    def ensure_device(self, spec: DeviceSpec) -> None:
        """Create the device if missing and make key, port, fwmark, MTU and link state match `spec`."""

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        """Apply the ops in order, batched into as few writes as the backend allows."""

    def greet(self, peers: Mapping[str, int]) -> None:
        """Send each existing peer (public key -> its persistent keepalive, restored after) one keepalive now, which
        starts a handshake when it has no session: by turning persistent keepalive off, on and back, as WireGuard
        sends a keepalive when it is turned on. Unknown keys are skipped, never created."""

    def delete_device(self) -> None:
        """Remove the device; no error when it is already gone."""

    def close(self) -> None:
        """Release sockets and child processes."""
