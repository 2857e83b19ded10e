"""A peer source the test drives, for daemons on fakes (tests/hook, tests/observe): it hands the daemon the remote
nodes a test gives it and keeps what the daemon publishes; `error`/`status` are what the daemon and the metrics read
from the real sources (node_hook.static_peers, node_hook.cluster). Like an API that takes every write, it reports
each publication back as held (`accept_writes`); a test that sets it False reports what it wants with `report()`."""

from __future__ import annotations

from typing import Callable

from node_hook.addresses import address_texts
from node_hook.model import LocalAnnouncement, Publication, RemoteNode

OnPublished = Callable[[Publication], None]


class ManualPeerSource:
    def __init__(self) -> None:
        self.on_nodes: Callable[[dict[str, RemoteNode], bool], None] | None = None
        self.published: list[LocalAnnouncement] = []
        self.error: str | None = None
        self.status: object = None
        self.accept_writes = True
        self.on_published: OnPublished | None = None

    def start(self, on_nodes: Callable[[dict[str, RemoteNode], bool], None],
              on_published: OnPublished | None = None) -> None:
        self.on_nodes = on_nodes
        self.on_published = on_published

    def publish(self, announcement: LocalAnnouncement) -> None:
        self.published.append(announcement)
        if self.accept_writes:
            self.report(Publication("written", announcement.public_key,
                                    announcement.node_ips | frozenset(address_texts(announcement.pod_ips))))

    def report(self, publication: Publication) -> None:
        if self.on_published is not None:
            self.on_published(publication)

    def stop(self) -> None:
        pass
