"""Routing applier: the routes in the hook's table, the rules that point at it, the device's address.

Only the hook's table, the rules whose table is the hook's table and the hook's bypass rules (`from <IP> lookup
main` at the one priority `bypass_priority`, just before the tunnel rule) are read, changed or flushed; the main
table and every other rule are never touched. A `dev <wg>` route is a unicast route out of the WireGuard device; a
`throw`
route makes the lookup leave the table (the main table then decides). Deleting what is already gone and adding
what already exists succeed (ESRCH / ENOENT / EEXIST are "already done"), so a retried batch converges.

The rare operations (rules, the device's address) go through pyroute2. The table's routes - as many as the
cluster has pod IPs, 1.25 M at 5 000 nodes x 250 pods - do not: they are rtnetlink messages encoded here
with `struct` and sent over a raw NETLINK_ROUTE socket in batches (`RouteNetlink`), and the table dump is decoded the
same way. Deviation from pyroute2, for speed: its message machinery, batched or not, costs far more per route than
the kernel's work (the measurements: docs/benchmarks.md, P3c). The device's index is looked up on the same socket
too, since pyroute2's `link_lookup` was most of applying one route for a pod event.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import chain

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from node_hook.addresses import IPNetwork, packed_prefix, prefix_of_packed
from node_hook.contracts import (
    FOREIGN_ROUTE,
    MAIN_TABLE,
    AddDeviceAddress,
    AddRule,
    DeleteRoute,
    DeleteRule,
    RoutingOp,
    RuleSpec,
    SetRoute,
    TableState,
    TableStream,
)
from node_hook.model import RouteKind, paused_gc

RT_SCOPE_LINK = 253
FIB_RULE_INVERT = 0x2
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ALREADY_GONE = {errno.ESRCH, errno.ENOENT}

# ---- rtnetlink constants (linux/netlink.h, linux/rtnetlink.h) ------------------------------------------------------
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error acks carry the failed message's header only, not the whole message
NETLINK_EXT_ACK = 11  # error acks carry the kernel's reason ("Nexthop device is not up")
NETLINK_GET_STRICT_CHK = 12  # the kernel filters a route dump by the RTA_TABLE of the request (Linux 4.20+)
SO_RCVBUFFORCE = 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # in an ack
NLMSGERR_ATTR_MSG = 1
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_IFNAME = 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA, RTA_NH_ID = 1, 4, 5, 9, 15, 18, 30
_OTHER_NEXTHOP = frozenset({RTA_GATEWAY, RTA_MULTIPATH, RTA_VIA, RTA_NH_ID})  # not "straight out of the device"
RTN_UNICAST, RTN_THROW = 1, 9
RTPROT_STATIC = 4  # what pyroute2 and `ip route` give a route they add
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RT_TABLE_COMPAT = 252  # rtm_table of a route in a table > 255 (the id itself is in RTA_TABLE)

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_ATTRIBUTE = struct.Struct("=HH")  # rtattr: length, type
_U16, _U32 = struct.Struct("=H"), struct.Struct("=I")
_ERROR = struct.Struct("=i")  # nlmsgerr.error: 0 (ack) or -errno

# One message per route: nlmsghdr, rtmsg, RTA_TABLE, RTA_DST and, for a `dev` route, RTA_OIF (every size a multiple
# of 4: no padding). Keyed by (address bytes, with RTA_OIF).
_ROUTE_MESSAGE = {
    (size, with_device): struct.Struct(f"=IHHII BBBBBBBBI HHI HH{size}s" + (" HHi" if with_device else ""))
    for size in (4, 16) for with_device in (False, True)
}

# Acks: the kernel answers every message that fails with an error ack whether or not it asked for one, and
# handles a batch's messages in order inside the `send` call; so only a batch's last message asks for an ack
# (NLM_F_ACK): once it is read, every message before it was handled and each failure among them was read first
# (an ack that does not fit the receive buffer is not lost silently: the next receive fails with ENOBUFS). One ack
# per batch saves the kernel's ack skbs and a receive call per message (docs/benchmarks.md, P3c).
# Route messages per `send`: at worst every message fails and is acked (an skb of its own: 832 bytes of receive
# buffer each on Linux 6.18; RECEIVE_BUFFER_PER_ACK leaves room for an error's reason), so a batch is bounded by
# what the receive buffer holds; 256 messages are 11-16 KiB to send, past the point where larger batches stop
# helping and well below the send buffer (4 096 fail with EMSGSIZE).
BATCH_MESSAGES = 256
RECEIVE_BUFFER = 4 << 20
RECEIVE_BUFFER_PER_ACK = 1024
ACK_WAIT_SECONDS = 10.0  # acks are queued before `send` returns: waiting at all means they were lost
_FLAGS_OFFSET = 6  # of nlmsg_flags in a message


class RouteNetlink:
    """A raw NETLINK_ROUTE socket (in the namespace it was opened in) that sends route messages in batches and
    dumps a table, with the acks and dumps read straight out of one receive buffer: one caller at a time (the hook's
    worker thread owns its routing applier)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self._socket.bind((0, 0))
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
                try:
                    self._socket.setsockopt(SOL_NETLINK, option, 1)
                except OSError:  # an older kernel: full error acks, no reason, unfiltered dumps - all handled below
                    pass
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except PermissionError:  # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            receive_buffer = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except BaseException:
            self._socket.close()
            raise
        self.batch_limit = max(1, min(BATCH_MESSAGES, receive_buffer // RECEIVE_BUFFER_PER_ACK))
        self._buffer = bytearray(1 << 16)  # a dump part is at most 32 KiB; an ack is one message per datagram
        self._view = memoryview(self._buffer)
        self._sequence = 0

    def next_sequence(self) -> int:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return self._sequence

    def transact(self, messages: bytes | bytearray, first_sequence: int, count: int) -> list[tuple[int, int, str]]:
        """Send `count` messages (sequence numbers from `first_sequence` on, only the last with NLM_F_ACK) in one
        datagram and read the acks back up to the last message's. Returns the failures as (index in the batch,
        errno, the kernel's reason or "") in order. The kernel applies every message of the batch, including those
        after a failed one."""
        self._socket.send(messages)
        failures = []
        while True:
            for offset, length, kind, flags, sequence in self._datagram(block=False):
                index = (sequence - first_sequence) & 0xFFFFFFFF
                if kind == NLMSG_ERROR and index < count:  # anything else: left from an earlier, interrupted call
                    code = self._error_code(offset)
                    if code:
                        failures.append((index, code, self._reason(offset, length, flags)))
                    if index == count - 1:
                        return failures

    def link_index(self, name: str) -> int | None:
        """The index of the interface called `name` in the socket's namespace; None when there is none."""
        encoded = name.encode() + b"\0"
        attribute = _ATTRIBUTE.pack(4 + len(encoded), IFLA_IFNAME) + encoded + bytes(-len(encoded) % 4)
        sequence = self.next_sequence()
        self._socket.send(_HEADER.pack(16 + _IFINFOMSG.size + len(attribute), RTM_GETLINK, NLM_F_REQUEST, sequence, 0)
                          + _IFINFOMSG.pack(0, 0, 0, 0, 0) + attribute)
        while True:  # the kernel answers inside `send`, like an ack
            for offset, length, kind, flags, message_sequence in self._datagram(block=False):
                if message_sequence != sequence:
                    continue
                if kind == RTM_NEWLINK:
                    return _IFINFOMSG.unpack_from(self._buffer, offset + 16)[2]
                if kind == NLMSG_ERROR:
                    code = self._error_code(offset)
                    if code == errno.ENODEV:
                        return None
                    raise NetlinkError(code, f"looking up {name}: {os.strerror(code)}"
                                             f"{self._reason(offset, length, flags)}")

    def dump_routes(self, family: int, table: int) -> Iterator[tuple[memoryview, int, int]]:
        """The RTM_NEWROUTE messages of a route dump of `family` asked for table `table` (the kernel filters by it
        when it does strict checking; callers check the table anyway): (buffer, start, end) of each, valid until
        the next one is taken. A table that does not exist is empty."""
        sequence = self.next_sequence()
        request = _HEADER.pack(16 + 12 + 8, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) \
            + _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + _ATTRIBUTE.pack(8, RTA_TABLE) + _U32.pack(table)
        self._socket.send(request)
        finished = False
        try:
            while not finished:
                for offset, length, kind, flags, message_sequence in self._datagram(block=True):
                    if message_sequence != sequence:
                        continue
                    if kind == RTM_NEWROUTE:
                        yield self._view, offset, offset + length
                    elif kind in (NLMSG_DONE, NLMSG_ERROR):
                        finished = True
                        code = self._error_code(offset) if length >= 20 else 0
                        if code and code != errno.ENOENT:  # ENOENT: "FIB table does not exist" (strict dumps)
                            raise NetlinkError(code, f"dump of table {table}: {os.strerror(code)}"
                                                     f"{self._reason(offset, length, flags)}")
                        break
        finally:
            while not finished:  # abandoned: read the dump to its end, or the socket refuses the next one (EBUSY)
                finished = any(message_sequence == sequence and kind in (NLMSG_DONE, NLMSG_ERROR)
                               for _, _, kind, _, message_sequence in self._datagram(block=True))

    def _datagram(self, block: bool) -> Iterator[tuple[int, int, int, int, int]]:
        """(offset, length, type, flags, sequence) of each message of the next datagram received."""
        received = self._receive(block)
        offset = 0
        while offset + _HEADER.size <= received:
            length, kind, flags, sequence, _ = _HEADER.unpack_from(self._buffer, offset)
            if length < _HEADER.size:
                return
            yield offset, length, kind, flags, sequence
            offset += (length + 3) & ~3

    def _error_code(self, offset: int) -> int:
        """The errno of the NLMSG_ERROR or NLMSG_DONE message at `offset` (0: success)."""
        return -_ERROR.unpack_from(self._buffer, offset + 16)[0]

    def _receive(self, block: bool) -> int:
        """One datagram into the buffer. Without `block`, waits at most ACK_WAIT_SECONDS for it."""
        if block:
            return self._socket.recv_into(self._buffer)
        try:
            return self._socket.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not select.select([self._socket], [], [], ACK_WAIT_SECONDS)[0]:
                raise TimeoutError("rtnetlink acks missing: the table's state is unknown until it is read back") \
                    from None
            return self._socket.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)

    def _reason(self, offset: int, length: int, flags: int) -> str:
        """The kernel's extended-ack message of the error ack at `offset`, as ": <reason>", or ""."""
        if not flags & NLM_F_ACK_TLVS:
            return ""
        # nlmsghdr, error, then the failed message's header (capped) or the whole failed message
        start = offset + 20 + (16 if flags & NLM_F_CAPPED else _U32.unpack_from(self._buffer, offset + 20)[0])
        end = offset + length
        while start + 4 <= end:
            attribute_length, attribute_type = _ATTRIBUTE.unpack_from(self._buffer, start)
            if attribute_length < 4:
                break
            if attribute_type & 0x3FFF == NLMSGERR_ATTR_MSG:
                text = bytes(self._buffer[start + 4:start + attribute_length]).rstrip(b"\0")
                return f": {text.decode(errors='replace')}"
            start += (attribute_length + 3) & ~3
        return ""

    def close(self) -> None:
        self._socket.close()


class _RouteBatch:
    """Route messages of one `apply` waiting to be sent, with what each was for (to name it in an error)."""

    def __init__(self, netlink: RouteNetlink, table: int) -> None:
        self.netlink = netlink
        self.table = table
        self._rtm_table = table if table < 256 else RT_TABLE_COMPAT
        self._messages = bytearray()
        self._prefixes: list[IPNetwork] = []
        self._deletes = bytearray()  # 1 where the message is a delete (already gone is fine)
        self._first_sequence = 0
        self._last_offset = 0  # of the last queued message in `_messages`

    def set_route(self, prefix: IPNetwork, kind: RouteKind, ifindex: int | None = None) -> None:
        """Queue `replace <prefix> table <table>` as `throw`, or as `dev <ifindex>`."""
        address, prefixlen = packed_prefix(prefix)
        family = socket.AF_INET if len(address) == 4 else socket.AF_INET6
        device = kind is not RouteKind.THROW
        message = _ROUTE_MESSAGE[len(address), device]
        fields = (message.size, RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, self._sequence(), 0,
                  family, prefixlen, 0, 0, self._rtm_table, RTPROT_STATIC, RT_SCOPE_UNIVERSE,
                  RTN_UNICAST if device else RTN_THROW, 0, 8, RTA_TABLE, self.table, 4 + len(address), RTA_DST, address)
        encoded = message.pack(*fields, 8, RTA_OIF, ifindex) if device else message.pack(*fields)
        self._queue(encoded, prefix, False)

    def delete_route(self, prefix: IPNetwork) -> None:
        """Queue `delete <prefix> table <table>`, whatever its type, protocol, scope and next hop."""
        address, prefixlen = packed_prefix(prefix)
        message = _ROUTE_MESSAGE[len(address), False]
        encoded = message.pack(
            message.size, RTM_DELROUTE, NLM_F_REQUEST, self._sequence(), 0,
            socket.AF_INET if len(address) == 4 else socket.AF_INET6, prefixlen, 0, 0, self._rtm_table, 0,
            RT_SCOPE_NOWHERE, 0, 0, 8, RTA_TABLE, self.table, 4 + len(address), RTA_DST, address)
        self._queue(encoded, prefix, True)

    def _sequence(self) -> int:
        sequence = self.netlink.next_sequence()
        if not self._prefixes:
            self._first_sequence = sequence
        return sequence

    def _queue(self, encoded: bytes, prefix: IPNetwork, delete: bool) -> None:
        self._last_offset = len(self._messages)
        self._messages += encoded
        self._prefixes.append(prefix)
        self._deletes.append(delete)
        if len(self._prefixes) >= self.netlink.batch_limit:
            self.send()

    def send(self) -> None:
        """Send what is queued and check the acks: raises NetlinkError (errno, the prefix, the kernel's reason) for
        the first message that failed other than by deleting a route that is already gone."""
        if not self._prefixes:
            return
        messages, prefixes, deletes = self._messages, self._prefixes, self._deletes
        self._messages, self._prefixes, self._deletes = bytearray(), [], bytearray()
        flags = self._last_offset + _FLAGS_OFFSET  # the last message asks for the ack that closes the batch
        _U16.pack_into(messages, flags, _U16.unpack_from(messages, flags)[0] | NLM_F_ACK)
        for index, code, reason in self.netlink.transact(messages, self._first_sequence, len(prefixes)):
            if deletes[index] and code in _ALREADY_GONE:
                continue
            action = "delete" if deletes[index] else "set"
            raise NetlinkError(code, f"{action} route {prefixes[index]} in table {self.table}: "
                                     f"{os.strerror(code)}{reason}")


def decode_route(buffer: memoryview | bytes, start: int, end: int, address_size: int,
                 ifindex: int | None) -> tuple[int, IPNetwork, str]:
    """(table, prefix, RouteKind value or FOREIGN_ROUTE) of the RTM_NEWROUTE message at buffer[start:end] (shared
    with the netlink monitor). `dev`: unicast straight out of device `ifindex` (no gateway, via, multipath or
    nexthop object); `throw`; anything else is foreign."""
    _, prefixlen, _, _, table, _, _, route_type, _ = _RTMSG.unpack_from(buffer, start + 16)
    destination = bytes(address_size)
    device = None
    other_nexthop = False
    offset = start + 28
    while offset + 4 <= end:
        length, attribute = _ATTRIBUTE.unpack_from(buffer, offset)
        if length < 4:
            break
        if attribute == RTA_TABLE:
            table = _U32.unpack_from(buffer, offset + 4)[0]
        elif attribute == RTA_DST:
            destination = bytes(buffer[offset + 4:offset + length])
        elif attribute == RTA_OIF:
            device = _U32.unpack_from(buffer, offset + 4)[0]
        elif attribute in _OTHER_NEXTHOP:
            other_nexthop = True
        offset += (length + 3) & ~3
    if route_type == RTN_THROW:
        kind = RouteKind.THROW.value
    elif route_type == RTN_UNICAST and ifindex is not None and device == ifindex and not other_nexthop:
        kind = RouteKind.WIREGUARD.value
    else:
        kind = FOREIGN_ROUTE
    return table, prefix_of_packed(destination, prefixlen), kind


class PyrouteRouting:
    """RoutingApplier for table `table`, whose `dev` routes go out of interface `ifname`: routes through
    `RouteNetlink`, rules and the device's address through pyroute2."""

    def __init__(self, table: int, ifname: str, bypass_priority: int) -> None:
        self.table = table
        self.ifname = ifname
        self.bypass_priority = bypass_priority  # the hook's `from <IP> lookup main` rules are the main-table rules here
        self._ipr = IPRoute()
        try:
            self._netlink = RouteNetlink()
        except BaseException:
            self._ipr.close()
            raise

    def _ifindex(self) -> int | None:
        return self._netlink.link_index(self.ifname)

    def read(self, routes: bool = True) -> TableState:
        stream = self.read_stream(routes)
        with paused_gc():  # a dump of a full table makes a million new prefixes (GC-tracked ints)
            table_routes = dict(stream.routes)
        return replace(stream.table, routes=table_routes)

    def read_stream(self, routes: bool = True) -> TableStream:
        ifindex = self._ifindex()
        rules = set()
        for version in (4, 6):
            for message in self._ipr.get_rules(family=_FAMILY[version]):
                table = message.get("table")
                priority = message.get("priority") or 0
                if table == self.table:
                    rules.add(RuleSpec(version, priority, message.get("fwmark") or 0, message.get("fwmask") or 0,
                                       self.table, bool(message["flags"] & FIB_RULE_INVERT)))
                elif table == MAIN_TABLE and priority == self.bypass_priority and message.get("src"):
                    source = ipaddress.ip_network(f"{message.get('src')}/{message['src_len']}", strict=False)
                    rules.add(RuleSpec(version, priority, 0, 0, MAIN_TABLE, False, source))
        addresses = frozenset(  # IPv4 only: the device's IPv6 link-local address is the kernel's, not ours
            ipaddress.ip_network(f"{message.get('address')}/{message['prefixlen']}", strict=False)
            for message in (self._ipr.get_addr(index=ifindex, family=socket.AF_INET) if ifindex is not None else ())
        )
        return TableStream(TableState({}, frozenset(rules), addresses), self._routes(ifindex) if routes else iter(()))

    def _routes(self, ifindex: int | None) -> Iterator[tuple[IPNetwork, str]]:
        """Every route of the table, decoded as its message is taken (an abandoned dump is read to its end)."""
        for family, address_size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
            for buffer, start, end in self._netlink.dump_routes(family, self.table):
                table, prefix, kind = decode_route(buffer, start, end, address_size, ifindex)
                if table == self.table:
                    yield prefix, kind

    def apply(self, ops: Iterable[RoutingOp]) -> None:
        """Apply `ops` in order (iterated once: a full plan's 1.25 M route ops are made as they are taken). Routes
        go out in batches of up to `RouteNetlink.batch_limit` messages, flushed before any other op; at the first
        failure NetlinkError is raised with everything before it applied - and, of the failed op's batch, also the
        route ops after it (the kernel handles a batch whole); the caller reads the table back after an error."""
        batch = _RouteBatch(self._netlink, self.table)
        ifindex: int | None = None
        for op in ops:
            if isinstance(op, SetRoute):
                if ifindex is None and op.kind is not RouteKind.THROW:
                    batch.send()  # the lookup is a message of its own: a batch's sequence numbers stay consecutive
                    ifindex = self._ifindex()
                    if ifindex is None:
                        raise RuntimeError(f"cannot route {op.prefix} to {self.ifname}: no such device")
                batch.set_route(op.prefix, op.kind, ifindex)
            elif isinstance(op, DeleteRoute):
                batch.delete_route(op.prefix)
            else:
                batch.send()
                self._apply_other(op)
        batch.send()

    def _apply_other(self, op: RoutingOp) -> None:
        if isinstance(op, AddRule):
            self._ignore({errno.EEXIST}, self._ipr.rule, "add", **self._rule_args(op.rule))
        elif isinstance(op, DeleteRule):
            self._ignore(_ALREADY_GONE, self._ipr.rule, "del", **self._rule_args(op.rule))
        elif isinstance(op, AddDeviceAddress):
            ifindex = self._ifindex()
            if ifindex is None:
                raise RuntimeError(f"cannot address {self.ifname}: no such device")
            self._ignore({errno.EEXIST}, self._ipr.addr, "add", index=ifindex,
                         address=str(op.prefix.network_address), prefixlen=op.prefix.prefixlen,
                         scope=RT_SCOPE_LINK)

    @staticmethod
    def _rule_args(rule: RuleSpec) -> dict[str, int | str]:
        if rule.source is not None:
            return {"priority": rule.priority, "table": rule.table, "family": _FAMILY[rule.family],
                    "src": str(rule.source.network_address), "src_len": rule.source.prefixlen}
        return {"priority": rule.priority, "fwmark": rule.fwmark, "fwmask": rule.mask, "table": rule.table,
                "family": _FAMILY[rule.family], "flags": FIB_RULE_INVERT if rule.invert else 0}

    @staticmethod
    def _ignore(codes: set[int], call, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        try:
            call(*args, **kwargs)
        except NetlinkError as error:
            if error.code not in codes:
                raise

    def flush(self) -> None:
        state = self.read()
        self.apply(chain((DeleteRule(rule) for rule in state.rules), (DeleteRoute(prefix) for prefix in state.routes)))

    def close(self) -> None:
        self._netlink.close()
        self._ipr.close()
