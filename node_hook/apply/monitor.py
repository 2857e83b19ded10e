"""The netlink monitor: what changes on the node outside the hook's own writes, turned into engine events.

It reads, never writes (the appliers beside it are the only writers). Its watchers, each on a thread of its own, tell
the `DataplaneEvents` receiver (the engine), which marks that aspect out of sync and repairs it in the next pass:
- rtnetlink (link, address, route and rule notifications): our WireGuard device deleted, set down or given another
  MTU -> `device`; its address removed -> `routes` (the kernel drops the device's routes with its last IPv4
  address, silently); a rule pointing at our table (or a bypass rule) added or removed -> `rules` (read without
  the table's routes); a route of our table added, changed or removed -> `routes_seen`
  (the engine rechecks alone each that is not what it wants; its own writes are); a host route of the main table
  added or removed, or a pod interface deleted -> `pod_routes_changed()`, so the local pods learned from
  azure-vnet's host routes follow (IPv4 removes a deleted link's routes without RTM_DELROUTE, hence the link);
- nftables (the NFNLGRP_NFTABLES notifications of every nftables transaction): anything in our tables (the strict
  table's too) -> `firewall`;
- poll: every `POLL_INTERVAL` the sysctls the hook sets are read from /proc (no notification exists for them; two
  small files) -> `sysctls` when one differs;
- wireguard (kernel backend): the WG_CMD_SET_DEVICE requests others send for our device, captured by the backend
  (node_hook.apply.wg_kernel.ForeignWriteCapture) -> `wireguard_changed` (the userspace backend reports its own:
  its UAPI proxy sees every `wg set`). Without nlmon in the kernel it is `unavailable`: status says so, and such
  writes are found by the resync.

Faults. Each watcher runs under a supervisor. An overflow of its socket (ENOBUFS: the kernel dropped notifications)
reopens it at once (a fresh socket, subscribed again) and asks
for a read-back of what the lost notifications could have been about (rtnetlink: a full resync; nftables: the
firewall); any other error (a closed socket, a failed decode) is logged, and the socket is reopened after a backoff
(`RESTART_DELAYS`), followed by the same read-back. `health()` says whether every watcher is listening: one that is
not listening again within `DOWN_GRACE` seconds, or whose thread ended, fails `/healthz`, so the kubelet restarts
the hook.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node_hook.addresses import IPNetwork
from node_hook.apply.firewall import strict_table_name
from node_hook.apply.routes import decode_route
from node_hook.config import Settings
from node_hook.contracts import CaptureUnavailable, WireGuardChange
from node_hook.pod_routes import HOST_PREFIX_LENGTH, MAIN_TABLE, is_pod_interface

log = logging.getLogger(__name__)

IFF_UP = 1
RECEIVE_BUFFER = 8 << 20  # a burst past it is an overflow, answered by a read-back
RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
HEALTHY_RUN = 30.0  # a watcher that listened this long before failing restarts from the first delay again
DOWN_GRACE = 15.0  # a watcher not listening for longer fails health (its restarts keep failing)
POLL_INTERVAL = 0.5  # seconds between two reads of the sysctls
RECEIVE_TIMEOUT = 1.0  # a raw socket's receive wakes this often to see `stop()` (closing it does not wake it)

# rtnetlink (linux/rtnetlink.h, if_link.h, fib_rules.h). Parsed here with struct, not pyroute2: the hook's own route
# writes come back as notifications, 1.25 M of them when it programs a 5 000 x 250 table, and pyroute2 decoding
# each would cost far more than the writes (the routing applier's decoder is shared: routes.decode_route).
NETLINK_ROUTE = 0
RTNETLINK_GROUPS = 0x1 | 0x10 | 0x40 | 0x400 | 0x80 | 0x40000  # link, IPv4 address, IPv4/IPv6 route and rule
RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR = 16, 17, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
IFLA_IFNAME, IFLA_MTU = 3, 4
FRA_PRIORITY, FRA_TABLE = 6, 15
SO_RCVBUFFORCE = 33  # root may pass net.core.rmem_max (what the routing applier does too)
_ADDRESS_SIZE = {2: 4, 10: 16}  # AF_INET, AF_INET6
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_U32 = struct.Struct("=I")

# nfnetlink (linux/netfilter/nfnetlink.h, nf_tables.h)
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 16  # the end of every transaction, of any table
NFPROTO_INET, NFPROTO_ARP = 1, 3  # the families of our two tables (node_hook.apply.firewall.FAMILIES)
NFTA_TABLE = 1  # the table's name is attribute 1 of every table, chain, rule, set, element, object, flowtable
NLA_TYPE_MASK = 0x3FFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_ATTRIBUTE = struct.Struct("=HH")


class DataplaneEvents(Protocol):
    def dataplane_changed(self, *aspects: str) -> None: ...

    def routes_seen(self, routes: Mapping[IPNetwork, str | None]) -> None: ...

    def wireguard_changed(self, change: WireGuardChange) -> None: ...

    def pod_routes_changed(self) -> None: ...

    def trigger_resync(self) -> int: ...


@dataclass
class WatcherState:
    """What one watcher thread is doing, for `health()` and `status`."""

    name: str
    listening: bool = False
    down_since: float | None = None  # monotonic time it stopped listening (None while listening or never started)
    listening_since: float | None = None  # monotonic time it last began listening
    overflows: int = 0
    restarts: int = 0
    unavailable: str | None = None  # why this watcher cannot run on this node (it is not restarted)
    resync_pending: bool = False  # notifications were lost: a read-back once listening again
    last_error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    socket: Any = field(default=None, repr=False)  # the open netlink socket, closed by `stop()`

    def describe(self) -> dict[str, Any]:
        return {"listening": self.listening, "overflows": self.overflows, "restarts": self.restarts,
                "lastError": self.last_error, "unavailable": self.unavailable}


def _index_of(interface: str) -> int | None:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        return None


def is_overflow(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOBUFS


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each netlink message in a datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind = _HEADER.unpack_from(data, offset)[:2]
        if length < _HEADER.size:
            return
        yield kind, offset, min(offset + length, len(data))
        offset += (length + 3) & ~3


def _attributes(data: bytes, offset: int, end: int, wanted: tuple[int, ...]) -> dict[int, bytes]:
    """The payloads of the `wanted` top-level attributes from `offset` to `end`."""
    found: dict[int, bytes] = {}
    while offset + 4 <= end:
        size, number = _ATTRIBUTE.unpack_from(data, offset)
        if size < 4:
            break
        if number & NLA_TYPE_MASK in wanted:
            found[number & NLA_TYPE_MASK] = data[offset + 4:offset + size]
        offset += (size + 3) & ~3
    return found


def _receive_buffer(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def nftables_tables(data: bytes) -> set[tuple[int, str]]:
    """(family, table) of every nftables object a datagram of NFNLGRP_NFTABLES notifications is about. Parsed here
    with struct, not pyroute2: kube-proxy's and iptables-nft's transactions arrive too, and decoding their rules
    would cost far more than reading one attribute."""
    tables: set[tuple[int, str]] = set()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind = _HEADER.unpack_from(data, offset)[:2]
        if length < _HEADER.size:
            break
        end = min(offset + length, len(data))
        if kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF != NFT_MSG_NEWGEN:
            family = data[offset + _HEADER.size]
            attribute = offset + _HEADER.size + 4  # after struct nfgenmsg
            while attribute + 4 <= end:
                size, number = _ATTRIBUTE.unpack_from(data, attribute)
                if size < 4:
                    break
                if number & NLA_TYPE_MASK == NFTA_TABLE:
                    name = data[attribute + 4:attribute + size].split(b"\0", 1)[0]
                    tables.add((family, name.decode(errors="replace")))
                    break
                attribute += (size + 3) & ~3
        offset += (length + 3) & ~3
    return tables


class NetlinkMonitor:
    """Watches the current network namespace from `start()` until `stop()`.

    `sysctls` are the values the hook sets (name with `/` -> value), `firewall_table` the name of its nftables tables,
    `mtu` the device's and `wireguard_capture` what opens the kernel backend's capture; `sysctl_root` and
    `poll_interval` are for the tests."""

    def __init__(self, settings: Settings, events: DataplaneEvents, *, sysctls: Mapping[str, str] | None = None,
                 firewall_table: str = "wgcni", mtu: int | None = None, receive_buffer: int = RECEIVE_BUFFER,
                 sysctl_root: Path = Path("/proc/sys"), poll_interval: float = POLL_INTERVAL,
                 wireguard_capture: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.events = events
        self.sysctls = dict(sysctls or {})
        self.firewall_table = firewall_table
        self.mtu = mtu
        self.receive_buffer = receive_buffer
        self.sysctl_root = sysctl_root
        self.poll_interval = poll_interval
        self.clock = clock
        self._stopping = threading.Event()
        self._bodies: dict[str, Callable[[WatcherState], None]] = {
            "rtnetlink": self._watch_rtnetlink, "nftables": self._watch_nftables, "poll": self._poll,
        }
        self._on_lost: dict[str, Callable[[], None]] = {
            "rtnetlink": self._lost_rtnetlink, "nftables": lambda: events.dataplane_changed("firewall"),
            "poll": lambda: None,
        }
        self.wireguard_capture = wireguard_capture  # makes a ForeignWriteCapture (kernel backend)
        if wireguard_capture is not None:
            self._bodies["wireguard"] = self._watch_wireguard
            self._on_lost["wireguard"] = lambda: events.dataplane_changed("device", "peers")
        self.watchers = {name: WatcherState(name) for name in self._bodies}

    def start(self) -> None:
        for state in self.watchers.values():
            state.down_since = self.clock()
            state.thread = threading.Thread(target=self._supervise, args=(state,),
                                            name=f"wgcni-monitor-{state.name}", daemon=True)
            state.thread.start()

    def stop(self) -> None:
        """Stop every watcher and wait for it to end, so what a watcher put up (the nlmon link) is gone on return."""
        self._stopping.set()
        for state in self.watchers.values():
            if state.socket is not None:
                state.socket.close()  # its receive fails at the latest after RECEIVE_TIMEOUT: the watcher ends
        for state in self.watchers.values():
            if state.thread is not None and state.thread is not threading.current_thread():
                state.thread.join(timeout=2 * RECEIVE_TIMEOUT)

    def health(self) -> tuple[bool, str]:
        """(ok, message): every watcher's thread runs and it listens, or has been trying again for less than
        DOWN_GRACE seconds."""
        now = self.clock()
        for state in self.watchers.values():
            if state.unavailable is not None:
                continue
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
                if state.listening and state.listening_since is not None \
                        and self.clock() - state.listening_since >= HEALTHY_RUN:
                    attempt = 0  # a fault after a healthy run is a new fault, not the last one's next attempt
                state.listening = False
                state.down_since = self.clock() if state.down_since is None else state.down_since
                state.resync_pending = True
                if is_overflow(error):
                    state.overflows += 1
                    log.warning("netlink monitor %s: notifications lost (ENOBUFS); reopening, then a read-back",
                                state.name)
                    continue
                state.last_error = f"{type(error).__name__}: {error}"
                delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
                log.error("netlink monitor %s failed (reopening in %.1fs, then a read-back): %s", state.name,
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
        if self._stopping.is_set() and subscribed is not None:
            subscribed.close()
        state.listening, state.down_since, state.listening_since = True, None, self.clock()
        if state.resync_pending:
            state.resync_pending = False
            self._on_lost[state.name]()

    def _datagrams(self, state: WatcherState, subscribed: socket.socket) -> Iterator[bytes]:
        """The datagrams of a subscribed netlink socket until `stop()`; it is listening from the first wait on."""
        subscribed.settimeout(RECEIVE_TIMEOUT)
        self._listening(state, subscribed)
        while not self._stopping.is_set():
            try:
                yield subscribed.recv(1 << 16)
            except TimeoutError:
                continue

    def _lost_rtnetlink(self) -> None:
        self.events.trigger_resync()
        self.events.pod_routes_changed()

    # ---- watchers -----------------------------------------------------------------------------------------

    def _watch_rtnetlink(self, state: WatcherState) -> None:
        interface, table = self.settings.interface, self.settings.route_table
        bypass_priority = self.settings.bypass_rule_priority
        pod_prefixes = self.settings.pod_interface_prefixes
        host_lengths = set(HOST_PREFIX_LENGTH.values())
        events = self.events
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as rtnl:
            _receive_buffer(rtnl, self.receive_buffer)
            rtnl.bind((0, RTNETLINK_GROUPS))
            wireguard_index = _index_of(interface)
            for data in self._datagrams(state, rtnl):
                routes: dict[IPNetwork, str | None] = {}
                for kind, start, end in _messages(data):
                    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                        family, prefixlen = data[start + 16], data[start + 17]
                        size = _ADDRESS_SIZE.get(family)
                        if size is None:
                            continue
                        route_table, prefix, route_kind = decode_route(data, start, end, size, wireguard_index)
                        if route_table == table:
                            routes[prefix] = None if kind == RTM_DELROUTE else route_kind
                        elif route_table == MAIN_TABLE and prefixlen in host_lengths:
                            events.pod_routes_changed()
                    elif kind in (RTM_NEWLINK, RTM_DELLINK):
                        index, flags = _IFINFOMSG.unpack_from(data, start + 16)[2:4]
                        attributes = _attributes(data, start + 32, end, (IFLA_IFNAME, IFLA_MTU))
                        name = attributes.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
                        if name == interface:
                            wireguard_index = index
                            mtu = attributes.get(IFLA_MTU)
                            if (kind == RTM_DELLINK or not flags & IFF_UP or (
                                    self.mtu is not None and mtu is not None and _U32.unpack(mtu)[0] != self.mtu)):
                                events.dataplane_changed("device")
                        elif kind == RTM_DELLINK and is_pod_interface(name, pod_prefixes):
                            events.pod_routes_changed()
                    elif kind == RTM_DELADDR and _IFADDRMSG.unpack_from(data, start + 16)[4] == wireguard_index:
                        # the device's last IPv4 address gone takes its routes with it, without RTM_DELROUTE
                        events.dataplane_changed("routes")
                    elif kind in (RTM_NEWRULE, RTM_DELRULE):
                        attributes = _attributes(data, start + 28, end, (FRA_TABLE, FRA_PRIORITY))
                        rule_table = (_U32.unpack(attributes[FRA_TABLE])[0] if FRA_TABLE in attributes
                                      else data[start + 20])
                        priority = _U32.unpack(attributes[FRA_PRIORITY])[0] if FRA_PRIORITY in attributes else 0
                        if rule_table == table or (rule_table == MAIN_TABLE and priority == bypass_priority):
                            events.dataplane_changed("rules")
                if routes:
                    events.routes_seen(routes)

    def _watch_nftables(self, state: WatcherState) -> None:
        ours = {(NFPROTO_INET, self.firewall_table), (NFPROTO_ARP, self.firewall_table),
                (NFPROTO_INET, strict_table_name(self.firewall_table))}
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as nft:
            _receive_buffer(nft, self.receive_buffer)
            nft.bind((0, 0))
            nft.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            for data in self._datagrams(state, nft):
                if nftables_tables(data) & ours:
                    self.events.dataplane_changed("firewall")

    def _watch_wireguard(self, state: WatcherState) -> None:
        assert self.wireguard_capture is not None
        capture = self.wireguard_capture()
        try:
            capture.open()
        except CaptureUnavailable as error:
            state.unavailable = str(error)
            log.warning("writes by others to the WireGuard device are found by the resync only: %s", error)
            return
        try:
            self._listening(state, capture.socket)
            while not self._stopping.is_set():
                for change in capture.receive():
                    self.events.wireguard_changed(change)
        finally:
            capture.close()

    def _poll(self, state: WatcherState) -> None:
        """What has no notification, read every `poll_interval`: the sysctls. Each read that differs from what the
        hook sets is reported (a pass reading two sysctls costs about a millisecond): reporting only changes of the
        value missed a value set back and reset again between two reads."""
        self._listening(state, None)
        while not self._stopping.wait(self.poll_interval):
            for name, wanted in self.sysctls.items():
                try:
                    value: str | None = (self.sysctl_root / name).read_text().strip()
                except FileNotFoundError:
                    value = None  # a per-device sysctl without the device: the device's repair recreates it
                if value is not None and value != wanted:
                    self.events.dataplane_changed("sysctls")
                    break
