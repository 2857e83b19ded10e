"""A real hook daemon on the appliers' fakes, serving its local API and metrics, for the CLI, check and metrics tests.

Everything is per test (the fakes are cheap): a temporary state dir, socket, CNI conf dir holding an AKS conflist
with the wgcni entry, and a fake /sys/class/net whose underlay MTU matches the environment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.cli import run
from cni_plugin.records import RecordStore, utc_now_rfc3339
from node_hook import diagnose
from node_hook.apply.fakes import FakeFirewall, FakePodRoutes, FakeRouting, FakeSysctls, FakeWireGuard
from node_hook.config import Settings
from node_hook.detect import Environment
from node_hook.engine import Appliers
from node_hook.keys import load_or_create
from node_hook.local_api import LocalApiServer
from node_hook.metrics import HookMetrics, MetricsServer
from node_hook.model import RemoteNode
from node_hook.node import build_node
from wgcni_lab.harness.peer_source import ManualPeerSource
from wgcni_lab.harness.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
AKS_CONFLIST = REPO / "tests" / "cni" / "data" / "azure-linux.conflist"


def key_of(letter: str) -> str:
    return letter * 43 + "="


def remote(name: str, letter: str, node_ip: str, pod_ips: set[str], changed_at: float = 1.0,
           key: str | None = None) -> RemoteNode:
    return RemoteNode(name, key if key is not None else key_of(letter), node_ip, 51820, frozenset({node_ip}),
                      frozenset(pod_ips), changed_at)


class Hook:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        self.tmp = tmp
        self.settings = Settings(node_name="node-a", state_dir=tmp / "state", socket=tmp / "hook.sock",
                                 record_rescan_interval=0.2, resync_interval=600, **settings)
        self.key = load_or_create(self.settings.key_file)
        self.environment = Environment("10.240.0.4", frozenset({"10.240.0.4"}), "eth0", 1500, False,
                                       "test", 1440, "underlay 1500 - 60 (WireGuard over IPv4) = 1440",
                                       frozenset({"10.240.0.0/16"}))
        self.sys_class_net = tmp / "sys-class-net"
        self.set_underlay_mtu(1500)
        monkeypatch.setattr(diagnose, "SYS_CLASS_NET", self.sys_class_net)
        self.conf_dir = tmp / "net.d"
        self.conf_dir.mkdir()
        conflist = json.loads(AKS_CONFLIST.read_text())
        conflist["plugins"].insert(1, {"type": "wgcni"})
        (self.conf_dir / "10-azure.conflist").write_text(json.dumps(conflist, indent=2))
        self.wg = FakeWireGuard()
        self.routing = FakeRouting(self.settings.route_table)
        self.firewall = FakeFirewall()
        self.sysctls = FakeSysctls({"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/wgcni0/rp_filter": "1"},
                                   self.settings.sysctl_originals_file)
        self.source = ManualPeerSource()
        self.pod_routes = FakePodRoutes()
        self.store = RecordStore(str(self.settings.state_dir))
        self.metrics = HookMetrics()
        self.node = build_node(self.settings, self.key, self.environment, self.source,
                               appliers=Appliers(self.wg, self.routing, self.firewall, self.sysctls),
                               records=self.store, pod_routes=self.pod_routes, monitor_netlink=False,
                               observer=self.metrics, cni_conf_dir=self.conf_dir)
        self.engine, self.view = self.node.engine, self.node.view
        self.metrics.attach(self.view)
        self.api = LocalApiServer(self.settings.socket, self.node)
        self.http = MetricsServer("127.0.0.1:0", self.metrics)

    def set_underlay_mtu(self, mtu: int) -> None:
        (self.sys_class_net / "eth0").mkdir(parents=True, exist_ok=True)
        (self.sys_class_net / "eth0" / "mtu").write_text(f"{mtu}\n")

    @property
    def url(self) -> str:
        host, port = self.http.address
        return f"http://{host}:{port}"

    def nodes(self, *nodes: RemoteNode, complete: bool = True) -> None:
        if complete:
            self.source.sync(*nodes)
        else:
            for node in nodes:
                self.source.change(node)

    def add_pod(self, name: str, ips: list[str]) -> None:
        now = utc_now_rfc3339()
        with self.store.lock():
            self.store.write({"format": 1, "network": "azure", "containerID": f"c-{name}", "ifname": "eth0",
                              "netns": "/var/run/netns/x", "podNamespace": "shop", "podName": name, "podUID": None,
                              "ips": ips, "cniVersion": "0.3.0", "prevResult": {}, "created": now, "updated": now})
        self.engine.pod_changed("azure", f"c-{name}", "eth0", wait=5)

    def settle(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        wait_until(predicate, timeout, "the daemon's state", interval=0.01,
                   detail=lambda: f"status {self.view.status()}")

    def converged(self) -> None:
        generation = self.engine.generation
        self.settle(lambda: self.engine.generation > generation and self.engine.reconciler.converged
                    and self.engine.last_error is None)

    def cli(self, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        code = run([*args, "--socket", str(self.settings.socket)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err


@contextmanager
def running_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Iterator[Hook]:
    """A Hook (`settings` as Settings takes them) started with its local API and metrics, stopped afterwards."""
    hook = Hook(tmp_path, monkeypatch, **settings)
    hook.node.start()
    try:
        hook.api.start()
        try:
            hook.http.start()
            try:
                yield hook
            finally:
                hook.http.stop()
        finally:
            hook.api.stop()
    finally:
        hook.node.stop()


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hook]:
    with running_hook(tmp_path, monkeypatch) as hook:
        yield hook
