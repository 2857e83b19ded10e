"""The netlink monitor: what changes on the node outside the hook's own writes, turned into engine events.

It reads, never writes (the appliers beside it are the only writers). On its own thread it listens to link, address,
route and rule notifications and tells the `DataplaneEvents` receiver (the engine):
- our WireGuard device deleted or set down, or its address removed -> that aspect is read back and repaired;
- a rule pointing at our table removed -> the rules are;
- a route of our table removed -> `route_removed(prefix)` (the engine repairs it if it still wants it);
- a host route of the main table added or removed, or a pod interface deleted -> `pod_routes_changed()`, so the
  local pods learned from azure-vnet's host routes follow (IPv4 removes a deleted link's routes without
  RTM_DELROUTE, hence the link).

Faults. Each watcher runs under a supervisor. An overflow of its socket (ENOBUFS: the kernel dropped notifications)
reopens it at once (pyroute2 keeps a socket that saw an error failing for good) and asks the engine for a full
resync once subscribed again; any other error (a closed socket, a failed decode) is logged, and the socket is
reopened after a backoff (`RESTART_DELAYS`), again followed by a full resync, as notifications were lost meanwhile.
`health()` says whether every watcher is listening: one that is not listening again within `DOWN_GRACE` seconds,
or whose thread ended, fails `/healthz`, so the kubelet restarts the hook.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from node_hook.config import Settings
from node_hook.pod_routes import HOST_PREFIX_LENGTH, MAIN_TABLE, is_pod_interface

log = logging.getLogger(__name__)

IFF_UP = 1
RECEIVE_BUFFER = 1 << 20  # pyroute2's default; a burst past it is an overflow, answered by a full resync
RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DOWN_GRACE = 15.0  # a watcher not listening for longer fails health (its restarts keep failing)


class DataplaneEvents(Protocol):
    def dataplane_changed(self, *aspects: str) -> None: ...

    def route_removed(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None: ...

    def pod_routes_changed(self) -> None: ...

    def trigger_resync(self) -> int: ...


@dataclass
class WatcherState:
    """What one watcher thread is doing, for `health()` and `status`."""

    name: str
    listening: bool = False
    down_since: float | None = None  # monotonic time it stopped listening (None while listening or never started)
    overflows: int = 0
    restarts: int = 0
    resync_pending: bool = False  # notifications were lost: a full resync once listening again
    last_error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    socket: Any = field(default=None, repr=False)  # the open netlink socket, closed by `stop()`

    def describe(self) -> dict[str, Any]:
        return {"listening": self.listening, "overflows": self.overflows, "restarts": self.restarts,
                "lastError": self.last_error}


def _index_of(interface: str) -> int | None:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        return None


def is_overflow(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOBUFS


class NetlinkMonitor:
    """Listens in the current network namespace from `start()` until `stop()`."""

    def __init__(self, settings: Settings, events: DataplaneEvents, *, receive_buffer: int = RECEIVE_BUFFER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.events = events
        self.receive_buffer = receive_buffer
        self.clock = clock
        self._stopping = threading.Event()
        self._bodies: dict[str, Callable[[WatcherState], None]] = {"rtnetlink": self._watch_rtnetlink}
        self.watchers = {name: WatcherState(name) for name in self._bodies}

    def start(self) -> None:
        for state in self.watchers.values():
            state.down_since = self.clock()
            state.thread = threading.Thread(target=self._supervise, args=(state,),
                                            name=f"wgcni-monitor-{state.name}", daemon=True)
            state.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for state in self.watchers.values():
            if state.socket is not None:
                state.socket.close()  # its blocked receive returns nothing: the watcher ends

    def health(self) -> tuple[bool, str]:
        """(ok, message): every watcher's thread runs and it listens, or has been trying again for less than
        DOWN_GRACE seconds."""
        now = self.clock()
        for state in self.watchers.values():
            if state.thread is not None and not state.thread.is_alive() and not self._stopping.is_set():
                return False, f"netlink monitor {state.name}: its thread ended ({state.last_error or 'no error'})"
            if not state.listening and state.down_since is not None and now - state.down_since > DOWN_GRACE:
                return False, (f"netlink monitor {state.name}: not listening for {now - state.down_since:.0f}s "
                               f"({state.restarts} restarts; {state.last_error or 'starting'})")
        return True, "netlink monitor listening"

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: state.describe() for name, state in self.watchers.items()}

    # ---- supervision --------------------------------------------------------------------------------------

    def _supervise(self, state: WatcherState) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._bodies[state.name](state)
                return
            except Exception as error:  # noqa: BLE001 - any failure: reopen, and resync what may have been missed
                if self._stopping.is_set():
                    return
                state.listening = False
                state.down_since = self.clock() if state.down_since is None else state.down_since
                state.resync_pending = True
                if is_overflow(error):
                    state.overflows += 1
                    log.warning("netlink monitor %s: notifications lost (ENOBUFS); reopening, then a full resync",
                                state.name)
                    continue
                state.last_error = f"{type(error).__name__}: {error}"
                delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
                log.error("netlink monitor %s failed (reopening in %.1fs, then a full resync): %s", state.name,
                          delay, state.last_error)
                attempt += 1
                state.restarts += 1
                if self._stopping.wait(delay):
                    return
            finally:
                state.socket = None

    def _listening(self, state: WatcherState, subscribed: Any) -> None:
        """Called by a watcher once subscribed: after a fault, what happened while it was down is read back."""
        state.socket = subscribed
        if self._stopping.is_set():
            subscribed.close()
        state.listening, state.down_since = True, None
        if state.resync_pending:
            state.resync_pending = False
            self.events.trigger_resync()
            self.events.pod_routes_changed()

    # ---- watchers -----------------------------------------------------------------------------------------

    def _watch_rtnetlink(self, state: WatcherState) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_IFADDR,
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV4_RULE,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_IPV6_RULE,
            RTMGRP_LINK,
        )

        interface, table = self.settings.interface, self.settings.route_table
        pod_prefixes = self.settings.pod_interface_prefixes
        host_lengths = set(HOST_PREFIX_LENGTH.values())
        events = self.events
        with IPRoute(rcvbuf=self.receive_buffer) as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
                     | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
            wireguard_index = _index_of(interface)  # no request on a subscribed socket: an overflow loses its answer
            self._listening(state, ipr)
            while not self._stopping.is_set():
                messages = ipr.get()
                if not messages:
                    raise ConnectionError("the rtnetlink socket was closed")
                for message in messages:
                    event = message["event"]
                    if event in ("RTM_DELLINK", "RTM_NEWLINK") and message.get("ifname") == interface:
                        wireguard_index = message["index"]
                        if event == "RTM_DELLINK" or not message["flags"] & IFF_UP:
                            events.dataplane_changed("device")
                    elif event == "RTM_DELADDR" and message["index"] == wireguard_index:
                        events.dataplane_changed("routes")
                    elif event == "RTM_DELRULE" and message.get("table") == table:
                        events.dataplane_changed("rules")
                    elif event == "RTM_DELROUTE" and message.get("table") == table:
                        events.route_removed(
                            ipaddress.ip_network(f"{message.get('dst')}/{message['dst_len']}", strict=False))
                    elif event in ("RTM_NEWROUTE", "RTM_DELROUTE") and message.get("table") == MAIN_TABLE:
                        if message["dst_len"] in host_lengths:
                            events.pod_routes_changed()
                    elif event == "RTM_DELLINK" and is_pod_interface(message.get("ifname"), pod_prefixes):
                        events.pod_routes_changed()
