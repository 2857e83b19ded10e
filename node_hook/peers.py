"""The seam between where remote nodes come from and the engine: a peer source (node_hook.cluster over the Kubernetes
API, node_hook.static_peers over a file) tells a `PeerSink` (the engine) what changed, in deltas, and what the API
holds of this node's own publication; the engine hands the source its announcement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from node_hook.model import LocalAnnouncement, Publication, RemoteNode


class PeerSink(Protocol):
    """What a peer source tells the engine, as deltas (any thread). `nodes_synced` is a complete list: only then
    are nodes it does not name pruned (so a restarted hook never wipes a live mesh before its first list)."""

    def nodes_synced(self, nodes: Mapping[str, RemoteNode]) -> None: ...

    def node_changed(self, node: RemoteNode) -> None: ...

    def node_gone(self, name: str) -> None: ...

    def published(self, publication: Publication) -> None: ...


class PeerSource(Protocol):
    """Where remote nodes come from and this node's announcement goes (node_hook.cluster, node_hook.static_peers).
    A source may also have `error` (its current problem) and `status` (its own counters), which status shows."""

    def start(self, sink: PeerSink) -> None: ...

    def publish(self, announcement: LocalAnnouncement) -> None: ...

    def stop(self) -> None: ...
