"""A `PeerSink` that records what a peer source tells it (tests/sync, tests/hook): every delivery in order, the
remote nodes as they stand after applying them, and every publication report."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from node_hook.model import Publication, RemoteNode


class RecordingSink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, object]] = []  # ("synced", {name: node}) | ("changed", node) | ("gone", name)
        self.publications: list[Publication] = []
        self._nodes: dict[str, RemoteNode] | None = None  # None until the first complete list

    def nodes_synced(self, nodes: Mapping[str, RemoteNode]) -> None:
        with self.lock:
            self.calls.append(("synced", dict(nodes)))
            self._nodes = dict(nodes)

    def node_changed(self, node: RemoteNode) -> None:
        with self.lock:
            self.calls.append(("changed", node))
            if self._nodes is not None:
                self._nodes[node.name] = node

    def node_gone(self, name: str) -> None:
        with self.lock:
            self.calls.append(("gone", name))
            if self._nodes is not None:
                self._nodes.pop(name, None)

    def published(self, publication: Publication) -> None:
        with self.lock:
            self.publications.append(publication)

    @property
    def latest(self) -> dict[str, RemoteNode] | None:
        """The remote nodes as the deliveries so far make them (None before the first complete list)."""
        with self.lock:
            return None if self._nodes is None else dict(self._nodes)

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.calls]
