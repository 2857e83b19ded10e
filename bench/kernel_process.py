"""The WireGuard device and routing table fakes in a child process, so the hook's process holds only the hook.

In production the device's peers and AllowedIPs and the table's routes are kernel (or wireguard-go) memory, not the
hook's. P3 measures the hook's peak RSS at 5 000 nodes x 250 pod IPs, so the fakes that stand in for the kernel run
here, in a forked child: `RemoteWireGuard` and `RemoteRouting` implement the applier protocols by sending each call
through a pipe, as the real appliers send netlink or UAPI messages - in bounded chunks (a netlink batch, a dump's
parts), so the transport never holds a second copy of a 1.25 M-op plan or table. Prefixes cross as the plain int
of their packed form (`prefix_order`, pickled in C); read-backs arrive as new objects, as a real read-back does.
Checks of the kernel's state run in the child (`digest`, `covers`), so verifying 1.25 M routes never copies them into
the measured process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from node_hook.addresses import IPNetwork, prefix_of_order, prefix_order
from node_hook.apply.fakes import FakeRouting, FakeWireGuard
from node_hook.contracts import (
    DeleteRoute,
    DeviceSpec,
    DeviceState,
    DeviceStream,
    PeerOp,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    RoutingApplier,
    RoutingOp,
    SetRoute,
    TableState,
    TableStream,
    UpsertPeer,
    WireGuardBackend,
)
from node_hook.model import RouteKind

ROUTES_PER_CHUNK = 8192  # about what one 32 KiB netlink batch of route messages or one dump part carries
PEERS_PER_CHUNK = 32  # peers of 250 AllowedIPs each
_KINDS = {kind._value_: kind for kind in RouteKind}


# ---- wire form -----------------------------------------------------------------------------------------------

def _out(prefixes: Iterable[IPNetwork]) -> list[int]:
    return [prefix_order(prefix) + 0 for prefix in prefixes]  # `+ 0`: the plain int


def _in(values: Iterable[int]) -> list[IPNetwork]:
    return [prefix_of_order(value) for value in values]


def _routing_op_out(op: RoutingOp) -> tuple:
    if type(op) is SetRoute:
        return 0, prefix_order(op.prefix) + 0, op.kind._value_
    if type(op) is DeleteRoute:
        return 1, prefix_order(op.prefix) + 0
    return 2, op  # rules and the device address: a handful, pickled as they are


def _routing_op_in(item: tuple) -> RoutingOp:
    if item[0] == 0:
        return SetRoute(prefix_of_order(item[1]), _KINDS[item[2]])
    if item[0] == 1:
        return DeleteRoute(prefix_of_order(item[1]))
    return item[1]  # type: ignore[no-any-return]


def _peer_op_out(op: PeerOp) -> tuple:
    if type(op) is UpsertPeer:
        return 0, op.public_key, op.endpoint, _out(op.allowed_ips), op.replace_allowed_ips, op.persistent_keepalive
    if type(op) is RemoveAllowedIPs:
        return 1, op.public_key, _out(op.allowed_ips)
    return 2, op.public_key


def _peer_op_in(item: tuple) -> PeerOp:
    if item[0] == 0:
        return UpsertPeer(item[1], item[2], tuple(_in(item[3])), item[4], item[5])
    if item[0] == 1:
        return RemoveAllowedIPs(item[1], tuple(_in(item[2])))
    return RemovePeer(item[1])


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def peak_rss_mb() -> float:
    """This process's own peak RSS (`VmHWM` of its memory map). Not `ru_maxrss`: Linux folds the peak of the
    process that forked and exec'd it into that (a P3 worker started by `bench.run` reported the runner's 90 MB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def state_digest(peers: dict[str, frozenset[IPNetwork]], routes: Iterable[tuple[IPNetwork, str]]) -> tuple[int, ...]:
    """An order-independent digest of peers (key -> AllowedIPs) and routes (prefix, kind value), computed without
    building a copy of either: the same value in the hook's process (from the model) and in the child (from the
    fakes) means the same state. Ints and strings hash alike in both (the child is forked: same hash seed)."""
    mask = (1 << 64) - 1
    peer_sum = sum(hash((key, sum(map(hash, allowed)) & mask, len(allowed))) for key, allowed in peers.items())
    route_sum = count = 0
    for prefix, kind in routes:
        route_sum += hash((hash(prefix), kind))
        count += 1
    return len(peers), peer_sum & mask, count, route_sum & mask


# ---- the child --------------------------------------------------------------------------------------------------

def _serve(connection: multiprocessing.connection.Connection, parent_end: multiprocessing.connection.Connection,
           interface: str, table: int) -> None:
    parent_end.close()  # the fork's copy of the hook's end: with it open, the hook closing its end is no EOF here
    wireguard, routing = FakeWireGuard(interface), FakeRouting(table)
    reading: dict[str, Iterator[list]] = {}

    def start_device_read() -> tuple | None:
        device = wireguard.read()
        if device is None:
            return None
        peers = list(device.peers.values())
        reading["wg"] = ([(peer.public_key, peer.endpoint, _out(peer.allowed_ips), peer.persistent_keepalive)
                          for peer in chunk] for chunk in _chunks(peers, PEERS_PER_CHUNK))
        return device.name, device.public_key, device.listen_port, device.fwmark, device.mtu, device.up

    def start_table_read(routes: bool = True) -> tuple:
        state = routing.read(routes)
        table = list(state.routes.items())
        reading["routing"] = ([(prefix_order(prefix) + 0, kind) for prefix, kind in chunk]
                              for chunk in _chunks(table, ROUTES_PER_CHUNK))
        return state.rules, _out(state.device_addresses)

    def covers(public_key: str, value: int) -> bool:
        """Whether the device's peer `public_key` holds prefix `value` and the table routes it into the tunnel."""
        prefix = prefix_of_order(value)
        peer = wireguard.device.peers.get(public_key) if wireguard.device is not None else None
        allowed = peer is not None and any(prefix.subnet_of(held) for held in peer.allowed_ips
                                           if held.version == prefix.version)
        return allowed and routing.routes.get(prefix) == RouteKind.WIREGUARD._value_

    def digest() -> tuple[int, ...]:
        device = wireguard.device
        peers = {key: peer.allowed_ips for key, peer in device.peers.items()} if device is not None else {}
        return state_digest(peers, routing.routes.items())

    calls: dict[str, Callable[..., Any]] = {
        "wg.read": start_device_read,
        "wg.ensure_device": wireguard.ensure_device,
        "wg.apply_peer_ops": lambda wire: wireguard.apply_peer_ops([_peer_op_in(item) for item in wire]),
        "wg.greet": wireguard.greet,
        "wg.delete_device": wireguard.delete_device,
        "routing.read": start_table_read,
        "routing.apply": lambda wire: routing.apply([_routing_op_in(item) for item in wire]),
        "routing.flush": routing.flush,
        "next": lambda what: next(reading[what], None),
        "covers": covers,
        "digest": digest,
        "usage": lambda: (peak_rss_mb(), time.process_time()),
    }
    while True:
        try:
            name, args = connection.recv()
        except EOFError:
            return
        try:
            connection.send((True, calls[name](*args)))
        except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it as the applier would
            connection.send((False, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"))


class KernelProcess:
    """The child holding the fakes; `wireguard` and `routing` are the appliers the reconciler is given."""

    def __init__(self, interface: str, table: int) -> None:
        context = multiprocessing.get_context("fork")  # forked before the hook's state exists: a small child
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self._connection, interface, table), daemon=True)
        self._process.start()
        child.close()
        self.wireguard: WireGuardBackend = RemoteWireGuard(self)
        self.routing: RoutingApplier = RemoteRouting(self)

    def call(self, name: str, *args: object) -> Any:
        self._connection.send((name, args))
        ok, value = self._connection.recv()
        if not ok:
            raise RuntimeError(f"kernel process: {name}: {value}")
        return value

    def parts(self, what: str) -> Iterator[list]:
        """The parts of the read of `what` started by the last call (a dump's messages)."""
        while (part := self.call("next", what)) is not None:
            yield part

    def covers(self, public_key: str, prefix: IPNetwork) -> bool:
        return bool(self.call("covers", public_key, prefix_order(prefix) + 0))

    def digest(self) -> tuple[int, ...]:
        return tuple(self.call("digest"))

    def usage(self) -> tuple[float, float]:
        """(peak RSS in MB, CPU seconds) of the kernel process."""
        peak, cpu = self.call("usage")
        return float(peak), float(cpu)

    def close(self) -> None:
        self._connection.close()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


class RemoteWireGuard:
    """`WireGuardBackend` of the device fake in the kernel process."""

    kind = "fake"

    def __init__(self, kernel: KernelProcess) -> None:
        self._kernel = kernel

    def read(self) -> DeviceState | None:
        stream = self.read_stream()
        if stream is None:
            return None
        return replace(stream.device, peers={peer.public_key: peer for peer in stream.peers})

    def read_stream(self) -> DeviceStream | None:
        head = self._kernel.call("wg.read")
        if head is None:
            return None
        return DeviceStream(DeviceState(*head, {}), self._peers())

    def _peers(self) -> Iterator[PeerState]:
        for part in self._kernel.parts("wg"):
            for key, endpoint, allowed, keepalive in part:
                yield PeerState(key, endpoint, frozenset(_in(allowed)), keepalive)

    def ensure_device(self, spec: DeviceSpec) -> None:
        self._kernel.call("wg.ensure_device", spec)

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        for chunk in _chunks(ops, PEERS_PER_CHUNK):
            self._kernel.call("wg.apply_peer_ops", [_peer_op_out(op) for op in chunk])

    def greet(self, peers: Mapping[str, int]) -> None:
        self._kernel.call("wg.greet", dict(peers))

    def delete_device(self) -> None:
        self._kernel.call("wg.delete_device")

    def close(self) -> None:
        """Nothing of its own to release: the kernel process is closed by its owner."""


class RemoteRouting:
    """`RoutingApplier` of the table fake in the kernel process."""

    def __init__(self, kernel: KernelProcess) -> None:
        self._kernel = kernel

    def read(self, routes: bool = True) -> TableState:
        stream = self.read_stream(routes)
        return replace(stream.table, routes=dict(stream.routes))

    def read_stream(self, routes: bool = True) -> TableStream:
        rules, addresses = self._kernel.call("routing.read", routes)
        return TableStream(TableState({}, rules, frozenset(_in(addresses))), self._routes())

    def _routes(self) -> Iterator[tuple[IPNetwork, str]]:
        for part in self._kernel.parts("routing"):
            for value, kind in part:
                yield prefix_of_order(value), kind

    def apply(self, ops: list[RoutingOp]) -> None:
        for chunk in _chunks(ops, ROUTES_PER_CHUNK):
            self._kernel.call("routing.apply", [_routing_op_out(op) for op in chunk])

    def flush(self) -> None:
        self._kernel.call("routing.flush")
