"""Kernel WireGuard backend: the device is a `wireguard` link (rtnetlink) configured over WireGuard generic netlink.

Implements `node_hook.contracts.WireGuardBackend` with pyroute2. Peer ops are turned into WG_CMD_SET_DEVICE
messages carrying many peers each (pyroute2's `WireGuard.set()` sends one peer per message, so the messages are
built here), split at `MAX_MESSAGE_BYTES` the way wg(8) splits them: a peer whose AllowedIPs do not fit is continued
in the next message without the replace flag.

Removing single AllowedIPs without a window in which the peer's other IPs are unreachable:
* kernels with WGALLOWEDIP_F_REMOVE_ME (added upstream in 2025; Debian 12's 6.1 and 6.12 lack it) remove exactly
  those prefixes from that peer;
* older kernels (probed once per backend: they reject the unknown attribute with EINVAL) get the prefixes moved to
  a temporary peer with the all-zero public key (adding a prefix to a peer takes it from its current owner
  atomically), which is deleted again at the end of the same message. The peer itself is never rebuilt and never
  given a replace-AllowedIPs, so its remaining prefixes stay in the routing trie throughout.

Writes by others. Kernel WireGuard sends no change notifications, and a dump of 5 000 peers x 251 AllowedIPs is
seconds of CPU, so the hook watches the writes themselves: `ForeignWriteCapture` puts up an `nlmon` device (the
kernel's netlink tap) and a packet socket on it whose classic BPF filter passes only generic-netlink messages of the
wireguard family with WG_CMD_SET_DEVICE, so the rest of the node's netlink traffic is dropped in the kernel; each
such request not sent by this process (its nlmsg_pid) names the peers to recheck (`WireGuardChange`).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket
from pyroute2.netlink.generic.wireguard import wgmsg

from node_hook.addresses import IPNetwork, packed_prefix, prefix_of_packed
from node_hook.contracts import (
    CaptureUnavailable,
    DeviceSpec,
    DeviceState,
    DeviceStream,
    PeerOp,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    UpsertPeer,
    WireGuardChange,
)

log = logging.getLogger(__name__)

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4
WGALLOWEDIP_F_REMOVE_ME = 0x1
WGDEVICE_F_REPLACE_PEERS = 0x1
IFF_UP = 0x1

# The temporary peer that takes prefixes away from a peer on kernels without WGALLOWEDIP_F_REMOVE_ME. Nobody holds
# its private key, so it can never complete a handshake; if a crash ever left it behind, the planner sees a peer
# nobody wants and removes it.
TEMPORARY_PEER_KEY = base64.b64encode(bytes(32)).decode()

# Prefix the per-IP-removal probe gives to the temporary peer and removes again (RFC 3849 documentation range).
PROBE_PREFIX = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/128"

# Upper bound for one SET_DEVICE message (well below the netlink socket buffers; wg(8) uses pages of 4 KiB).
MAX_MESSAGE_BYTES = 32 * 1024
# Encoded sizes used to split messages (struct nlattr headers included, rounded up to 4 bytes).
_PEER_BASE_BYTES = 4 + (4 + 32) + (4 + 4) + (4 + 28) + (4 + 4) + 4  # nest, key, flags, endpoint, keepalive, ips nest
_ALLOWED_IP_BYTES = {4: 4 + 8 + 8 + 8 + 8, 6: 4 + 8 + 20 + 8 + 8}  # nest, family, address, cidr, flags
_MESSAGE_BASE_BYTES = 16 + 4 + 20 + 4  # nlmsghdr, genlmsghdr, ifname, peers nest


class KernelWireGuardError(RuntimeError):
    """A kernel WireGuard operation failed; the message names the device and what was attempted."""


class _AllowedIP(nla):
    """WGPEER_A_ALLOWEDIPS entry. pyroute2's `wgpeer_allowedip` lacks WGALLOWEDIP_A_FLAGS (the per-IP remove flag)
    and decodes the address to a hexdump string; this class adds the attribute and keeps the raw address."""

    prefix = "WGALLOWEDIP_A_"
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("WGALLOWEDIP_A_UNSPEC", "none"),
        ("WGALLOWEDIP_A_FAMILY", "uint16"),
        ("WGALLOWEDIP_A_IPADDR", "cdata"),
        ("WGALLOWEDIP_A_CIDR_MASK", "uint8"),
        ("WGALLOWEDIP_A_FLAGS", "uint32"),
    )


class _Peer(nla):
    """WGDEVICE_A_PEERS entry; the key, endpoint and handshake encodings are pyroute2's own."""

    prefix = "WGPEER_A_"
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("WGPEER_A_UNSPEC", "none"),
        ("WGPEER_A_PUBLIC_KEY", "parse_peer_key"),
        ("WGPEER_A_PRESHARED_KEY", "parse_peer_key"),
        ("WGPEER_A_FLAGS", "uint32"),
        ("WGPEER_A_ENDPOINT", "parse_endpoint"),
        ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "uint16"),
        ("WGPEER_A_LAST_HANDSHAKE_TIME", "parse_handshake_time"),
        ("WGPEER_A_RX_BYTES", "uint64"),
        ("WGPEER_A_TX_BYTES", "uint64"),
        ("WGPEER_A_ALLOWEDIPS", "*allowed_ip"),
        ("WGPEER_A_PROTOCOL_VERSION", "uint32"),
    )
    parse_peer_key = wgmsg.wgdevice_peer.parse_peer_key
    parse_endpoint = staticmethod(wgmsg.wgdevice_peer.parse_endpoint)
    endpoint_ipv4 = wgmsg.wgdevice_peer.endpoint_ipv4
    endpoint_ipv6 = wgmsg.wgdevice_peer.endpoint_ipv6
    parse_handshake_time = wgmsg.wgdevice_peer.parse_handshake_time
    allowed_ip = _AllowedIP


class WireGuardMessage(genlmsg):
    """A WireGuard generic netlink message (pyroute2's `wgmsg` layout with the complete AllowedIP attribute set).
    A separate class rather than a `wgmsg` subclass: pyroute2 caches compiled attribute tables per class hierarchy."""

    prefix = "WGDEVICE_A_"
    nla_map = (
        ("WGDEVICE_A_UNSPEC", "none"),
        ("WGDEVICE_A_IFINDEX", "uint32"),
        ("WGDEVICE_A_IFNAME", "asciiz"),
        ("WGDEVICE_A_PRIVATE_KEY", "parse_wg_key"),
        ("WGDEVICE_A_PUBLIC_KEY", "parse_wg_key"),
        ("WGDEVICE_A_FLAGS", "uint32"),
        ("WGDEVICE_A_LISTEN_PORT", "uint16"),
        ("WGDEVICE_A_FWMARK", "uint32"),
        ("WGDEVICE_A_PEERS", "*peer"),
    )
    parse_wg_key = wgmsg.parse_wg_key
    peer = _Peer


class _AsyncWireGuardSocket(AsyncGenericNetlinkSocket):
    # A missing family is an expected answer (probe on a node without the module), not an error to log.
    module_err_level = "debug"


class WireGuardSocket(GenericNetlinkSocket):
    """Generic netlink socket bound to the wireguard family with `WireGuardMessage` as its parser."""

    async_class = _AsyncWireGuardSocket

    def __init__(self) -> None:
        super().__init__()
        self.bind(WG_GENL_NAME, WireGuardMessage)

    def get_device(self, ifname: str) -> Iterator[WireGuardMessage]:
        """The dump parts of WG_CMD_GET_DEVICE as they arrive (the kernel splits large devices over several
        messages, whose parsed forms are not all held at once)."""
        request = WireGuardMessage()
        request["cmd"] = WG_CMD_GET_DEVICE
        request["version"] = WG_GENL_VERSION
        request["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
        return iter(self.nlm_request(request, msg_type=self.prid, msg_flags=NLM_F_REQUEST | NLM_F_DUMP))

    def set_device(self, message: WireGuardMessage) -> None:
        message["cmd"] = WG_CMD_SET_DEVICE
        message["version"] = WG_GENL_VERSION
        tuple(self.nlm_request(message, msg_type=self.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))


def encode_key(raw: bytes) -> str:
    if len(raw) != 32:
        raise ValueError(f"a WireGuard key is 32 bytes, got {len(raw)}")
    return base64.b64encode(raw).decode()


def _allowed_ip_attrs(prefix: IPNetwork, remove: bool) -> dict:
    address, prefixlen = packed_prefix(prefix)
    attrs = [
        ["WGALLOWEDIP_A_FAMILY", AF_INET if len(address) == 4 else AF_INET6],
        ["WGALLOWEDIP_A_IPADDR", address],
        ["WGALLOWEDIP_A_CIDR_MASK", prefixlen],
    ]
    if remove:
        attrs.append(["WGALLOWEDIP_A_FLAGS", WGALLOWEDIP_F_REMOVE_ME])
    return {"attrs": attrs}


@dataclass
class PeerWrite:
    """One peer entry of a SET_DEVICE message, before encoding."""

    public_key: str
    flags: int = 0
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    remove_allowed_ips: bool = False  # every allowed IP carries WGALLOWEDIP_F_REMOVE_ME

    def encoded_size(self, allowed_ips: list[IPNetwork] | None = None) -> int:
        ips = self.allowed_ips if allowed_ips is None else allowed_ips
        return _PEER_BASE_BYTES + sum(_ALLOWED_IP_BYTES[ip.version] for ip in ips)

    def attrs(self) -> dict:
        attrs: list = [["WGPEER_A_PUBLIC_KEY", self.public_key], ["WGPEER_A_FLAGS", self.flags]]
        if self.endpoint is not None:
            attrs.append(["WGPEER_A_ENDPOINT", {"addr": self.endpoint[0], "port": self.endpoint[1]}])
        if self.persistent_keepalive is not None:
            attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", self.persistent_keepalive])
        if self.allowed_ips:
            attrs.append(
                ["WGPEER_A_ALLOWEDIPS", [_allowed_ip_attrs(ip, self.remove_allowed_ips) for ip in self.allowed_ips]]
            )
        return {"attrs": attrs}


def plan_peer_writes(ops: list[PeerOp], per_ip_remove: bool) -> list[PeerWrite]:
    """Translate planner ops into peer entries, in order. Pure: unit-tested without a kernel.

    Without per-IP removal, a `RemoveAllowedIPs` becomes "give these prefixes to the temporary peer"; a prefix
    that an earlier op of the same batch already gave to another peer is no longer the named peer's, so it is left
    alone (the kernel's per-IP remove is a no-op there too). `split_messages` deletes the temporary peer at the end
    of every message that used it."""
    writes: list[PeerWrite] = []
    given_in_batch: dict[IPNetwork, str] = {}
    for op in ops:
        if isinstance(op, UpsertPeer):
            flags = WGPEER_F_REPLACE_ALLOWEDIPS if op.replace_allowed_ips else 0
            writes.append(
                PeerWrite(
                    public_key=op.public_key,
                    flags=flags,
                    endpoint=op.endpoint,
                    persistent_keepalive=op.persistent_keepalive,
                    allowed_ips=list(op.allowed_ips),
                )
            )
            for prefix in op.allowed_ips:
                given_in_batch[prefix] = op.public_key
        elif isinstance(op, RemoveAllowedIPs):
            prefixes = [p for p in op.allowed_ips if given_in_batch.get(p, op.public_key) == op.public_key]
            for prefix in prefixes:
                given_in_batch.pop(prefix, None)
            if not prefixes:
                continue
            if per_ip_remove:
                writes.append(
                    PeerWrite(
                        public_key=op.public_key,
                        flags=WGPEER_F_UPDATE_ONLY,
                        allowed_ips=prefixes,
                        remove_allowed_ips=True,
                    )
                )
            else:
                writes.append(PeerWrite(public_key=TEMPORARY_PEER_KEY, allowed_ips=prefixes))
        elif isinstance(op, RemovePeer):
            writes.append(PeerWrite(public_key=op.public_key, flags=WGPEER_F_REMOVE_ME))
            given_in_batch = {p: k for p, k in given_in_batch.items() if k != op.public_key}
        else:
            raise TypeError(f"unknown peer op {op!r}")
    return writes


def split_messages(writes: list[PeerWrite], limit: int = MAX_MESSAGE_BYTES) -> list[list[PeerWrite]]:
    """Pack peer entries into messages of at most `limit` bytes. A peer whose AllowedIPs overflow continues in the
    next message without REPLACE_ALLOWEDIPS (which would drop what the previous message added). Every message that
    hands prefixes to the temporary peer ends by deleting it."""
    messages: list[list[PeerWrite]] = []
    current: list[PeerWrite] = []
    size = _MESSAGE_BASE_BYTES
    removal = PeerWrite(public_key=TEMPORARY_PEER_KEY, flags=WGPEER_F_REMOVE_ME)
    reserve = removal.encoded_size()

    def finish() -> None:
        nonlocal current, size
        if any(w.public_key == TEMPORARY_PEER_KEY and not w.flags & WGPEER_F_REMOVE_ME for w in current):
            current.append(removal)
        if current:
            messages.append(current)
        current, size = [], _MESSAGE_BASE_BYTES

    for write in writes:
        remaining = list(write.allowed_ips)
        first = True
        while True:
            room = limit - size - write.encoded_size([]) - reserve
            fitting: list[IPNetwork] = []
            used = 0
            for prefix in remaining:
                cost = _ALLOWED_IP_BYTES[prefix.version]
                if used + cost > room:
                    break
                fitting.append(prefix)
                used += cost
            if remaining and not fitting and current:
                finish()
                continue
            if not remaining and room < 0:
                finish()
                continue
            flags = write.flags if first else write.flags & ~WGPEER_F_REPLACE_ALLOWEDIPS
            part = PeerWrite(
                public_key=write.public_key,
                flags=flags,
                endpoint=write.endpoint,
                persistent_keepalive=write.persistent_keepalive,
                allowed_ips=fitting,
                remove_allowed_ips=write.remove_allowed_ips,
            )
            current.append(part)
            size += part.encoded_size()
            remaining = remaining[len(fitting) :]
            first = False
            if not remaining:
                break
            finish()
    finish()
    return messages


def build_set_message(ifname: str, writes: list[PeerWrite]) -> WireGuardMessage:
    message = WireGuardMessage()
    message["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    message["attrs"].append(["WGDEVICE_A_PEERS", [w.attrs() for w in writes]])
    return message


def _key_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_device(ifname: str, parts: Iterable[WireGuardMessage], mtu: int, up: bool) -> DeviceState:
    """Merge the dump parts, taken one at a time, into one DeviceState (a peer may continue in the next part with
    more AllowedIPs)."""
    stream = parse_device_stream(ifname, parts, mtu, up)
    return replace(stream.device, peers={peer.public_key: peer for peer in stream.peers})


def parse_device_stream(ifname: str, parts: Iterable[WireGuardMessage], mtu: int, up: bool) -> DeviceStream:
    """The device from the first dump part, then its peers as the parts are taken: a peer is handed over once the
    next one starts (it may continue in the next part with more AllowedIPs). The dump is read to its end even when
    the peers are not all taken, or the socket would answer the next request with the rest of this one."""
    iterator = iter(parts)
    device = next(iterator, None)
    if device is None:
        raise KernelWireGuardError(f"the dump of {ifname} is empty")
    public_key = device.get_attr("WGDEVICE_A_PUBLIC_KEY")
    state = DeviceState(
        name=ifname,
        public_key=_key_text(public_key) if public_key else "",
        listen_port=device.get_attr("WGDEVICE_A_LISTEN_PORT") or 0,
        fwmark=device.get_attr("WGDEVICE_A_FWMARK") or 0,
        mtu=mtu,
        up=up,
        peers={},
    )
    return DeviceStream(state, _dumped_peers(device, iterator))


def _dumped_peers(first: WireGuardMessage, rest: Iterator[WireGuardMessage]) -> Iterator[PeerState]:
    key: str | None = None
    entry: dict = {}
    try:
        for part in itertools.chain((first,), rest):
            for peer in part.get_attr("WGDEVICE_A_PEERS") or []:
                peer_key = _key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
                if peer_key != key:
                    if key is not None:
                        yield _dumped_peer(key, entry)
                    key = peer_key
                    endpoint_attr = peer.get_attr("WGPEER_A_ENDPOINT")
                    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                    entry = {
                        "endpoint": (endpoint_attr["addr"], endpoint_attr["port"]) if endpoint_attr else None,
                        "keepalive": peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                        "handshake": (handshake["tv_sec"] + handshake["tv_nsec"] / 1e9) if handshake else 0.0,
                        "rx": peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                        "tx": peer.get_attr("WGPEER_A_TX_BYTES") or 0,
                        "allowed": set(),
                    }
                for allowed in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:  # the model's packed form, not via text
                    entry["allowed"].add(prefix_of_packed(allowed.get_attr("WGALLOWEDIP_A_IPADDR"),
                                                          allowed.get_attr("WGALLOWEDIP_A_CIDR_MASK")))
        if key is not None:
            yield _dumped_peer(key, entry)
    finally:
        for _ in rest:  # abandoned: read the dump to its end
            pass


def _dumped_peer(key: str, entry: dict) -> PeerState:
    return PeerState(
        public_key=key,
        endpoint=entry["endpoint"],
        allowed_ips=frozenset(entry["allowed"]),
        persistent_keepalive=entry["keepalive"],
        latest_handshake=entry["handshake"],
        rx_bytes=entry["rx"],
        tx_bytes=entry["tx"],
    )


# nlmon capture (linux/filter.h, if_packet.h)
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + SKF_AD_PROTOCOL: the skb's protocol (the netlink family of a tap copy)
NETLINK_GENERIC = 16
RECEIVE_TIMEOUT = 1.0  # the capture's receive wakes this often, to see that it is being stopped
_SOCK_FILTER = struct.Struct("=HBBI")
_NLMSGHDR = struct.Struct("=IHHII")


def capture_link_name(ifname: str) -> str:
    return f"{ifname[:11]}-nlm"


def set_device_filter(family_id: int) -> bytes:
    """Classic BPF: accept a netlink tap copy that is a generic netlink WG_CMD_SET_DEVICE, drop the rest. The
    header's fields are little-endian; BPF loads are big-endian, hence the swapped family id."""
    swapped = int.from_bytes(family_id.to_bytes(2, "little"), "big")
    program = [
        (0x28, 0, 0, SKF_AD_PROTOCOL),  # ldh skb->protocol
        (0x15, 0, 5, NETLINK_GENERIC),  # jeq NETLINK_GENERIC, else drop
        (0x28, 0, 0, 4),  # ldh nlmsg_type
        (0x15, 0, 3, swapped),  # jeq wireguard, else drop
        (0x30, 0, 0, 16),  # ldb genlmsghdr.cmd
        (0x15, 0, 1, WG_CMD_SET_DEVICE),  # jeq SET_DEVICE, else drop
        (0x06, 0, 0, 0x40000),  # accept (the whole message)
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(_SOCK_FILTER.pack(*instruction) for instruction in program)


def change_of_set_device(message: WireGuardMessage) -> WireGuardChange:
    """What one WG_CMD_SET_DEVICE request changes."""
    keys: set[str] = set()
    allowed: set[IPNetwork] = set()
    for peer in message.get_attr("WGDEVICE_A_PEERS") or []:
        keys.add(_key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")))
        for entry in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
            allowed.add(prefix_of_packed(entry.get_attr("WGALLOWEDIP_A_IPADDR"),
                                         entry.get_attr("WGALLOWEDIP_A_CIDR_MASK")))
    device = any(message.get_attr(name) is not None
                 for name in ("WGDEVICE_A_PRIVATE_KEY", "WGDEVICE_A_LISTEN_PORT", "WGDEVICE_A_FWMARK"))
    all_peers = bool((message.get_attr("WGDEVICE_A_FLAGS") or 0) & WGDEVICE_F_REPLACE_PEERS)
    return WireGuardChange(frozenset(keys), frozenset(allowed), device, all_peers)


class ForeignWriteCapture:
    """The WG_CMD_SET_DEVICE requests others send for device `ifname` (see the module docstring), from `open()`
    to `close()`. `own_pids` are the nlmsg_pid values of this process's requests."""

    def __init__(self, ifname: str, family_id: int, own_pids: frozenset[int]) -> None:
        self.ifname = ifname
        self.family_id = family_id
        self.own_pids = own_pids
        self.link = capture_link_name(ifname)
        self.socket: socket.socket | None = None
        self._filter: ctypes.Array[ctypes.c_char] | None = None

    def open(self) -> None:
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=self.link):
                try:
                    ipr.link("add", ifname=self.link, kind="nlmon")
                except NetlinkError as error:
                    if error.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                        raise CaptureUnavailable(f"no nlmon in this kernel ({error})") from error
                    raise
            try:
                ipr.link("set", index=ipr.link_lookup(ifname=self.link)[0], state="up")
                self.socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                program = set_device_filter(self.family_id)
                self._filter = ctypes.create_string_buffer(program, len(program))
                self.socket.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack(
                    "HL", len(program) // _SOCK_FILTER.size, ctypes.addressof(self._filter)))
                self.socket.bind((self.link, ETH_P_ALL))
                self.socket.settimeout(RECEIVE_TIMEOUT)
            except BaseException:
                self.close()  # the socket and the link: a failed open leaves nothing
                raise

    def receive(self) -> list[WireGuardChange]:
        """The changes of the next captured datagram (none after a timeout or for our own requests)."""
        assert self.socket is not None
        try:
            data = self.socket.recv(1 << 18)
        except TimeoutError:
            return []
        changes = []
        offset = 0
        while offset + _NLMSGHDR.size + 4 <= len(data):
            length, kind, _, _, pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            if kind == self.family_id and data[offset + 16] == WG_CMD_SET_DEVICE and pid not in self.own_pids:
                message = WireGuardMessage(data[offset:offset + length])
                message.decode()
                if message.get_attr("WGDEVICE_A_IFNAME") in (self.ifname, None):
                    changes.append(change_of_set_device(message))
            offset += (length + 3) & ~3
        return changes

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        delete_capture_link(self.ifname)


def delete_capture_link(ifname: str) -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=capture_link_name(ifname)):
            ipr.link("del", index=index)


class KernelWireGuard:
    """A kernel WireGuard device in the current network namespace (see `WireGuardBackend`)."""

    kind = "kernel"

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._ipr = IPRoute()
        self._genl: WireGuardSocket | None = None
        self._genl_lock = threading.Lock()  # the monitor's capture asks for the socket's family id and pid too
        self._per_ip_remove: bool | None = None  # probed on first use

    # -- reading ---------------------------------------------------------------------------------------------

    def _link(self) -> Any:  # a pyroute2 link message, or None
        try:
            links = self._ipr.link("get", ifname=self.ifname)
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                return None
            raise
        return links[0] if links else None

    @staticmethod
    def _link_kind(link: Any) -> str | None:
        info = link.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None

    def _socket(self) -> WireGuardSocket:
        with self._genl_lock:
            if self._genl is None:
                try:
                    self._genl = WireGuardSocket()
                except NetlinkError as error:
                    raise KernelWireGuardError(f"kernel WireGuard is not available: {error}") from error
            return self._genl

    def read(self) -> DeviceState | None:
        stream = self.read_stream()
        if stream is None:
            return None
        try:
            return replace(stream.device, peers={peer.public_key: peer for peer in stream.peers})
        except NetlinkError as error:
            if error.code == errno.ENODEV:  # removed between the two reads
                return None
            raise KernelWireGuardError(f"reading {self.ifname}: {error}") from error

    def read_stream(self) -> DeviceStream | None:
        link = self._link()
        if link is None:
            return None
        if self._link_kind(link) != "wireguard":
            raise KernelWireGuardError(f"{self.ifname} exists but is a {self._link_kind(link)} link, not wireguard")
        try:
            return parse_device_stream(self.ifname, self._socket().get_device(self.ifname), link.get_attr("IFLA_MTU"),
                                       bool(link["flags"] & IFF_UP))
        except NetlinkError as error:
            if error.code == errno.ENODEV:  # removed between the two reads
                return None
            raise KernelWireGuardError(f"reading {self.ifname}: {error}") from error

    # -- writing ---------------------------------------------------------------------------------------------

    def ensure_device(self, spec: DeviceSpec) -> None:
        if spec.name != self.ifname:
            raise ValueError(f"backend for {self.ifname} was given a spec for {spec.name}")
        link = self._link()
        if link is None:
            try:
                self._ipr.link("add", ifname=self.ifname, kind="wireguard")
            except NetlinkError as error:
                raise KernelWireGuardError(f"creating wireguard link {self.ifname}: {error}") from error
            link = self._link()
        elif self._link_kind(link) != "wireguard":
            raise KernelWireGuardError(f"{self.ifname} exists but is a {self._link_kind(link)} link, not wireguard")
        current = self.read()
        if current is None:
            raise KernelWireGuardError(f"{self.ifname} disappeared while it was being configured")
        message = WireGuardMessage()
        message["attrs"].append(["WGDEVICE_A_IFNAME", self.ifname])
        if current.public_key != spec.public_key:
            message["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", encode_key(spec.private_key)])
        if current.listen_port != spec.listen_port:
            message["attrs"].append(["WGDEVICE_A_LISTEN_PORT", spec.listen_port])
        if current.fwmark != spec.fwmark:
            message["attrs"].append(["WGDEVICE_A_FWMARK", spec.fwmark])
        if len(message["attrs"]) > 1:
            try:
                self._socket().set_device(message)
            except NetlinkError as error:
                raise KernelWireGuardError(
                    f"configuring {self.ifname} (port {spec.listen_port}, fwmark {spec.fwmark:#x}): {error}"
                ) from error
        if current.mtu != spec.mtu or not current.up:
            try:
                self._ipr.link("set", index=link["index"], mtu=spec.mtu, state="up")
            except NetlinkError as error:
                raise KernelWireGuardError(f"setting {self.ifname} mtu {spec.mtu} up: {error}") from error

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        if not ops:
            return
        per_ip_remove = False
        if any(isinstance(op, RemoveAllowedIPs) for op in ops):
            per_ip_remove = self.per_ip_remove_supported()
        for writes in split_messages(plan_peer_writes(ops, per_ip_remove)):
            try:
                self._socket().set_device(build_set_message(self.ifname, writes))
            except NetlinkError as error:
                keys = ", ".join(sorted({w.public_key for w in writes}))
                raise KernelWireGuardError(f"updating peers of {self.ifname} ({keys}): {error}") from error

    def greet(self, peers: Mapping[str, int]) -> None:
        if not peers:
            return
        for keepalive in (0, 1, None):  # off, on (the kernel sends a keepalive), back to each peer's own
            writes = [PeerWrite(public_key=key, flags=WGPEER_F_UPDATE_ONLY,
                                persistent_keepalive=own if keepalive is None else keepalive)
                      for key, own in peers.items()]
            for message in split_messages(writes):
                try:
                    self._socket().set_device(build_set_message(self.ifname, message))
                except NetlinkError as error:
                    raise KernelWireGuardError(f"greeting peers of {self.ifname}: {error}") from error

    def per_ip_remove_supported(self) -> bool:
        """Whether the kernel has WGALLOWEDIP_F_REMOVE_ME, probed once on this device: the temporary peer is
        created holding one prefix of the IPv6 documentation range (which no peer legitimately holds), asked to
        drop it with the flag (EINVAL where the attribute is unknown), and deleted."""
        if self._per_ip_remove is None:
            probe_prefix = [ipaddress.ip_network(PROBE_PREFIX)]
            probe = [
                PeerWrite(public_key=TEMPORARY_PEER_KEY, allowed_ips=probe_prefix),
                PeerWrite(
                    public_key=TEMPORARY_PEER_KEY,
                    flags=WGPEER_F_UPDATE_ONLY,
                    allowed_ips=probe_prefix,
                    remove_allowed_ips=True,
                ),
                PeerWrite(public_key=TEMPORARY_PEER_KEY, flags=WGPEER_F_REMOVE_ME),
            ]
            socket = self._socket()
            try:
                socket.set_device(build_set_message(self.ifname, probe))
                self._per_ip_remove = True
            except NetlinkError as error:
                if error.code != errno.EINVAL:
                    raise KernelWireGuardError(f"probing per-IP removal on {self.ifname}: {error}") from error
                # The kernel stopped at the flagged entry after creating the temporary peer: delete it.
                socket.set_device(build_set_message(self.ifname, probe[2:]))
                self._per_ip_remove = False
            log.info(
                "%s: kernel %s per-AllowedIP removal", self.ifname, "supports" if self._per_ip_remove else "lacks"
            )
        return self._per_ip_remove

    def capture(self) -> ForeignWriteCapture:
        """A capture of the writes by others to this device (not yet open)."""
        genl = self._socket()
        return ForeignWriteCapture(self.ifname, genl.prid, frozenset({genl.asyncore.epid, os.getpid()}))

    def delete_device(self) -> None:
        delete_capture_link(self.ifname)
        link = self._link()
        if link is None:
            return
        if self._link_kind(link) != "wireguard":
            raise KernelWireGuardError(f"refusing to delete {self.ifname}: it is a {self._link_kind(link)} link")
        try:
            self._ipr.link("del", index=link["index"])
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise KernelWireGuardError(f"deleting {self.ifname}: {error}") from error

    def close(self) -> None:
        if self._genl is not None:
            self._genl.close()
            self._genl = None
        self._ipr.close()
