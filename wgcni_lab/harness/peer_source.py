"""A peer source the test drives, for engines on fakes (tests/hook, tests/observe, bench P8): it hands the engine the
remote nodes a test gives it, as the real sources do (a complete list with `sync`, deltas with `change`/`gone`),
and keeps what the engine publishes; `error`/`status` are what the view and the metrics read from the real sources
(node_hook.static_peers, node_hook.cluster). Like an API that takes every write, it reports each publication back as
held (`accept_writes`); a test that sets it False reports what it wants with `report()`."""

from __future__ import annotations

from node_hook.addresses import address_texts
from node_hook.model import LocalAnnouncement, Publication, RemoteNode
from node_hook.peers import PeerSink


class ManualPeerSource:
    def __init__(self) -> None:
        self.sink: PeerSink | None = None
        self.published: list[LocalAnnouncement] = []
        self.error: str | None = None
        self.status: object = None
        self.accept_writes = True

    def start(self, sink: PeerSink) -> None:
        self.sink = sink

    def _started(self) -> PeerSink:
        assert self.sink is not None, "the engine has not started this source"
        return self.sink

    def sync(self, *nodes: RemoteNode) -> None:
        """A complete list: the remote nodes are exactly these."""
        self._started().nodes_synced({node.name: node for node in nodes})

    def change(self, node: RemoteNode) -> None:
        self._started().node_changed(node)

    def gone(self, name: str) -> None:
        self._started().node_gone(name)

    def publish(self, announcement: LocalAnnouncement) -> None:
        self.published.append(announcement)
        if self.accept_writes:
            self.report(Publication("written", announcement.public_key,
                                    announcement.node_ips | frozenset(address_texts(announcement.pod_ips)),
                                    next_public_key=announcement.next_public_key,
                                    key_switch_at=announcement.key_switch_at))

    def report(self, publication: Publication) -> None:
        if self.sink is not None:
            self.sink.published(publication)

    def stop(self) -> None:
        pass
