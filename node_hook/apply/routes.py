"""Routing applier (pyroute2): the routes in the hook's table, the rules that point at it, the device's address.

Only the hook's table and rules whose table is the hook's table are read, changed or flushed; the main table and
every other rule are never touched. A `dev <wg>` route is a unicast route out of the WireGuard device; a `throw`
route makes the lookup leave the table (the main table then decides). Deleting what is already gone and adding
what already exists succeed (ESRCH / ENOENT / EEXIST are "already done"), so a retried batch converges.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from node_hook.apply.dataplane import (
    FOREIGN_ROUTE,
    AddDeviceAddress,
    AddRule,
    DeleteRoute,
    DeleteRule,
    RoutingOp,
    RuleSpec,
    SetRoute,
    TableState,
)
from node_hook.model import RouteKind, prefix_from_text

RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTN_THROW = 9
FIB_RULE_INVERT = 0x2
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ALREADY_GONE = {errno.ESRCH, errno.ENOENT}


class PyrouteRouting:
    """RoutingApplier for table `table`, whose `dev` routes go out of interface `ifname`."""

    def __init__(self, table: int, ifname: str) -> None:
        self.table = table
        self.ifname = ifname
        self._ipr = IPRoute()

    def _ifindex(self) -> int | None:
        found = self._ipr.link_lookup(ifname=self.ifname)
        return found[0] if found else None

    def read(self) -> TableState:
        ifindex = self._ifindex()
        routes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for message in self._ipr.get_routes(family=family, table=self.table):
                if message.get("table") != self.table:
                    continue
                destination = message.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")
                # the model's packed prefix: a third of the memory and 4x faster than ip_network for a large table
                prefix = prefix_from_text(f"{destination}/{message['dst_len']}")
                if message["type"] == RTN_THROW:
                    kind = RouteKind.THROW.value
                elif message["type"] == RTN_UNICAST and ifindex is not None and message.get("oif") == ifindex \
                        and message.get("gateway") is None:
                    kind = RouteKind.WIREGUARD.value
                else:
                    kind = FOREIGN_ROUTE
                routes[prefix] = kind
        rules = set()
        for family in (4, 6):
            for message in self._ipr.get_rules(family=_FAMILY[family]):
                if message.get("table") != self.table:
                    continue
                rules.add(RuleSpec(family, message.get("priority") or 0, message.get("fwmark") or 0,
                                   message.get("fwmask") or 0, self.table, bool(message["flags"] & FIB_RULE_INVERT)))
        addresses = frozenset(  # IPv4 only: the device's IPv6 link-local address is the kernel's, not ours
            ipaddress.ip_network(f"{message.get('address')}/{message['prefixlen']}", strict=False)
            for message in (self._ipr.get_addr(index=ifindex, family=socket.AF_INET) if ifindex is not None else ())
        )
        return TableState(routes, frozenset(rules), addresses)

    def apply(self, ops: list[RoutingOp]) -> None:
        ifindex: int | None = None
        for op in ops:
            if isinstance(op, SetRoute):
                family = _FAMILY[op.prefix.version]
                if op.kind is RouteKind.THROW:
                    self._ipr.route("replace", dst=str(op.prefix), table=self.table, type="throw", family=family)
                else:
                    if ifindex is None:
                        ifindex = self._ifindex()
                        if ifindex is None:
                            raise RuntimeError(f"cannot route {op.prefix} to {self.ifname}: no such device")
                    self._ipr.route("replace", dst=str(op.prefix), table=self.table, oif=ifindex, family=family)
            elif isinstance(op, DeleteRoute):
                self._ignore(_ALREADY_GONE, self._ipr.route, "del", dst=str(op.prefix), table=self.table,
                             family=_FAMILY[op.prefix.version])
            elif isinstance(op, AddRule):
                self._ignore({errno.EEXIST}, self._ipr.rule, "add", **self._rule_args(op.rule))
            elif isinstance(op, DeleteRule):
                self._ignore(_ALREADY_GONE, self._ipr.rule, "del", **self._rule_args(op.rule))
            elif isinstance(op, AddDeviceAddress):
                found = self._ipr.link_lookup(ifname=self.ifname)
                if not found:
                    raise RuntimeError(f"cannot address {self.ifname}: no such device")
                self._ignore({errno.EEXIST}, self._ipr.addr, "add", index=found[0],
                             address=str(op.prefix.network_address), prefixlen=op.prefix.prefixlen,
                             scope=RT_SCOPE_LINK)

    @staticmethod
    def _rule_args(rule: RuleSpec) -> dict[str, int]:
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
        self.apply([DeleteRule(rule) for rule in state.rules] + [DeleteRoute(prefix) for prefix in state.routes])

    def close(self) -> None:
        self._ipr.close()
