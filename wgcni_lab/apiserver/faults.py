"""Fault injection: the next N matching requests fail with a chosen code (a 429 with a Retry-After); every request
may be delayed."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Fault:
    """Fail the next `remaining` requests that match with `code`."""

    remaining: int
    code: int
    methods: frozenset[str] | None
    path_contains: str | None  # in the path or the query string
    user_agent_prefix: str | None
    user_agent: str | None = None  # exactly this User-Agent (one hook: `wgcni-node/<node>`)
    retry_after: int | None = None  # seconds, in the Retry-After header of a 429

    def matches(self, method: str, path: str, user_agent: str) -> bool:
        return ((self.methods is None or method in self.methods)
                and (self.path_contains is None or self.path_contains in path)
                and (self.user_agent_prefix is None or user_agent.startswith(self.user_agent_prefix))
                and (self.user_agent is None or user_agent == self.user_agent))


class Faults:
    """The injected failures not served yet and the per-request delay; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.delay = 0.0

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def pending(self) -> int:
        with self._lock:
            return sum(fault.remaining for fault in self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.delay = 0.0

    def take(self, method: str, path: str, user_agent: str) -> tuple[int, int | None] | None:
        """(code, Retry-After) the request fails with, counting it against the first matching fault; None to
        serve it."""
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path, user_agent):
                    fault.remaining -= 1
                    return fault.code, fault.retry_after
            self._faults = [fault for fault in self._faults if fault.remaining > 0]
        return None
