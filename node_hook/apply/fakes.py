"""In-memory fakes of every applier that behave like the real ones, with fail-next failure injection.

- `FakeWireGuard`: a device whose peers own AllowedIPs the way WireGuard's allowed-IPs trie does (a prefix
  belongs to at most one peer; giving it to a peer takes it from the other), `RemoveAllowedIPs` works like the
  userspace backend's zero-key peer (the temporary peer takes the prefixes from whoever holds them, then is deleted).
- `FakeRouting`: one table of routes (replace semantics), the rules pointing at it and the device's addresses;
  deleting a missing route or rule and adding an existing rule or address succeed, as in the real applier.
- `FakeFirewall`, `FakeSysctls`: an nftables table rendered to a listing; sysctls with persisted originals.
- `FakePodRoutes`: the pod host routes of the main table (a source the daemon reads, not an applier).

`fail_next` is a set of operation names; the next call of such an operation raises `InjectedFailure` (for
`apply_peer_ops` / routing `apply` after applying the first op, like a UAPI transaction or netlink batch that
fails half-way) and removes the name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from node_hook.addresses import IPNetwork
from node_hook.apply.firewall import DIRECTIONS, render_firewall, render_strict, render_strict_boot
from node_hook.contracts import (
    AddDeviceAddress,
    AddRule,
    DeleteRoute,
    DeleteRule,
    DeviceSpec,
    DeviceState,
    DeviceStream,
    FirewallSpec,
    PeerOp,
    PeerState,
    PlaintextCounters,
    RemoveAllowedIPs,
    RemovePeer,
    RoutingOp,
    RuleSpec,
    SetRoute,
    TableState,
    TableStream,
    UpsertPeer,
)
from node_hook.keys import public_key_of


class InjectedFailure(RuntimeError):
    """Raised by a fake when a failure was injected with fail_next."""


T = TypeVar("T")
_END = object()


class _FailNext:
    def __init__(self) -> None:
        self.fail_next: set[str] = set()
        self.calls: list[str] = []

    def _maybe_fail(self, operation: str) -> None:
        self.calls.append(operation)
        if operation in self.fail_next:
            self.fail_next.discard(operation)
            raise InjectedFailure(f"injected failure in {operation}")

    def _batch(self, operation: str, ops: Iterable[T]) -> Iterator[T]:
        """`ops`, taken once, as a batch that fails half-way: an injected failure comes after the first op (before
        a lone one)."""
        iterator = iter(ops)
        first = next(iterator, _END)
        if first is _END:
            return
        second = next(iterator, _END)
        if second is _END:
            self._maybe_fail(operation)
            yield first  # type: ignore[misc]
            return
        yield first  # type: ignore[misc]
        self._maybe_fail(operation)
        yield second  # type: ignore[misc]
        yield from iterator


class FakeWireGuard(_FailNext):
    """A WireGuardBackend in memory."""

    kind = "fake"
    operations = ("read", "ensure_device", "apply_peer_ops", "greet", "delete_device")

    def __init__(self, name: str = "wgcni0") -> None:
        super().__init__()
        self.name = name
        self.device: DeviceState | None = None
        self.private_key: bytes | None = None
        # prefix -> key of the peer holding it, like the kernel's allowed-IPs trie answers "who has this prefix"
        # without visiting every peer (a scan per op made a 5 000-peer plan quadratic: bench/p3_scale.py).
        # Rebuilt whenever the peers dict is not the one it was built for (tests replace the device).
        self._holder: dict[IPNetwork, str] = {}
        self._indexed_peers: dict[str, PeerState] | None = None
        self.greetings: list[str] = []  # keys sent a keepalive by greet(), in order

    def read(self) -> DeviceState | None:
        self._maybe_fail("read")
        return self.device

    def read_stream(self) -> DeviceStream | None:
        self._maybe_fail("read")
        if self.device is None:
            return None
        return DeviceStream(replace(self.device, peers={}), iter(list(self.device.peers.values())))

    def ensure_device(self, spec: DeviceSpec) -> None:
        self._maybe_fail("ensure_device")
        peers = self.device.peers if self.device is not None else {}
        self.private_key = spec.private_key
        self.device = DeviceState(spec.name, public_key_of(spec.private_key), spec.listen_port, spec.fwmark,
                                  spec.mtu, True, dict(peers))

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        if self.device is None:
            raise RuntimeError(f"WireGuard device {self.name} does not exist")
        for op in self._batch("apply_peer_ops", ops):
            self._apply(op)

    def greet(self, peers: Mapping[str, int]) -> None:
        self._maybe_fail("greet")
        if self.device is None:
            raise RuntimeError(f"WireGuard device {self.name} does not exist")
        self.greetings.extend(key for key in peers if key in self.device.peers)

    def _holders(self) -> dict[IPNetwork, str]:
        assert self.device is not None
        if self._indexed_peers is not self.device.peers:
            self._holder = {prefix: key for key, peer in self.device.peers.items() for prefix in peer.allowed_ips}
            self._indexed_peers = self.device.peers
        return self._holder

    def _take(self, prefixes: tuple[IPNetwork, ...], keep_for: str | None) -> None:
        assert self.device is not None
        peers = self.device.peers
        holders = self._holders()
        taken: dict[str, set[IPNetwork]] = {}
        for prefix in prefixes:
            key = holders.get(prefix)
            if key is not None and key != keep_for and key in peers and prefix in peers[key].allowed_ips:
                taken.setdefault(key, set()).add(prefix)
                del holders[prefix]
        for key, lost in taken.items():
            peers[key] = replace(peers[key], allowed_ips=peers[key].allowed_ips - lost)

    def _apply(self, op: PeerOp) -> None:
        assert self.device is not None
        peers = self.device.peers
        if isinstance(op, UpsertPeer):
            self._take(op.allowed_ips, op.public_key)
            old = peers.get(op.public_key)
            base = frozenset() if old is None or op.replace_allowed_ips else old.allowed_ips
            holders = self._holders()
            if old is not None and op.replace_allowed_ips:
                for prefix in old.allowed_ips:
                    holders.pop(prefix, None)
            for prefix in op.allowed_ips:
                holders[prefix] = op.public_key
            peers[op.public_key] = PeerState(
                op.public_key,
                op.endpoint if op.endpoint is not None else (old.endpoint if old else None),
                base | frozenset(op.allowed_ips),
                op.persistent_keepalive,
                old.latest_handshake if old else 0.0,
                old.rx_bytes if old else 0,
                old.tx_bytes if old else 0,
            )
        elif isinstance(op, RemoveAllowedIPs):
            self._take(op.allowed_ips, None)
        elif isinstance(op, RemovePeer):
            old = peers.pop(op.public_key, None)
            if old is not None:
                holders = self._holders()
                for prefix in old.allowed_ips:
                    if holders.get(prefix) == op.public_key:
                        del holders[prefix]

    def delete_device(self) -> None:
        self._maybe_fail("delete_device")
        self.device = None

    def close(self) -> None:
        pass


class FakeRouting(_FailNext):
    """A RoutingApplier in memory (one table and the rules that point at it)."""

    operations = ("read", "apply", "flush")

    def __init__(self, table: int = 51820) -> None:
        super().__init__()
        self.table = table
        self.routes: dict[IPNetwork, str] = {}
        self.rules: set[RuleSpec] = set()
        self.device_addresses: set[IPNetwork] = set()
        self.reads: list[bool] = []  # the `routes` argument of each read (a streamed read reads the routes: True)

    def read(self, routes: bool = True) -> TableState:
        self._maybe_fail("read")
        self.reads.append(routes)
        return TableState(dict(self.routes) if routes else {}, frozenset(self.rules),
                          frozenset(self.device_addresses))

    def read_stream(self) -> TableStream:
        self._maybe_fail("read")
        self.reads.append(True)
        return TableStream(TableState({}, frozenset(self.rules), frozenset(self.device_addresses)),
                           iter(list(self.routes.items())))

    def apply(self, ops: Iterable[RoutingOp]) -> None:
        for op in self._batch("apply", ops):
            if isinstance(op, SetRoute):
                self.routes[op.prefix] = op.kind._value_  # `.value`, without the property's cost
            elif isinstance(op, DeleteRoute):
                self.routes.pop(op.prefix, None)
            elif isinstance(op, AddRule):
                self.rules.add(op.rule)
            elif isinstance(op, DeleteRule):
                self.rules.discard(op.rule)
            elif isinstance(op, AddDeviceAddress):
                self.device_addresses.add(op.prefix)

    def flush(self) -> None:
        self._maybe_fail("flush")
        self.routes.clear()
        self.rules.clear()


class FakeFirewall(_FailNext):
    """A FirewallApplier in memory; the 'kernel listing' is the rendered text, the strict boot files a dict (path ->
    text) and the counters whatever a test puts in `plaintext` (kept across applies, as the kernel keeps them)."""

    operations = ("read", "apply", "delete", "counters")

    def __init__(self) -> None:
        super().__init__()
        self.listing: str | None = None
        self.spec: FirewallSpec | None = None
        self.boot_files: dict[str, str] = {}
        self.plaintext = PlaintextCounters(dict.fromkeys(DIRECTIONS, 0), dict.fromkeys(DIRECTIONS, 0),
                                           {direction: [] for direction in DIRECTIONS})

    def read(self) -> str | None:
        self._maybe_fail("read")
        return self.listing

    def apply(self, spec: FirewallSpec) -> str:
        self._maybe_fail("apply")
        self.spec = spec
        self.listing = render_firewall(spec) + (render_strict(spec.strict) if spec.strict else "")
        if spec.strict is not None and spec.strict.boot_file:
            if spec.strict.enforce:
                self.boot_files[spec.strict.boot_file] = render_strict_boot(spec.strict)
            else:
                self.boot_files.pop(spec.strict.boot_file, None)
        return self.listing

    def delete(self) -> None:
        self._maybe_fail("delete")
        self.listing = self.spec = None
        self.boot_files.clear()

    def counters(self) -> PlaintextCounters | None:
        self._maybe_fail("counters")
        return self.plaintext if self.spec is not None and self.spec.strict is not None else None


class FakeSysctls(_FailNext):
    """A SysctlApplier over an in-memory /proc/sys, persisting originals to a JSON file like the real one."""

    operations = ("read", "write", "restore")

    def __init__(self, values: dict[str, str], originals_file: Path) -> None:
        super().__init__()
        self.values = dict(values)
        self.originals_file = Path(originals_file)

    def read(self, names: list[str]) -> dict[str, str | None]:
        self._maybe_fail("read")
        return {name: self.values.get(name) for name in names}

    def _originals(self) -> dict[str, str]:
        try:
            return json.loads(self.originals_file.read_text())
        except FileNotFoundError:
            return {}

    def write(self, values: dict[str, str]) -> None:
        originals = self._originals()
        missing = [name for name in values if name not in self.values]
        if missing:
            raise OSError(f"sysctl {missing[0]} does not exist")
        for name in values:
            originals.setdefault(name, self.values[name])
        self.originals_file.write_text(json.dumps(originals))
        self._maybe_fail("write")
        self.values.update(values)

    def restore(self) -> None:
        self._maybe_fail("restore")
        for name, value in self._originals().items():
            if name in self.values:
                self.values[name] = value
        self.originals_file.unlink(missing_ok=True)


class FakePodRoutes(_FailNext):
    """A PodRouteSource in memory: `routes` is the main table's pod host routes, {host interface: pod IPs}; a pod
    is added or removed by changing it (as azure-vnet adds and removes a pod's veth and route)."""

    operations = ("read",)

    def __init__(self, routes: dict[str, Iterable[str]] | None = None) -> None:
        super().__init__()
        self.routes: dict[str, frozenset[str]] = {name: frozenset(ips) for name, ips in (routes or {}).items()}

    def read(self) -> dict[str, frozenset[str]]:
        self._maybe_fail("read")
        return dict(self.routes)

    def close(self) -> None:
        self.calls.append("close")
