"""Addresses as the hook's keys (pure): one packed int per address or prefix, parsed once and shared everywhere.

Every address is ONE object, its host prefix packed into an int (`_PackedIPv4Network`, `_PackedIPv6Network`): the
address's key in every dict and set of the model, its route's prefix and - wherever it does not aggregate - its
AllowedIP, all at once. Inputs are parsed into these keys once (`host_keys`, `prefix_keys`, `prefix_from_text`,
`prefix_of_packed`), so the records, the remote nodes, the claims, the peers' AllowedIPs, the routes and this node's
publication share one object per address; `aggregate` turns keys into the fewest prefixes that cover exactly them
(the peers' AllowedIPs and the published `podIPPrefixes`), `address_texts` prints them, `packed_prefix` hands
netlink and UAPI the bytes they write.

A packed prefix is an `ipaddress` network too (equal to, hashing like and ordering like the stdlib network of the
same prefix), so prefixes read back from a device or table mix with the model's in sets, dicts and sorts. Raw
address values (`address_value`: an IPv4 address is its value, an IPv6 address its value plus 2**128, so the
families never collide) are only used to build and aggregate keys.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Iterator
from socket import AF_INET, AF_INET6, inet_pton
from typing import TypeGuard, cast

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V6 = 1 << 128


def address_value(text: str) -> int:
    """The raw value of a textual address (as strict as `ipaddress.ip_address` - no leading zeros - and without the
    zone it would accept: pod and node IPs never have one). Raises OSError for anything else."""
    if ":" in text:
        return int.from_bytes(inet_pton(AF_INET6, text), "big") | _V6
    return int.from_bytes(inet_pton(AF_INET, text), "big")


def _value_of(address: IPAddress) -> int:
    return int(address) | _V6 if address.version == 6 else int(address)


# Every prefix the model hands out is ONE int, `address ^ netmask + 2**61-1 * (1 + order)`, where `order` packs
# (IPv6?, network address, prefix length) as `ipaddress` sorts networks. CPython hashes a non-negative int as its
# value modulo the prime 2**61 - 1, so this int hashes - in C, like any int - exactly as the equal `ipaddress`
# network does (`hash(int(network_address) ^ int(netmask))`), compares as int in network order, and decodes back
# to (address, prefix length). An int is far smaller than an `ipaddress` network object (docs/benchmarks.md, P3);
# hashing, equality, sorting and every set and dict operation on the model's prefixes run in C.
_HASH_MODULUS = (1 << 61) - 1  # sys.hash_info.modulus of 64-bit CPython (checked at import below)
_V6_SHIFT = 68  # the order of an IPv6 prefix is shifted past `address ^ netmask` (< 2**128) // modulus (< 2**67)
_V6_FLAG = 1 << 136  # in the order: IPv6 prefixes after every IPv4 one, as ipaddress's (version, ...) ordering
_MASKS = {bits: tuple(((1 << length) - 1) << (bits - length) for length in range(bits + 1)) for bits in (32, 128)}
_MASKS4, _MASKS6 = _MASKS[32], _MASKS[128]
_ADDRESS6 = (1 << 128) - 1


class _PackedNetwork(int):
    """Base of the two packed prefix classes: an int (its identity, hash, equality and ordering) that is also the
    `ipaddress` network it subclasses. The stdlib network's methods read `network_address`, `netmask` and
    `_prefixlen`, decoded here on demand; where `int` would come first in the method order (text, formatting,
    pickling) the network's behaviour is restored. A packed prefix equals the stdlib network of the same prefix both
    ways (`int.__eq__` answers NotImplemented, so the stdlib's `__eq__` decides), hashes like it and orders like it
    (packed against packed in C, against a stdlib network through the stdlib's comparison), so both mix in sets,
    dicts and sorts. Never pass one where an int address is expected (`ipaddress.ip_network(prefix)` reads the int)."""

    __slots__ = ()
    _stdlib: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
    _max_prefixlen: int

    def __new__(cls, address: object, strict: bool = True) -> _PackedNetwork:
        """Parses anything the stdlib network accepts (its own methods, e.g. `supernet()`, build prefixes so)."""
        network = cls._stdlib(address, strict)
        return cls._of(int(network.network_address), network.prefixlen)

    def __init__(self, address: object = None, strict: bool = True) -> None:
        """Nothing to set up: the int's value is the whole state."""

    @classmethod
    def _of(cls, network_address: int, prefixlen: int) -> _PackedNetwork:
        raise NotImplementedError

    def _decoded(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def network_address(self) -> IPAddress:
        return self._address_class(self._decoded()[0])  # type: ignore[attr-defined]

    @property
    def _prefixlen(self) -> int:
        return self._decoded()[1]

    @property
    def netmask(self) -> IPAddress:
        return self._make_netmask(self._decoded()[1])[0]  # type: ignore[attr-defined]

    def hosts(self):  # type: ignore[no-untyped-def]
        prefixlen = self._decoded()[1]
        if prefixlen == self._max_prefixlen:  # what the stdlib's __init__ sets up for a host prefix
            return [self.network_address]
        if prefixlen == self._max_prefixlen - 1:  # /31 and /127: both addresses (RFC 3021)
            return iter(self)  # type: ignore[call-overload]
        return self._stdlib.hosts(self)  # type: ignore[arg-type]  # self is also the family's network

    def __str__(self) -> str:
        address, prefixlen = self._decoded()
        return f"{self._address_class(address)}/{prefixlen}"  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{self._stdlib.__name__}({str(self)!r})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __reduce__ = ipaddress._IPAddressBase.__reduce__


# The decoded properties return the family's address at run time; _PackedNetwork types them for both families.
class _PackedIPv4Network(_PackedNetwork, ipaddress.IPv4Network):  # type: ignore[misc]
    """An IPv4 prefix as one int: `address ^ netmask + 2**61-1 * (1 + (address << 8 | prefixlen))`."""

    __slots__ = ()
    _stdlib = ipaddress.IPv4Network

    @classmethod
    def _of(cls, network_address: int, prefixlen: int) -> _PackedIPv4Network:
        return int.__new__(cls, (network_address ^ _MASKS4[prefixlen])
                           + _HASH_MODULUS * (1 + (network_address << 8 | prefixlen)))

    def _decoded(self) -> tuple[int, int]:
        order = self // _HASH_MODULUS - 1  # `address ^ netmask` < 2**32 is the remainder
        return order >> 8, order & 0xFF


class _PackedIPv6Network(_PackedNetwork, ipaddress.IPv6Network):  # type: ignore[misc]  # as IPv4's
    """An IPv6 prefix as one int: `address ^ netmask + 2**61-1 * (1 + (2**136 | address << 8 | prefixlen) << 68)`."""

    __slots__ = ()
    _stdlib = ipaddress.IPv6Network

    @classmethod
    def _of(cls, network_address: int, prefixlen: int) -> _PackedIPv6Network:
        return int.__new__(cls, (network_address ^ _MASKS6[prefixlen])
                           + _HASH_MODULUS * ((1 + (_V6_FLAG | network_address << 8 | prefixlen)) << _V6_SHIFT))

    def _decoded(self) -> tuple[int, int]:
        order = (self // _HASH_MODULUS >> _V6_SHIFT) - 1
        return order >> 8 & _ADDRESS6, order & 0xFF


_PackedKey = _PackedIPv4Network | _PackedIPv6Network  # what every key of the model is

assert sys.hash_info.modulus == _HASH_MODULUS, "packed prefixes need CPython's 64-bit int hash"


def prefix_order(prefix: IPNetwork) -> IPNetwork:
    """Sort key of any prefix, packed or stdlib, in `ipaddress` order with IPv4 before IPv6: the packed prefix
    itself (compared as int, in C, nothing allocated), a packed copy of a stdlib one. The planner sorts the model's
    prefixes without a key at all; this is for lists that may hold prefixes read back from a device or table."""
    if isinstance(prefix, _PackedNetwork):
        return prefix
    return _network(int(prefix.network_address) | (_V6 if prefix.version == 6 else 0), prefix.prefixlen)


def prefix_of_order(value: int) -> IPNetwork:
    """The prefix whose `prefix_order()` is the int `value` (a plain int crosses a pipe or a file in C; this
    turns it back into the prefix)."""
    if value < _PACKED_V6_FLOOR:
        return int.__new__(_PackedIPv4Network, value)
    return int.__new__(_PackedIPv6Network, value)


def packed_prefix(prefix: IPNetwork) -> tuple[bytes, int]:
    """(network address in network byte order, prefix length) of any prefix, as UAPI and netlink write them; for a
    packed prefix decoded once, without building an IPv4Address (programming 1.25 M AllowedIPs, bench/p3b_uapi.py)."""
    if type(prefix) is _PackedIPv4Network:  # `_decoded()` inlined: this runs once per AllowedIP programmed
        order = prefix // _HASH_MODULUS - 1
        return (order >> 8).to_bytes(4, "big"), order & 0xFF
    if type(prefix) is _PackedIPv6Network:
        address, prefixlen = prefix._decoded()
        return address.to_bytes(16, "big"), prefixlen
    return prefix.network_address.packed, prefix.prefixlen


def prefix_of_packed(address: bytes, prefixlen: int) -> IPNetwork:
    """The inverse of `packed_prefix`: the model's prefix of a network address in network byte order (4 bytes IPv4,
    16 IPv6) and a prefix length, without going through text (reading back a table of 1.25 M routes). Strict like
    `prefix_from_text`: ValueError for another address size, a length out of range or host bits set."""
    value = int.from_bytes(address, "big")
    masks = _MASKS4 if len(address) == 4 else _MASKS6 if len(address) == 16 else None
    if masks is None or not 0 <= prefixlen < len(masks) or value & ~masks[prefixlen]:
        raise ValueError(f"{address.hex()}/{prefixlen} is not an IP prefix")
    return (_PackedIPv4Network if len(address) == 4 else _PackedIPv6Network)._of(value, prefixlen)


def _network(key: int, prefixlen: int) -> IPNetwork:
    """The prefix of `prefixlen` bits starting at raw address value `key`, which must be aligned (as `aggregate`
    cuts them)."""
    return _PackedIPv6Network._of(key ^ _V6, prefixlen) if key >= _V6 else _PackedIPv4Network._of(key, prefixlen)


def prefix_from_text(text: str) -> IPNetwork:
    """`10.0.0.0/28` (or a bare address) as the model's prefix object: 4x cheaper than `ipaddress.ip_network`, which
    dominated reading back a device with 1 M AllowedIPs. Strict: host bits must be zero. Raises ValueError."""
    address, slash, length = text.partition("/")
    try:
        value = address_value(address)
        bits = 128 if value >= _V6 else 32
        prefixlen = int(length) if slash else bits
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IP prefix") from None
    if not 0 <= prefixlen <= bits or value & ((1 << (bits - prefixlen)) - 1):
        raise ValueError(f"{text!r} is not an IP prefix (length out of range or host bits set)")
    return _network(value, prefixlen)


def _host_network(value: int) -> IPNetwork:
    return _network(value, 128 if value >= _V6 else 32)


def address_key(text: str) -> IPNetwork:
    """The model's key of a textual address: its packed host prefix. Raises OSError for anything but an address."""
    return _host_network(address_value(text))


def host_prefix(address: IPAddress) -> IPNetwork:
    """The key of an `ipaddress` address: its packed host prefix."""
    return _host_network(_value_of(address))


# Packed IPv6 prefixes are the ints from here up; every packed IPv4 prefix is below 2**102.
_PACKED_V6_FLOOR = _HASH_MODULUS * ((1 + _V6_FLAG) << _V6_SHIFT)
# The packed host prefixes of consecutive addresses differ by exactly this (`address ^ netmask` falls by one, the
# order rises by one address): runs of adjacent addresses are found on the keys themselves, without decoding them.
_STEP4 = _HASH_MODULUS * 256 - 1
_STEP6 = _HASH_MODULUS * (256 << _V6_SHIFT) - 1


def _key_value(key: IPNetwork) -> int:
    """The raw address value of a key (a packed host prefix)."""
    packed = cast(_PackedKey, key)
    if packed < _PACKED_V6_FLOOR:
        return (packed // _HASH_MODULUS - 1) >> 8
    return packed._decoded()[0] | _V6


def outside(keys: Iterable[IPNetwork], networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The host keys of `keys` that lie in none of `networks`. Host keys order as ints in address order (IPv4 before
    IPv6), so each network is the int range from its first to its last address's key: plain int comparisons, about
    a tenth of a microsecond a key instead of a microsecond-sized `subnet_of` (strict mode at 5 000 x 250)."""
    bounds = [(int(cast(_PackedKey, host_prefix(network.network_address))),
               int(cast(_PackedKey, host_prefix(network.broadcast_address)))) for network in networks]
    packed = cast(Iterable[_PackedKey], keys)
    if len(bounds) == 1:
        low, high = bounds[0]
        return [key for key in packed if not low <= key <= high]
    return [key for key in packed if not any(low <= key <= high for low, high in bounds)]


def address_of(key: IPNetwork) -> IPAddress:
    """The `ipaddress` address a key stands for."""
    value = _key_value(key)
    return ipaddress.IPv6Address(value ^ _V6) if value >= _V6 else ipaddress.IPv4Address(value)


def _is_key(value: object) -> TypeGuard[_PackedKey]:
    """Whether `value` already is a key: a packed host prefix."""
    if type(value) is _PackedIPv4Network:
        return (value // _HASH_MODULUS - 1) & 0xFF == 32
    return type(value) is _PackedIPv6Network and value._decoded()[1] == 128


def host_keys(values: Iterable[object], what: str) -> frozenset[IPNetwork]:
    """The keys of `values` - textual addresses, `ipaddress` addresses or host prefixes - as a frozenset; `values`
    itself when it already is a frozenset of keys (a RemoteNode built from another's sets parses nothing again).
    Raises ValueError naming the first value that is not an IP address."""
    if isinstance(values, frozenset) and all(map(_is_key, values)):
        return values
    keys = set()
    for value in values:
        try:
            if isinstance(value, str):
                keys.add(address_key(value))
            elif isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                keys.add(host_prefix(value))
            elif _is_key(value):
                keys.add(value)
            elif isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)) \
                    and value.prefixlen == value.max_prefixlen:
                keys.add(host_prefix(value.network_address))
            else:
                raise TypeError
        except (OSError, TypeError):
            raise ValueError(f"{what}: {value!r} is not an IP address") from None
    return frozenset(keys)


def prefix_keys(text: str, limit: int) -> list[IPNetwork]:
    """The keys of every address of the prefix `text` (strict, as `prefix_from_text`); ValueError when it is
    malformed or covers more than `limit` addresses. A host prefix - every published prefix with scattered pod
    IPs - is its own key."""
    prefix = prefix_from_text(text)
    if _is_key(prefix):
        return [prefix]
    size = prefix.num_addresses
    if size > limit:
        raise ValueError(f"{text} covers more than {limit} addresses")
    first = _value_of(prefix.network_address)
    return [_host_network(first + offset) for offset in range(size)]


def address_texts(keys: Iterable[IPNetwork]) -> list[str]:
    """The addresses of keys as text, IPv4 first, each family in address order (for status and the CLI)."""
    return [str(address_of(key)) for key in sorted(keys)]


def aggregate(keys: Iterable[IPNetwork]) -> Iterator[IPNetwork]:
    """The fewest aligned prefixes that cover exactly the addresses of `keys`, never one address more, in address
    order, IPv4 first (what `ipaddress.collapse_addresses` computes per family): runs of consecutive addresses cut
    into aligned powers of two. The peers' AllowedIPs and the published `podIPPrefixes` are both this. An address
    alone - every one of them with scattered pod IPs - is its own key, handed back as is (no equal copy in the
    peer's AllowedIPs)."""
    ordered = sorted(cast(Iterable[_PackedKey], keys))  # keys sort in address order, IPv4 first
    count = len(ordered)
    index = 0
    while index < count:
        first = last = ordered[index]
        step = _STEP4 if first < _PACKED_V6_FLOOR else _STEP6
        index += 1
        while index < count and ordered[index] == last + step:
            last = ordered[index]
            index += 1
        if first is last:
            yield first
            continue
        base, bits = (_V6, 128) if step == _STEP6 else (0, 32)
        start, end = _key_value(first) - base, _key_value(last) - base
        while start <= end:
            size = start & -start if start else 1 << bits
            while size > end - start + 1:
                size >>= 1
            yield _network(base + start, bits + 1 - size.bit_length())
            start += size
