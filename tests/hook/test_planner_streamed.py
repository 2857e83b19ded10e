"""The streamed diffs of a full resync (planner.plan_peers_streamed, plan_routes_counted, plan_routes_streamed) plan
exactly what the diffs of a materialised read-back plan, whatever order the read-back comes in; and the reconciler
finds missing routes with a second read."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from node_hook.addresses import prefix_from_text
from node_hook.contracts import FOREIGN_ROUTE, PeerState
from node_hook.model import DesiredPeer, RouteKind
from node_hook.planner import (
    plan_peers,
    plan_peers_streamed,
    plan_routes,
    plan_routes_counted,
    plan_routes_streamed,
)
from tests.hook.test_reconciler import Node

KINDS = [RouteKind.WIREGUARD, RouteKind.THROW]
HAVE = [RouteKind.WIREGUARD._value_, RouteKind.THROW._value_, FOREIGN_ROUTE]


def prefix(index: int) -> object:
    if index % 7 == 3:
        return prefix_from_text(f"fd00::{index:x}/128")
    return prefix_from_text(f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}/32")


tables = st.lists(st.tuples(st.integers(0, 400), st.sampled_from([None, *HAVE]), st.sampled_from(KINDS + [None])),
                  max_size=120)


def split(rows: list[tuple[int, str | None, RouteKind | None]]) -> tuple[dict, dict]:
    desired, actual = {}, {}
    for index, have, want in rows:
        if want is not None:
            desired[prefix(index)] = want
        if have is not None:
            actual[prefix(index)] = have
    return desired, actual


@settings(max_examples=300, deadline=None)
@given(tables, st.randoms(use_true_random=False))
def test_streamed_route_diffs_equal_the_materialised_one_in_any_order(rows, shuffle) -> None:
    desired, actual = split(rows)
    expected_deletes, expected_sets = plan_routes(desired, actual, desired.keys() | actual.keys())
    in_order = sorted(actual.items())
    shuffled = list(actual.items())
    shuffle.shuffle(shuffled)
    for stream in (in_order, shuffled):
        deletes, sets, kinds = plan_routes_streamed(desired, iter(stream))
        assert (deletes, list(sets)) == (expected_deletes, list(expected_sets))
        assert kinds == {op.prefix: actual[op.prefix] for op in deletes}
        counted = plan_routes_counted(desired, iter(stream))
        if desired.keys() <= actual.keys():
            assert counted is not None
            assert (counted[0], list(counted[1]), counted[2]) == (deletes, list(sets), kinds)
        else:
            assert counted is None, "a missing route is never taken for an empty diff"


def test_counted_diff_takes_a_prefix_dumped_twice_in_a_row_once() -> None:
    one, two = prefix(1), prefix(2)
    desired = {one: RouteKind.WIREGUARD, two: RouteKind.WIREGUARD}
    dumped = [(one, RouteKind.WIREGUARD._value_), (one, FOREIGN_ROUTE)]  # two routes of one prefix, other metrics
    assert plan_routes_counted(desired, iter(dumped)) is None, "two is missing, one does not count twice"
    deletes, sets, _ = plan_routes_counted(desired, iter([*dumped, (two, RouteKind.WIREGUARD._value_)]))
    assert deletes == [] and [op.prefix for op in sets] == [one]


peer_sets = st.dictionaries(st.sampled_from([f"{c * 43}=" for c in "ABCDEFGH"]),
                            st.tuples(st.frozensets(st.integers(0, 40), max_size=8),
                                      st.frozensets(st.integers(0, 40), max_size=8), st.booleans(), st.booleans()),
                            max_size=8)


@settings(max_examples=300, deadline=None)
@given(peer_sets, st.randoms(use_true_random=False))
def test_streamed_peer_diff_equals_the_materialised_one_in_any_order(peers, shuffle) -> None:
    desired, actual = {}, {}
    for key, (wanted, held, want_it, have_it) in peers.items():
        if want_it:
            desired[key] = DesiredPeer("node", key, ("10.0.0.1", 51820), frozenset(map(prefix, wanted)), 0)
        if have_it:
            actual[key] = PeerState(key, ("10.0.0.1", 51820), frozenset(map(prefix, held)), 0)
    stream = list(actual.values())
    shuffle.shuffle(stream)
    assert plan_peers_streamed(desired, iter(stream)) == plan_peers(desired, actual)


def test_a_resync_finds_deleted_routes_with_a_second_read_and_restores_them(tmp_path) -> None:
    node = Node(tmp_path)
    node.populate()
    assert node.reconciler.reconcile().error is None
    wanted = dict(node.routing.routes)
    gone = random.Random(7).sample(sorted(wanted), 2)
    for key in gone:
        del node.routing.routes[key]
    node.routing.routes[prefix(999)] = FOREIGN_ROUTE
    node.routing.calls.clear()
    node.reconciler.mark_out_of_sync()
    result = node.reconciler.reconcile()
    assert result.error is None and result.applied["route_sets"] == 2 and result.applied["route_deletes"] == 1
    assert node.routing.calls.count("read") == 2, "the count showed missing routes: the table is read a second time"
    node.assert_converged()
    node.routing.calls.clear()
    node.reconciler.mark_out_of_sync()
    assert node.reconciler.reconcile().applied == {}
    assert node.routing.calls.count("read") == 1, "nothing missing: one read"
