"""Local pod IPs as the node's routing table shows them: the second source of local pods, beside the pod records.

azure-vnet (transparent mode) gives every pod a host route in the main table, `<pod IP>/32 dev azv<hash>` (and
`/128` for IPv6); the lab's ptp does the same with `veth<hex>`. That route exists for every pod on the node whether
or not wgcni saw its ADD: pods that ran before wgcni was installed (CoreDNS among them), pods started while Azure
CNS had rewritten the conflist without the wgcni entry, pods whose record was lost. A pod IP the hook does not
know as local is cut off from other nodes: its replies are routed into the tunnel with a source no peer allows.
So the hook takes every such route as a local pod, keyed by its host interface, and publishes its IPs.

Why routes and not the API's pods of this node: the route is there before the pod's first packet (azure-vnet adds
it before the chain reaches wgcni), reading it costs one dump of the main table (a few hundred routes) and no
API traffic or RBAC on pods, and it keeps working when the API server is unreachable.

`pod_routes_from_dump` is pure (netlink messages in, {interface: IPs} out); `KernelPodRoutes` reads them;
`node_hook.apply.fakes.FakePodRoutes` is the in-memory stand-in the daemon's tests use.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

MAIN_TABLE = 254
RTN_UNICAST = 1
HOST_PREFIX_LENGTH = {socket.AF_INET: 32, socket.AF_INET6: 128}

PodRoutes = dict[str, frozenset[str]]  # host-side pod interface -> the pod IPs routed to it


class PodRouteSource(Protocol):
    """Reads this node's pod host routes."""

    def read(self) -> PodRoutes:
        ...

    def close(self) -> None:
        ...


def is_pod_interface(name: str | None, prefixes: Iterable[str]) -> bool:
    return bool(name) and any(str(name).startswith(prefix) for prefix in prefixes)


def pod_routes_from_dump(routes: Iterable[Any], link_names: Mapping[int, str], prefixes: Iterable[str]) -> PodRoutes:
    """The pod IPs of the main table's host routes out of pod interfaces (unicast, no gateway; link-local
    addresses left out), grouped by interface. `routes` are pyroute2 route messages."""
    prefixes = tuple(prefixes)
    found: dict[str, set[str]] = {}
    for route in routes:
        family = route["family"]
        if route["dst_len"] != HOST_PREFIX_LENGTH.get(family) or route["type"] != RTN_UNICAST:
            continue
        if (route.get_attr("RTA_TABLE") or route["table"]) != MAIN_TABLE or route.get_attr("RTA_GATEWAY"):
            continue
        name = link_names.get(route.get_attr("RTA_OIF"))
        destination = route.get_attr("RTA_DST")
        if destination is None or not is_pod_interface(name, prefixes):
            continue
        address = ipaddress.ip_address(destination)
        if address.is_link_local:
            continue
        found.setdefault(str(name), set()).add(str(address))
    return {name: frozenset(ips) for name, ips in found.items()}


class KernelPodRoutes:
    """PodRouteSource over netlink (pyroute2) in the current network namespace."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        from pyroute2 import IPRoute

        self.prefixes = tuple(prefixes)
        self._ipr = IPRoute()

    def read(self) -> PodRoutes:
        link_names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        routes = [route for family in (socket.AF_INET, socket.AF_INET6)
                  for route in self._ipr.get_routes(family=family, table=MAIN_TABLE)]
        return pod_routes_from_dump(routes, link_names, self.prefixes)

    def close(self) -> None:
        self._ipr.close()
