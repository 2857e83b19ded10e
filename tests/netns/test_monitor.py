"""The netlink monitor on a real kernel, in a namespace of the test's own: it survives an overflow of its socket
(ENOBUFS -> reopened, full resync), a closed socket and an error of its own, keeps reporting afterwards, and says
in `health()` when it cannot listen."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_hook.apply import monitor as monitor_module
from node_hook.apply.monitor import NetlinkMonitor
from node_hook.config import Settings
from wgcni_lab.harness.netns import sh
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

TABLE = 51820


class Events:
    """DataplaneEvents that records what the monitor reported (any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.aspects: list[str] = []
        self.removed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.resyncs = 0
        self.fail_next = 0  # the next N reports raise, as a bug in the receiver would
        self.released = threading.Event()  # cleared: a report blocks (the monitor stops reading its socket)
        self.released.set()

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected failure in the receiver")

    def dataplane_changed(self, *aspects: str) -> None:
        with self.lock:
            self._maybe_fail()
            self.aspects.extend(aspects)

    def route_removed(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.released.wait()
        with self.lock:
            self._maybe_fail()
            self.removed.append(prefix)

    def pod_routes_changed(self) -> None:
        pass

    def trigger_resync(self) -> int:
        with self.lock:
            self.resyncs += 1
        return 0


@pytest.fixture
def node(netns: str, tmp_path: Path) -> Iterator[tuple[NetlinkMonitor, Events]]:
    """A veth pair standing in for the WireGuard device, and a monitor with a small receive buffer."""
    sh("ip", "link", "add", "wgt0", "type", "veth", "peer", "name", "wgt1")
    sh("ip", "link", "set", "wgt0", "up")
    sh("ip", "link", "set", "wgt1", "up")
    settings = Settings(node_name="n", state_dir=tmp_path, interface="wgt0", route_table=TABLE)
    events = Events()
    monitor = NetlinkMonitor(settings, events, receive_buffer=4096)
    monitor.start()
    wait_until(lambda: all(state.listening for state in monitor.watchers.values()), 5, what="monitor listening")
    yield monitor, events
    monitor.stop()


def _still_reports(monitor: NetlinkMonitor, events: Events, address: str) -> None:
    sh("ip", "route", "add", address, "dev", "wgt0", "table", str(TABLE))
    sh("ip", "route", "del", address, "table", str(TABLE))
    wait_until(lambda: ipaddress.ip_network(address) in events.removed, 5, what=f"removal of {address} reported")


def test_an_overflow_reopens_the_socket_and_asks_for_a_full_resync(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    state = monitor.watchers["rtnetlink"]
    events.released.clear()  # the monitor blocks on the next report while a burst fills its socket
    sh("ip", "route", "add", "10.8.0.9", "dev", "wgt0", "table", str(TABLE))
    sh("ip", "route", "del", "10.8.0.9", "table", str(TABLE))
    burst = "".join(f"route add 10.9.{i // 250}.{i % 250}/32 dev wgt0 table {TABLE}\n" for i in range(500))
    sh("sh", "-c", f"printf '{burst}' | ip -batch -")
    events.released.set()
    wait_until(lambda: state.overflows >= 1 and events.resyncs >= 1 and state.listening, 5,
               what="overflow seen, resync asked, listening again", detail=state.describe)
    assert monitor.health()[0]
    _still_reports(monitor, events, "10.8.0.1")


def test_a_closed_socket_is_reopened_and_followed_by_a_resync(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    state = monitor.watchers["rtnetlink"]
    state.socket.close()
    wait_until(lambda: state.restarts == 1 and state.listening and events.resyncs == 1, 5,
               what="reopened after the close", detail=state.describe)
    assert "closed" in (state.last_error or "")
    _still_reports(monitor, events, "10.8.0.2")


def test_an_error_while_handling_is_survived(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    state = monitor.watchers["rtnetlink"]
    events.fail_next = 1
    sh("ip", "route", "add", "10.8.0.3", "dev", "wgt0", "table", str(TABLE))
    sh("ip", "route", "del", "10.8.0.3", "table", str(TABLE))
    wait_until(lambda: state.restarts == 1 and state.listening and events.resyncs == 1, 5,
               what="restarted after the receiver's error", detail=state.describe)
    assert "injected failure" in (state.last_error or "")
    _still_reports(monitor, events, "10.8.0.4")


def test_health_fails_when_the_monitor_cannot_listen_again(node: tuple[NetlinkMonitor, Events],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, _ = node
    state = monitor.watchers["rtnetlink"]
    monkeypatch.setattr(monitor_module, "DOWN_GRACE", 0.3)
    monkeypatch.setattr(monitor_module, "RESTART_DELAYS", (0.05,))

    def refuse(state: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setitem(monitor._bodies, "rtnetlink", refuse)
    monitor.watchers["rtnetlink"].socket.close()  # the watcher fails; every reopen now fails too
    wait_until(lambda: not monitor.health()[0], 5, what="health failing")
    ok, message = monitor.health()
    assert "rtnetlink: not listening" in message and "Too many open files" in message
    assert state.restarts >= 2
