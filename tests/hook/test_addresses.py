"""The address module's packed prefixes (one int each, hashed in C) behave exactly like `ipaddress` networks -
equality and hash both ways, text, formatting, ordering, pickling -, its address keys round-trip, and its
aggregation is exact and minimal."""

from __future__ import annotations

import copy
import ipaddress
import itertools
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_hook.addresses import (
    _V6,
    _network,
    address_key,
    address_of,
    aggregate,
    host_keys,
    host_prefix,
    packed_prefix,
    prefix_from_text,
    prefix_of_packed,
    prefix_order,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.tuples(st.just(4), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.tuples(st.just(6), st.integers(0, 2**128 - 1), st.integers(0, 128)),
))
def test_fast_prefixes_equal_the_stdlib_ones(case: tuple[int, int, int]) -> None:
    version, value, length = case
    kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    reference = kind((value, length), strict=False)
    key = int(reference.network_address) | (_V6 if version == 6 else 0)
    ours = _network(key, length)
    assert ours == reference and reference == ours and hash(ours) == hash(reference)
    assert str(ours) == str(reference) and ours.prefixlen == reference.prefixlen
    assert {ours: 1}[reference] == 1 and reference in frozenset({ours})
    assert list(itertools.islice(ours.hosts(), 3)) == list(itertools.islice(reference.hosts(), 3))
    assert ours.broadcast_address == reference.broadcast_address
    if length:
        assert ours.supernet() == reference.supernet()
    assert ours.subnet_of(reference) and reference.subnet_of(ours)
    assert f"{ours}" == f"{reference}" and repr(ours) == repr(reference)
    assert ours.with_prefixlen == reference.with_prefixlen
    assert ours.network_address == reference.network_address and ours.netmask == reference.netmask
    assert pickle.loads(pickle.dumps(ours)) == reference and copy.deepcopy(ours) == reference
    assert prefix_order(ours) is ours and prefix_order(reference) == ours


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=2, max_size=6, unique=True))
def test_packed_prefixes_are_distinct_and_ordered_like_the_stdlib_ones(cases: list[tuple[int, int]]) -> None:
    references = {ipaddress.IPv4Network(case, strict=False) for case in cases}
    ours = {_network(int(reference.network_address), reference.prefixlen) for reference in references}
    assert len(ours) == len(references) and ours == references
    assert sorted(ours) == sorted(references) and sorted(ours, key=prefix_order) == sorted(references)
    mixed = sorted(references)[::2] + sorted(ours)[1::2]
    assert sorted(mixed, key=prefix_order) == sorted(references) == sorted(mixed)
    assert _network(0, 32) != _network(_V6, 128) and _network(0, 0) != _network(_V6, 0)
    assert sorted([_network(_V6, 0), _network(0, 32), _network(0, 0)], key=prefix_order) == [
        ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/0")]


@pytest.mark.parametrize("text", ["10.240.0.70", "0.0.0.0", "255.255.255.255", "fd00::5", "::", "::ffff:1.2.3.4"])
def test_address_keys_round_trip_and_never_collide_across_families(text: str) -> None:
    address = ipaddress.ip_address(text)
    assert address_key(text) == host_prefix(address) and address_of(address_key(text)) == address
    assert (address_key(text) >= _V6) == (address.version == 6)


@pytest.mark.parametrize("text", ["10.240.0.070", "10.240.0", " 10.0.0.1", "", "fd00::/64", "10.0.0.256"])
def test_textual_addresses_are_as_strict_as_ipaddress(text: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        host_keys([text], "test")
    with pytest.raises(ValueError):
        ipaddress.ip_address(text)


def test_scoped_addresses_are_refused() -> None:
    """Stricter than `ipaddress` (which accepts a zone): a pod or node IP never carries one."""
    with pytest.raises(ValueError, match="is not an IP address"):
        host_keys(["fe80::1%eth0"], "test")


@pytest.mark.parametrize("text", ["10.0.0.1/32", "10.0.0.0/28", "0.0.0.0/0", "10.0.0.9", "fd00::/64", "fd00::5/128",
                                  "::/0"])
def test_prefix_from_text_equals_ip_network(text: str) -> None:
    ours = prefix_from_text(text)
    assert ours == ipaddress.ip_network(text) and hash(ours) == hash(ipaddress.ip_network(text))


@pytest.mark.parametrize("text", ["10.0.0.1/28", "10.0.0.0/33", "fd00::1/64", "fd00::/129", "x/1", "10.0.0.0/-1",
                                  "10.0.0.0/", "/32"])
def test_prefix_from_text_refuses_what_ip_network_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not an IP prefix"):
        prefix_from_text(text)
    with pytest.raises(ValueError):
        ipaddress.ip_network(text)


@pytest.mark.parametrize("text", ["10.0.0.1/32", "10.0.0.0/28", "0.0.0.0/0", "fd00::5/128", "fd00::/64", "::/0"])
def test_packed_prefix_gives_the_wire_form_of_packed_and_stdlib_prefixes(text: str) -> None:
    reference = ipaddress.ip_network(text)
    wire = (reference.network_address.packed, reference.prefixlen)
    assert packed_prefix(prefix_from_text(text)) == wire and packed_prefix(reference) == wire


def test_prefix_of_packed_inverts_packed_prefix() -> None:
    for text in ("10.1.2.0/24", "0.0.0.0/0", "10.1.2.3/32", "fd00::/64", "::/0", "fd00::1/128", "255.255.255.255/32"):
        prefix = prefix_from_text(text)
        decoded = prefix_of_packed(*packed_prefix(prefix))
        assert decoded == prefix == ipaddress.ip_network(text) and type(decoded) is type(prefix)
        assert hash(decoded) == hash(ipaddress.ip_network(text))
    for address, prefixlen in ((b"\x0a\x01\x02\x03", 24), (bytes(4), 33), (bytes(5), 8), (bytes(16), -1)):
        with pytest.raises(ValueError, match="is not an IP prefix"):
            prefix_of_packed(address, prefixlen)


def test_aggregate_is_exact_and_minimal() -> None:
    keys = host_keys([f"10.240.0.{i}" for i in (4, 5, 6, 7, 9)] + ["fd00::1"], "test")
    assert list(aggregate(keys)) == [ipaddress.ip_network(text) for text in ("10.240.0.4/30", "10.240.0.9/32",
                                                                             "fd00::1/128")]
    assert list(aggregate(frozenset())) == []


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=511), max_size=80))
def test_aggregate_covers_exactly_the_addresses(offsets: set[int]) -> None:
    base = int(ipaddress.ip_address("10.240.0.0"))
    ips = {ipaddress.ip_address(base + offset) for offset in offsets}
    prefixes = frozenset(aggregate(host_keys(ips, "test")))
    assert prefixes == frozenset(ipaddress.collapse_addresses(ips))  # the library's answer
    v6 = {ipaddress.ip_address(f"fd00::{offset:x}") for offset in offsets}
    assert frozenset(aggregate(host_keys(v6, "test"))) == frozenset(ipaddress.collapse_addresses(v6))
    covered = {address for prefix in prefixes for address in prefix}
    assert covered == ips
    # minimal: no two prefixes are siblings that could merge into their parent
    for prefix in prefixes:
        if prefix.prefixlen:
            parent = prefix.supernet()
            assert not all(sub in prefixes for sub in parent.subnets())


def test_outside_keeps_exactly_the_keys_in_no_network() -> None:
    from node_hook.addresses import outside

    texts = ["10.0.0.0", "10.0.0.255", "10.0.1.0", "9.255.255.255", "10.1.0.0", "fd00::1", "fd00:0:0:1::", "::1"]
    keys = host_keys(texts, "test")
    for networks in ([], ["10.0.0.0/24"], ["10.0.0.0/24", "fd00::/64"], ["0.0.0.0/0"], ["::/0", "10.0.0.0/8"]):
        parsed = [ipaddress.ip_network(text) for text in networks]
        expected = sorted(key for key in keys
                          if not any(key.version == net.version and key.subnet_of(net) for net in parsed))
        assert sorted(outside(keys, parsed)) == expected, networks
