"""The WireGuard backend contract shared by the kernel (netlink) and userspace (wireguard-go UAPI) appliers.

The planner produces `PeerOp`s against a `DeviceState` read back through `WireGuardBackend.read()`;
a backend turns them into netlink or UAPI writes. Both backends must give the same observable result.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class DeviceSpec:
    """What the device itself must look like (peers are handled by `PeerOp`s)."""

    name: str
    private_key: bytes  # 32 raw bytes; never logged
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

    def ensure_device(self, spec: DeviceSpec) -> None:
        """Create the device if missing and make key, port, fwmark, MTU and link state match `spec`."""

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        """Apply the ops in order, batched into as few writes as the backend allows."""

    def delete_device(self) -> None:
        """Remove the device; no error when it is already gone."""

    def close(self) -> None:
        """Release sockets and child processes."""
