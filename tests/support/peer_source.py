"""A peer source the test drives, for daemons on fakes (tests/hook, tests/observe): it hands the daemon the remote
nodes a test gives it and keeps what the daemon publishes; `error`/`status` are what the daemon and the metrics read
from the real sources (node_hook.static_peers, node_hook.cluster)."""

from __future__ import annotations

from typing import Callable

from node_hook.model import LocalAnnouncement, RemoteNode


class ManualPeerSource:
    def __init__(self) -> None:
        self.on_nodes: Callable[[dict[str, RemoteNode], bool], None] | None = None
        self.published: list[LocalAnnouncement] = []
        self.error: str | None = None
        self.status: object = None

    def start(self, on_nodes: Callable[[dict[str, RemoteNode], bool], None]) -> None:
        self.on_nodes = on_nodes

    def publish(self, announcement: LocalAnnouncement) -> None:
        self.published.append(announcement)

    def stop(self) -> None:
        pass
