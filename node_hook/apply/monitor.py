"""The netlink monitor: what changes on the node outside the hook's own writes, turned into engine events.

It reads, never writes (the appliers beside it are the only writers). On its own thread it listens to link, address,
route and rule notifications and tells the `DataplaneEvents` receiver (the engine):
- our WireGuard device deleted or set down, or its address removed -> that aspect is read back and repaired;
- a rule pointing at our table removed -> the rules are;
- a route of our table removed -> `route_removed(prefix)` (the engine repairs it if it still wants it);
- a host route of the main table added or removed, or a pod interface deleted -> `pod_routes_changed()`, so the
  local pods learned from azure-vnet's host routes follow (IPv4 removes a deleted link's routes without
  RTM_DELROUTE, hence the link).
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Protocol

from node_hook.config import Settings
from node_hook.pod_routes import HOST_PREFIX_LENGTH, MAIN_TABLE, is_pod_interface

IFF_UP = 1


class DataplaneEvents(Protocol):
    def dataplane_changed(self, *aspects: str) -> None: ...

    def route_removed(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None: ...

    def pod_routes_changed(self) -> None: ...


class NetlinkMonitor:
    """Listens in the current network namespace from `start()` until `stop()`."""

    def __init__(self, settings: Settings, events: DataplaneEvents) -> None:
        self.settings = settings
        self.events = events
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wgcni-netlink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
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
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
                     | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
            wireguard_index = (ipr.link_lookup(ifname=interface) or [None])[0]
            while not self._stopping.is_set():
                for message in ipr.get():
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
