"""Wiring of one node's hook: `build_node()` puts an engine together with its appliers, sources, netlink monitor and
view - real ones unless given - and is what `wgcni-node run`, the tests and the benchmarks all use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_hook.apply.monitor import NetlinkMonitor
from node_hook.config import Settings
from node_hook.contracts import WireGuardBackend, WireGuardChange
from node_hook.detect import Environment, kernel_wireguard_available
from node_hook.engine import FIREWALL_TABLE, Appliers, Engine, Observer, PeerSource, RecordSource
from node_hook.install.settings import DEFAULT_CONF_DIR as DEFAULT_CNI_CONF_DIR
from node_hook.keys import KeyStore, NodeKey
from node_hook.pod_routes import PodRouteSource
from node_hook.view import NodeView


def real_wireguard_backend(settings: Settings, on_exit: Callable[[int], None],
                           on_change: Callable[[WireGuardChange], None] | None = None) -> WireGuardBackend:
    """The backend the settings ask for; `auto` = kernel when the WireGuard module is available. `on_change` hears
    of writes by others to the device that the backend sees."""
    backend = settings.backend
    if backend == "auto":
        backend = "kernel" if kernel_wireguard_available() else "userspace"
    if backend == "kernel":
        from node_hook.apply.wg_kernel import KernelWireGuard  # imported only when chosen

        return KernelWireGuard(settings.interface)
    from node_hook.apply.wg_uapi import UserspaceWireGuard

    return UserspaceWireGuard(settings.interface, settings.wireguard_go, on_exit=on_exit,
                              log_file=settings.state_dir / f"wireguard-go-{settings.interface}.log",
                              private_dir=settings.state_dir / "wireguard-go", on_change=on_change)


def real_appliers(settings: Settings, on_wireguard_exit: Callable[[int], None],
                  on_wireguard_change: Callable[[WireGuardChange], None] | None = None) -> Appliers:
    from node_hook.apply.firewall import NftFirewall
    from node_hook.apply.routes import PyrouteRouting
    from node_hook.apply.sysctl import Sysctls
    from node_hook.strict import boot_file as strict_boot_file

    return Appliers(
        real_wireguard_backend(settings, on_wireguard_exit, on_wireguard_change),
        PyrouteRouting(settings.route_table, settings.interface, settings.bypass_rule_priority),
        NftFirewall(FIREWALL_TABLE, boot_file=strict_boot_file(settings)),
        Sysctls(settings.sysctl_originals_file),
    )


@dataclass
class Node:
    """One node's running hook: the engine, its read-only view and (on a real node) its netlink monitor."""

    engine: Engine
    view: NodeView
    monitor: NetlinkMonitor | None

    def start(self) -> None:
        self.engine.start()
        if self.monitor is not None:
            self.monitor.start()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self.engine.stop()


def build_node(
    settings: Settings,
    key: NodeKey,
    environment: Environment,
    peer_source: PeerSource,
    *,
    appliers: Appliers | None = None,
    records: RecordSource | None = None,
    pod_routes: PodRouteSource | None = None,
    monitor_netlink: bool = True,
    observer: Observer | None = None,
    cni_conf_dir: Path = DEFAULT_CNI_CONF_DIR,
    clock: Callable[[], float] = time.monotonic,
) -> Node:
    """A node's hook on the real kernel, with whatever is given in place of the real part (fakes in tests)."""
    if records is None:
        from cni_plugin.records import RecordStore

        records = RecordStore(str(settings.state_dir))
    if pod_routes is None:
        from node_hook.pod_routes import KernelPodRoutes

        pod_routes = KernelPodRoutes(settings.pod_interface_prefixes)
    engine_ref: list[Engine] = []  # the backend tells the engine, made after it, of exits and outside writes
    if appliers is None:
        appliers = real_appliers(settings, lambda code: engine_ref[0].wireguard_exited(code) if engine_ref else None,
                                 lambda change: engine_ref[0].wireguard_changed(change) if engine_ref else None)
    engine = Engine(settings, key, environment, peer_source, appliers, records, pod_routes, clock, observer,
                    key_store=KeyStore(settings.key_file))
    engine_ref.append(engine)
    targets = engine.targets
    monitor = NetlinkMonitor(settings, engine, sysctls=targets.sysctls, firewall_table=targets.firewall.table,
                             mtu=targets.device.mtu, wireguard_capture=getattr(appliers.wireguard, "capture", None),
                             ) if monitor_netlink else None
    return Node(engine, NodeView(engine, cni_conf_dir, monitor), monitor)
