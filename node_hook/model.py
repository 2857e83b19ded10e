"""Desired state of one node (pure): local pods, remote nodes and the settings they are programmed with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteNode:
    """Another node as the sync layer sees it in the Kubernetes API."""

    name: str
    public_key: str  # base64 X25519; "" = no WireGuard on that node (mixed cluster or opted out)
    endpoint_ip: str | None  # underlay address peers send UDP to
    endpoint_port: int
    node_ips: frozenset[str]
    pod_ips: frozenset[str]  # host addresses, no prefix; the sync layer expands published prefixes
    pod_ips_changed_at: float = 0.0  # unix time the node last changed its published pod IPs (conflict rule)


@dataclass(frozen=True)
class LocalAnnouncement:
    """What this node publishes about itself through the sync layer."""

    name: str
    public_key: str  # "" when opted out or without WireGuard
    endpoint_ip: str | None
    endpoint_port: int
    node_ips: frozenset[str]
    pod_ips: frozenset[str]
    mtu: int
    ready: bool
    message: str
