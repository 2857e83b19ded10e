"""Contracts of the routing, firewall and sysctl appliers (pure data types and protocols, no side effects).

Like `wireguard.py` for the WireGuard backends: the planner emits these ops against state read back through
these protocols; the real appliers (`routes.py`, `firewall.py`, `sysctl.py`) and their fakes (`fakes.py`)
implement them with the same observable behaviour.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Protocol

from node_hook.model import RouteKind

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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

    def read(self) -> TableState: ...

    def apply(self, ops: Iterable[RoutingOp]) -> None:
        """Apply in order, taking `ops` once (the plan's route sets are made as they are taken). Deleting what is
        already gone and adding what already exists both succeed."""

    def flush(self) -> None:
        """Remove every route in the table and every rule pointing at it."""


@dataclass(frozen=True)
class FirewallSpec:
    """The hook's own nftables table: rp_filter marks, the WireGuard port, MSS clamping into the tunnel."""

    table: str
    fwmark: int
    wireguard_interface: str
    pod_interface_prefixes: tuple[str, ...]
    listen_port: int


class FirewallApplier(Protocol):
    def read(self) -> str | None:
        """The kernel's listing of the hook's table, or None when it does not exist."""

    def apply(self, spec: FirewallSpec) -> str:
        """Replace the table atomically with `spec`; returns the kernel's listing of the result."""

    def delete(self) -> None:
        """Remove the table; no error when it is already gone."""


class SysctlApplier(Protocol):
    def read(self, names: list[str]) -> dict[str, str | None]:
        """Current values (None = no such sysctl, e.g. the device does not exist yet)."""

    def write(self, values: dict[str, str]) -> None:
        """Write values, remembering each original (persistently) the first time it is changed."""

    def restore(self) -> None:
        """Write every remembered original back and forget them."""
