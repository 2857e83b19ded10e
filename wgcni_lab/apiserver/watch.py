"""One watch stream's position in the store's history: events, bookmarks, 410 Gone once compacted past it."""

from __future__ import annotations

import copy
import time

from wgcni_lab.apiserver.errors import gone
from wgcni_lab.apiserver.resources import JSON, ResourceType
from wgcni_lab.apiserver.selectors import Selection
from wgcni_lab.apiserver.store import Store


class Watcher:
    """One watch stream's position in the history; `next()` blocks for the next event, a bookmark or the end."""

    def __init__(self, store: Store, rtype: ResourceType, selection: Selection, since: int | None,
                 bookmarks: bool, bookmark_interval: float):
        self.store, self.rtype, self.selection = store, rtype, selection
        self.bookmarks, self.bookmark_interval = bookmarks, bookmark_interval
        self.cancelled = False
        self.pending: list[JSON] = []
        with store.changed:
            if since is None:
                # No resourceVersion (or "0"): synthetic ADDED events for the current state, then changes.
                items, _, _ = store.list(rtype, selection, None)
                self.pending = [{"type": "ADDED", "object": obj} for obj in items]
                self.position = store.resource_version
            elif since < store.oldest_watchable - 1:
                raise gone(since)
            else:
                self.position = since

    def next(self, deadline: float) -> JSON | None:
        """The next event to send, or None at the deadline or when cancelled. May raise ApiError(410)."""
        if self.pending:
            return self.pending.pop(0)
        store = self.store
        last_sent = time.monotonic()
        with store.changed:
            while not self.cancelled:
                if self.position < store.oldest_watchable - 1:
                    raise gone(self.position)
                events = self._events_after_position()
                if events:
                    self.pending = events[1:]
                    return events[0]
                now = time.monotonic()
                if now >= deadline:
                    return None
                if self.bookmarks and now - last_sent >= self.bookmark_interval:
                    # Everything up to the current revision has been sent: that revision is safe to resume from.
                    self.position = store.resource_version
                    return {"type": "BOOKMARK", "object": {
                        "kind": self.rtype.kind, "apiVersion": self.rtype.api_version,
                        "metadata": {"resourceVersion": str(self.position)}}}
                wait = deadline - now
                if self.bookmarks:
                    wait = min(wait, self.bookmark_interval - (now - last_sent))
                store.changed.wait(max(wait, 0.001))
        return None

    def _events_after_position(self) -> list[JSON]:
        """Must hold the lock."""
        history = self.store.history
        low, high = 0, len(history)
        while low < high:  # first event newer than the position
            middle = (low + high) // 2
            if history[middle].resource_version <= self.position:
                low = middle + 1
            else:
                high = middle
        events = []
        for event in history[low:]:
            self.position = event.resource_version
            if event.rtype.qualified_name == self.rtype.qualified_name and self.selection.matches(event.object):
                events.append({"type": event.type, "object": copy.deepcopy(event.object)})
        return events

    def cancel(self) -> None:
        with self.store.changed:
            self.cancelled = True
            self.store.changed.notify_all()
