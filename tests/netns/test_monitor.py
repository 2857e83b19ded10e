"""The netlink monitor on a real kernel, in a namespace of the test's own: what it reports for each kind of outside
change (routes of our table added, changed, removed; rules; the device's address, state and MTU; our nftables
tables; the sysctls), and that it survives an overflow of its socket (ENOBUFS -> reopened, full resync), a closed
socket and an error of its own, keeps reporting afterwards, and says in `health()` when it cannot listen."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from node_hook.addresses import IPNetwork
from node_hook.apply import monitor as monitor_module
from node_hook.apply.monitor import NetlinkMonitor, WatcherState
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
        self.routes: list[tuple[IPNetwork, str | None]] = []
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

    def routes_seen(self, routes: Mapping[IPNetwork, str | None]) -> None:
        self.released.wait()
        with self.lock:
            self._maybe_fail()
            self.routes.extend(routes.items())

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
    sysctls = tmp_path / "sys"
    (sysctls / "net/ipv4/conf/all").mkdir(parents=True)
    (sysctls / "net/ipv4/conf/all/src_valid_mark").write_text("1\n")
    monitor = NetlinkMonitor(settings, events, sysctls={"net/ipv4/conf/all/src_valid_mark": "1"}, mtu=1500,
                             receive_buffer=4096, sysctl_root=sysctls, poll_interval=0.05)
    monitor.start()
    wait_until(lambda: all(state.listening for state in monitor.watchers.values()), 5, what="monitor listening")
    yield monitor, events
    monitor.stop()


def _reported(events: Events, aspect: str) -> None:
    wait_until(lambda: aspect in events.aspects, 3, what=f"{aspect} reported", detail=lambda: events.aspects)
    events.aspects.clear()


def test_each_kind_of_outside_change_is_reported(node: tuple[NetlinkMonitor, Events], tmp_path: Path) -> None:
    monitor, events = node
    table = str(TABLE)
    sh("ip", "route", "add", "10.8.1.1", "dev", "wgt0", "table", table)
    sh("ip", "route", "replace", "10.8.1.1", "dev", "wgt1", "table", table)
    sh("ip", "route", "replace", "10.8.1.1", "via", "10.8.1.1", "dev", "wgt0", "onlink", "table", table)
    sh("ip", "route", "add", "throw", "10.8.2.0/24", "table", table)
    sh("ip", "route", "del", "10.8.1.1", "table", table)
    sh("ip", "route", "add", "10.8.3.1", "dev", "wgt1")  # another table: not ours
    expected = [("10.8.1.1/32", "dev"), ("10.8.1.1/32", "foreign"), ("10.8.1.1/32", "foreign"),
                ("10.8.2.0/24", "throw"), ("10.8.1.1/32", None)]
    wait_until(lambda: [(str(prefix), kind) for prefix, kind in events.routes] == expected, 3,
               what="the route changes, in order", detail=lambda: events.routes)
    sh("ip", "rule", "add", "pref", "99", "not", "fwmark", "0x10000/0x10000", "lookup", table)
    _reported(events, "rules")
    sh("ip", "rule", "del", "pref", "99")
    _reported(events, "rules")
    sh("ip", "address", "add", "192.0.0.8/32", "dev", "wgt0")
    sh("ip", "address", "del", "192.0.0.8/32", "dev", "wgt0")
    _reported(events, "routes")
    sh("ip", "link", "set", "wgt0", "mtu", "1400")
    _reported(events, "device")
    sh("ip", "link", "set", "wgt0", "down")
    _reported(events, "device")
    sh("nft", "add", "table", "inet", "wgcni")
    _reported(events, "firewall")
    sh("nft", "add", "chain", "inet", "wgcni", "c")
    _reported(events, "firewall")
    sh("nft", "add", "table", "arp", "wgcni")
    _reported(events, "firewall")
    sh("nft", "add", "table", "inet", "other")  # not ours
    sh("nft", "flush", "ruleset")
    _reported(events, "firewall")
    (tmp_path / "sys/net/ipv4/conf/all/src_valid_mark").write_text("0\n")
    _reported(events, "sysctls")
    assert all(state.listening for state in monitor.watchers.values())


def test_changes_elsewhere_are_not_reported(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    sh("ip", "route", "add", "10.8.3.1", "dev", "wgt1")
    sh("ip", "rule", "add", "pref", "300", "lookup", "100")
    sh("ip", "rule", "del", "pref", "300")
    sh("nft", "add", "table", "inet", "other")
    sh("nft", "add", "chain", "inet", "other", "c")
    sh("nft", "delete", "table", "inet", "other")
    sh("ip", "link", "set", "wgt1", "mtu", "1400")
    # markers, one per watcher: once each is reported, everything before it was seen
    sh("ip", "route", "add", "10.8.1.1", "dev", "wgt0", "table", str(TABLE))
    sh("nft", "add", "table", "inet", "wgcni")
    wait_until(lambda: events.routes and "firewall" in events.aspects, 3, what="the markers")
    assert set(events.aspects) == {"firewall"}


def _still_reports(monitor: NetlinkMonitor, events: Events, address: str) -> None:
    sh("ip", "route", "add", address, "dev", "wgt0", "table", str(TABLE))
    sh("ip", "route", "del", address, "table", str(TABLE))
    wait_until(lambda: (ipaddress.ip_network(address), None) in events.routes, 5, what=f"removal of {address} reported")


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


def read_back(state: WatcherState, events: Events) -> bool:
    """Every fault was followed by a read-back: at least one, and none pending. (An overflow of a busy machine can
    come on top of the injected fault and asks for a read-back of its own.)"""
    return events.resyncs >= 1 and not state.resync_pending and events.resyncs <= state.restarts + state.overflows


def test_a_closed_socket_is_reopened_and_followed_by_a_resync(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    state = monitor.watchers["rtnetlink"]
    state.socket.close()
    wait_until(lambda: state.restarts == 1 and state.listening and read_back(state, events), 5,
               what="reopened after the close", detail=state.describe)
    assert "Bad file descriptor" in (state.last_error or "")  # closed under the watcher, which reopened it
    _still_reports(monitor, events, "10.8.0.2")


def test_an_error_while_handling_is_survived(node: tuple[NetlinkMonitor, Events]) -> None:
    monitor, events = node
    state = monitor.watchers["rtnetlink"]
    events.fail_next = 1
    sh("ip", "route", "add", "10.8.0.3", "dev", "wgt0", "table", str(TABLE))
    sh("ip", "route", "del", "10.8.0.3", "table", str(TABLE))
    wait_until(lambda: state.restarts == 1 and state.listening and read_back(state, events), 5,
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


def test_a_fault_after_a_healthy_run_restarts_from_the_first_delay(node: tuple[NetlinkMonitor, Events],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The backoff grows over consecutive failed reopens only: a watcher that listened for HEALTHY_RUN before it
    failed is reopened after the first delay again, however many faults it has had over the node's life."""
    monitor, _ = node
    state = monitor.watchers["rtnetlink"]
    monkeypatch.setattr(monitor_module, "HEALTHY_RUN", 0.2)
    monkeypatch.setattr(monitor_module, "RESTART_DELAYS", (0.05, 5.0))
    starts: list[float] = []

    def listen_then_fail(state: WatcherState) -> None:
        starts.append(time.monotonic())
        monitor._listening(state, None)
        time.sleep(0.3)  # a healthy run
        raise OSError(5, "Input/output error")

    monkeypatch.setitem(monitor._bodies, "rtnetlink", listen_then_fail)
    state.socket.close()  # the real watcher fails once; from its reopen on every run listens, then fails
    wait_until(lambda: len(starts) >= 4, 4, what="four runs, each after the first delay", detail=state.describe)
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert max(gaps) < 2.0, f"the backoff kept growing across healthy runs: gaps {gaps}"
