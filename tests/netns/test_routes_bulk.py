"""The routing applier's batched rtnetlink path against a real table in a private namespace: thousands of routes of
both families and kinds, deletes of missing routes, a kernel error in the middle of a batch, foreign routes and
table ids above 255 - each checked with `ip -j route` (an independent reader) as well as the applier's `read()`."""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from node_hook.addresses import prefix_from_text
from node_hook.apply.routes import PyrouteRouting
from node_hook.contracts import FOREIGN_ROUTE, AddRule, DeleteRoute, RuleSpec, SetRoute
from node_hook.model import RouteKind
from node_hook.planner import RouteSets
from tests.support.kernel_wg import ip

DEVICE = "wgb0"
OTHER_DEVICE = "other0"
WIREGUARD, THROW = RouteKind.WIREGUARD, RouteKind.THROW


def table_routes(table: int) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[str, str | None]]:
    """prefix -> (route type, device) of every route in `table`, as `ip -j route show` lists them."""
    routes = {}
    for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        shown = subprocess.run(["ip", "-j", family, "route", "show", "table", str(table)], capture_output=True,
                               text=True)
        if shown.returncode and "table does not exist" in shown.stderr:  # no route of this family ever in it
            continue
        shown.check_returncode()
        for entry in json.loads(shown.stdout or "[]"):
            destination = default if entry["dst"] == "default" else entry["dst"]
            routes[ipaddress.ip_network(destination)] = (entry.get("type", "unicast"), entry.get("dev"))
    return routes


def shown_as(kinds: dict) -> dict:
    """What `table_routes` shows for routes the applier set: `dev` out of DEVICE, `throw` (IPv6 shows it on lo)."""
    return {ipaddress.ip_network(str(prefix)): ("unicast", DEVICE) if kind is WIREGUARD
            else ("throw", "lo" if prefix.version == 6 else None) for prefix, kind in kinds.items()}


def many_routes(count: int) -> dict:
    """`count` routes per family: /32 and /128 hosts plus some /24, /16, /64 and /48 networks, alternating kinds,
    and both default routes (a dump message without RTA_DST)."""
    routes = {}
    for index in range(count):
        kind = WIREGUARD if index % 3 else THROW
        if index % 50 == 0:
            v4, v6 = f"10.{100 + index // 50 % 100}.{index // 5000}.0/24", f"fd00:{index:x}::/64"
        elif index % 77 == 0:
            v4, v6 = f"172.{16 + index // 77 % 16}.0.0/16", f"fd01:{index:x}::/48"
        else:
            v4, v6 = f"10.{index >> 16}.{index >> 8 & 255}.{index & 255}/32", f"fd02::{index:x}/128"
        routes[prefix_from_text(v4)] = kind
        routes[prefix_from_text(v6)] = THROW if kind is WIREGUARD else WIREGUARD
    routes[prefix_from_text("0.0.0.0/0")] = THROW
    routes[prefix_from_text("::/0")] = WIREGUARD
    return routes


@pytest.fixture
def device(netns: str) -> Iterator[str]:
    """DEVICE and OTHER_DEVICE (veths, up, the latter with a gateway subnet of each family) in the test's namespace."""
    ip("link", "add", DEVICE, "type", "veth", "peer", "name", "wgb1")
    ip("link", "add", OTHER_DEVICE, "type", "veth", "peer", "name", "other1")
    for name in (DEVICE, "wgb1", OTHER_DEVICE, "other1"):  # both ends up: carrier (nexthop objects need it)
        ip("link", "set", name, "up")
    ip("address", "add", "10.99.0.2/24", "dev", OTHER_DEVICE)
    ip("address", "add", "fd99::2/64", "dev", OTHER_DEVICE, "nodad")
    yield DEVICE


@pytest.fixture
def routing(device: str) -> Iterator[PyrouteRouting]:
    applier = PyrouteRouting(51820, device, 98)
    try:
        yield applier
    finally:
        applier.close()


@pytest.mark.netns
@pytest.mark.parametrize("table", [100, 51820, 4_000_000_000])
def test_thousands_of_routes_of_both_families_read_back_equal(device: str, table: int) -> None:
    ip("route", "add", "10.0.0.1/32", "dev", DEVICE, "table", str(table + 1))  # a neighbouring table: not ours
    ip("route", "add", "10.0.0.2/32", "dev", DEVICE)  # the main table
    wanted = many_routes(3000)
    routing = PyrouteRouting(table, device, 98)
    try:
        routing.apply(RouteSets(SetRoute(prefix, kind) for prefix, kind in wanted.items()))  # the planner's sequence
        assert routing.read().routes == {prefix: kind.value for prefix, kind in wanted.items()}
        assert table_routes(table) == shown_as(wanted)
        # replacing with the other kind, given as a one-shot iterator (applied in one pass, never listed)
        flipped = {prefix: THROW if kind is WIREGUARD else WIREGUARD for prefix, kind in wanted.items()}
        routing.apply(SetRoute(prefix, kind) for prefix, kind in flipped.items())
        assert table_routes(table) == shown_as(flipped)
        assert routing.read().routes == {prefix: kind.value for prefix, kind in flipped.items()}
        routing.flush()
        assert routing.read().routes == {} and table_routes(table) == {}
        assert "10.0.0.1 dev" in ip("route", "show", "table", str(table + 1))
        assert "10.0.0.2 dev" in ip("route", "show")
    finally:
        routing.close()


@pytest.mark.netns
def test_deleting_missing_routes_succeeds_in_and_across_batches(routing: PyrouteRouting) -> None:
    present = {prefix_from_text(f"10.1.{index >> 8}.{index & 255}/32"): WIREGUARD for index in range(700)}
    present[prefix_from_text("fd00::1/128")] = THROW
    routing.apply(SetRoute(prefix, kind) for prefix, kind in present.items())
    missing = [prefix_from_text(f"10.2.{index >> 8}.{index & 255}/32") for index in range(700)]
    missing += [prefix_from_text("fd00::2/128"), prefix_from_text("10.1.0.0/24")]  # a host route's network: no route
    interleaved = [DeleteRoute(prefix) for pair in zip(present, missing, strict=False) for prefix in pair]
    routing.apply(interleaved)
    routing.apply(interleaved)  # everything already gone now
    assert routing.read().routes == {} and table_routes(51820) == {}


@pytest.mark.netns
def test_a_kernel_error_in_the_middle_of_a_batch_names_its_route(routing: PyrouteRouting) -> None:
    """One batch: a `dev` route (the device is looked up before the batch starts), throw routes, a `dev` route the
    kernel refuses (IPv6 off on the device: "IPv6 is disabled on nexthop device"), more throw routes. The error names
    the refused route - found by its place in the batch - and the kernel applied the routes on both sides of it."""
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{DEVICE}.disable_ipv6=1"], check=True)  # this test's namespace
    first = prefix_from_text("10.7.0.1/32")
    before = [prefix_from_text(f"10.7.1.{index}/32") for index in range(40)]
    refused = prefix_from_text("fd07::1/128")
    after = [prefix_from_text(f"10.7.2.{index}/32") for index in range(40)]
    ops = [SetRoute(first, WIREGUARD), *(SetRoute(prefix, THROW) for prefix in before), SetRoute(refused, WIREGUARD),
           *(SetRoute(prefix, THROW) for prefix in after)]
    assert len(ops) < routing._netlink.batch_limit  # all in one batch
    with pytest.raises(NetlinkError, match="fd07::1/128") as raised:
        routing.apply(ops)
    assert "table 51820" in str(raised.value) and "IPv6 is disabled" in str(raised.value)
    routes = routing.read().routes
    assert routes[first] == "dev" and refused not in routes
    assert all(routes[prefix] == "throw" for prefix in before + after)


@pytest.mark.netns
def test_a_kernel_error_in_its_own_batch_raises_with_the_routes_before_it_in_place(routing: PyrouteRouting) -> None:
    ip("link", "set", DEVICE, "down")  # a `dev` route out of a device that is down: "Nexthop device is not up"
    before = {prefix_from_text(f"10.3.{index >> 8}.{index & 255}/32"): THROW for index in range(600)}
    before[prefix_from_text("fd00:3::/64")] = THROW
    failing = prefix_from_text("10.4.0.1/32")
    ops = [*(SetRoute(prefix, kind) for prefix, kind in before.items()), SetRoute(failing, WIREGUARD),
           *(SetRoute(prefix_from_text(f"10.5.0.{index}/32"), THROW) for index in range(5))]
    with pytest.raises(NetlinkError) as raised:
        routing.apply(ops)
    assert raised.value.code == errno.ENETDOWN
    assert "10.4.0.1/32" in str(raised.value) and "table 51820" in str(raised.value)
    shown = table_routes(51820)
    assert {prefix: shown[prefix] for prefix in map(ipaddress.ip_network, map(str, before))} == shown_as(before)
    assert ipaddress.ip_network("10.4.0.1/32") not in shown
    last = prefix_from_text("10.4.0.2/32")  # the failure is the batch's last message, the one asking for the ack
    with pytest.raises(NetlinkError, match="10.4.0.2/32"):
        routing.apply([SetRoute(prefix_from_text("10.5.1.1/32"), THROW), SetRoute(last, WIREGUARD)])
    assert ipaddress.ip_network("10.5.1.1/32") in table_routes(51820)
    # the applier's socket holds no stale acks: the next apply and read are exact
    ip("link", "set", DEVICE, "up")
    routing.apply([SetRoute(failing, WIREGUARD), DeleteRoute(prefix_from_text("10.3.0.0/32"))])
    routes = routing.read().routes
    assert routes[failing] == "dev" and prefix_from_text("10.3.0.0/32") not in routes
    assert len(routes) == 600 + 1 + 5 + 1


@pytest.mark.netns
def test_a_missing_device_stops_apply_after_the_routes_before_it(device: str) -> None:
    routing = PyrouteRouting(51820, "nosuchdev0", 98)
    try:
        throw = prefix_from_text("10.6.0.1/32")
        with pytest.raises(RuntimeError, match="no such device"):
            routing.apply([SetRoute(throw, THROW), SetRoute(prefix_from_text("10.6.0.2/32"), WIREGUARD)])
        assert table_routes(51820) == {ipaddress.ip_network("10.6.0.1/32"): ("throw", None)}
        assert routing.read().routes == {throw: "throw"}  # no device: nothing reads as `dev`
    finally:
        routing.close()


@pytest.mark.netns
def test_foreign_routes_read_as_foreign_and_are_replaced_or_deleted(routing: PyrouteRouting) -> None:
    table = ("table", "51820")
    ip("route", "add", "10.7.0.0/24", "via", "10.99.0.1", *table)  # a gateway
    ip("route", "add", "10.7.1.1/32", "dev", OTHER_DEVICE, *table)  # another device
    ip("route", "add", "blackhole", "10.7.1.2/32", "proto", "boot", *table)  # another type and protocol
    ip("route", "add", "10.7.1.3/32", "via", "inet6", "fe80::1", "dev", DEVICE, *table)  # RTA_VIA out of our device
    ip("route", "add", "10.7.1.4/32", *table, "nexthop", "via", "10.99.0.1", "nexthop", "via", "10.99.0.3")
    ip("nexthop", "add", "id", "7", "dev", DEVICE)
    ip("route", "add", "10.7.1.5/32", "nhid", "7", *table)  # a nexthop object (dumped with RTA_OIF of our device)
    ip("-6", "route", "add", "fd00:7::/64", "via", "fd99::1", *table)
    ip("-6", "route", "add", "fd00:7:1::1/128", "dev", OTHER_DEVICE, *table)
    foreign = [prefix_from_text(text) for text in ("10.7.0.0/24", "10.7.1.1/32", "10.7.1.2/32", "10.7.1.3/32",
                                                   "10.7.1.4/32", "10.7.1.5/32", "fd00:7::/64", "fd00:7:1::1/128")]
    ours = prefix_from_text("10.7.2.1/32")
    routing.apply([SetRoute(ours, WIREGUARD), AddRule(RuleSpec(4, 99, 0x100000, 0x100000, 51820, True))])
    assert routing.read().routes == {**{prefix: FOREIGN_ROUTE for prefix in foreign}, ours: "dev"}
    replaced = {prefix: WIREGUARD if index % 2 else THROW for index, prefix in enumerate(foreign[:-2])}
    routing.apply([*(SetRoute(prefix, kind) for prefix, kind in replaced.items()), DeleteRoute(foreign[-2]),
                   DeleteRoute(foreign[-1])])
    expected = {**replaced, ours: WIREGUARD}
    assert routing.read().routes == {prefix: kind.value for prefix, kind in expected.items()}
    assert table_routes(51820) == shown_as(expected)
    routing.flush()
    assert table_routes(51820) == {} and routing.read().rules == frozenset()
