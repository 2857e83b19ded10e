"""Firewall applier: the hook's own nftables tables (`inet <table>`, `arp <table>`), replaced atomically.

What the tables do (rendered by `render_firewall`, which the fake shares):
- PREROUTING, after DNAT (priority dstnat + 1, so kube-proxy's NodePort/LoadBalancer DNAT has already chosen the
  endpoint): every packet that arrives on anything but lo, the WireGuard device or a pod veth gets the fwmark bit,
  so with `src_valid_mark=1` the reverse-path check of plaintext packets from the underlay (WireGuard's own UDP,
  nodes without a key, peers that have not programmed us yet) skips the hook's table and passes - unless the
  packet is forwarded into the tunnel (`fib daddr oifname <wg>`: its destination, as DNAT left it, routes to the
  WireGuard device). Such a packet keeps no mark, so rule `not fwmark M/M` sends it through the hook's table:
  a NodePort connection that kube-proxy forwards to a pod on another node crosses the VNet encrypted. Marking in
  the raw hook, before DNAT, cannot tell those apart, and the mark made them leave through eth0 in plaintext;
- replies follow their request (the same chain, and `reply-route` for the host's own replies, which the kernel
  routes again when the mark changes): a connection whose first packet arrived in plaintext from outside (not from
  the WireGuard device, lo or a pod) carries the fwmark bit in its conntrack mark, and its replies get the fwmark,
  so they leave by the main table in plaintext too, until a packet of it arrives through the tunnel (which clears the
  bit). A node whose key its peers do not hold yet (reimaged, key file lost) can only send in plaintext; without
  this, a peer's replies would go into the tunnel under the node's old key and be dropped - so a node that reaches
  the API server through an address host encryption covers could never publish its new key. Nothing is less
  encrypted than what was asked: the request itself came in plaintext. In enforcing strict mode only connections from
  addresses outside the tunnel get the bit (the strict table's `origin` chain): a WireGuard node's plaintext
  request gets no plaintext reply there, so the API server must be reached outside the encrypted set (`exempt`);
- ARP input (table `arp <table>`): the same mark on ARP requests. The kernel answers an ARP request only if a route
  lookup from the sender passes the reverse-path check; with host encryption the sender (a node IP) routes into
  the tunnel, so under strict rp_filter unmarked requests go unanswered and nodes on a shared L2 lose each other
  (Azure's fabric answers ARP itself, bare L2 networks and the netns tests do not);
- INPUT: the WireGuard UDP port is accepted;
- FORWARD: TCP SYNs leaving through the WireGuard device get their MSS clamped to the route MTU, so pods whose
  veths keep MTU 1500 open connections that fit the tunnel even where ICMP "fragmentation needed" is filtered.

- the strict-mode table `inet <table>-strict` (`render_strict`, docs/design.md "Strict mode"): in permissive mode
  its rules count the plaintext packets between WireGuard nodes, in strict mode they drop them too. It is kernel
  state: it outlives the hook process, and `apply()` keeps its named counters and the sets of the addresses hit
  most across re-applies (chains and the other sets are replaced in the same transaction). In strict mode the same
  table is also written to the spec's boot file, which the plugin (cni_plugin/strict.py) and the init container
  load at boot where the table is missing, so a rebooted node is fail-closed before the hook runs.

These three tables are the only nftables objects the hook touches; `delete()` removes them and nothing else. The nft
CLI is the supported interface to nftables (libnftables' Python binding is not on PyPI); one process per apply.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cni_plugin.files import write_atomically
from cni_plugin.strict import ADD_HOLD_PREFIX
from node_hook.addresses import IPNetwork
from node_hook.contracts import FirewallSpec, PlaintextCounters, StrictSpec

FAMILIES = ("inet", "arp")
DIRECTIONS = ("out", "in")
# Every chain and set of the strict table but the dynamic sets of addresses hit, which a re-apply keeps.
STRICT_CHAINS = ("origin", "forward", "output", "to-pod", "outbound", "plaintext-out4", "plaintext-out6",
                 "plaintext-in4", "plaintext-in6")
STRICT_SETS = tuple(f"{name}{family}" for name in ("cluster", "published", "allow", "exempt") for family in (4, 6))
HITS_SIZE = 1024  # addresses remembered per direction and family, each for HITS_TIMEOUT
HITS_TIMEOUT = "10m"
TOP_HITS = 5
_HITS_BLOCK = re.compile(r"\tset hits-[a-z]+[46] \{.*?\n\t\}\n\n?", re.DOTALL)


def render_firewall(spec: FirewallSpec) -> str:
    """The nftables ruleset text for `spec` (shared by the real applier and the fake): two tables, both named
    `spec.table`, one `inet` (IP packets) and one `arp` (ARP requests take the same reverse-path check)."""
    wireguard = spec.wireguard_interface
    exempt = [f'iifname "{wireguard}" return', 'iifname "lo" return']
    exempt += [f'iifname "{prefix}*" return' for prefix in spec.pod_interface_prefixes]
    body = "\n\t\t".join(exempt)
    bit = f"{spec.fwmark:#x}"
    mark = f"meta mark set meta mark | {bit}"
    plaintext_reply = f"ct direction reply ct mark & {bit} == {bit} {mark}"
    # Enforcing strict mode sets the bit itself, only for sources outside the tunnel (render_strict's `origin`).
    enforcing = spec.strict is not None and spec.strict.enforce
    remember_plaintext = "" if enforcing else f"\t\tct direction original ct mark set ct mark | {bit}\n"
    return (
        f"table inet {spec.table} {{\n"
        "\tchain mark-underlay {\n"
        "\t\ttype filter hook prerouting priority dstnat + 1; policy accept;\n"
        f"\t\t{plaintext_reply} return\n"
        f'\t\tiifname "{wireguard}" ct direction original ct mark set ct mark & {~spec.fwmark & 0xffffffff:#x}\n'
        f"\t\t{body}\n"
        f"{remember_plaintext}"
        f'\t\tfib daddr oifname "{wireguard}" return\n'
        f"\t\t{mark}\n"
        "\t}\n"
        "\tchain reply-route {\n"
        "\t\ttype route hook output priority mangle; policy accept;\n"
        f"\t\t{plaintext_reply}\n"
        "\t}\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter - 1; policy accept;\n"
        f"\t\tudp dport {spec.listen_port} accept\n"
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority mangle; policy accept;\n"
        f'\t\toifname "{wireguard}" tcp flags syn tcp option maxseg size set rt mtu\n'
        "\t}\n"
        "}\n"
        f"table arp {spec.table} {{\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        f"\t\t{body}\n"
        f"\t\t{mark}\n"
        "\t}\n"
        "}\n"
    )


def _elements(networks: Iterable[IPNetwork], version: int) -> str:
    chosen = sorted(str(network) for network in networks if network.version == version)
    return f"\t\telements = {{ {', '.join(chosen)} }}\n" if chosen else ""


def render_strict(spec: StrictSpec) -> str:
    """The strict table's text (shared by the real applier, the fake and the boot file)."""
    mark = f"{spec.fwmark:#x}"
    wg = f'"{spec.wireguard_interface}"'
    pods = [f'"{prefix}*"' for prefix in spec.pod_interface_prefixes]
    verdict = " drop" if spec.enforce else ""
    counted = "dropped" if spec.enforce else "plaintext"
    lines = [f"table inet {spec.table} {{"]
    for kind in ("dropped", "plaintext"):
        for direction in DIRECTIONS:
            lines.append(f"\tcounter {kind}-{direction} {{\n\t}}")
    for name, networks in (("cluster", spec.cluster), ("published", spec.published), ("allow", spec.allow),
                           ("exempt", spec.exempt)):
        for version in (4, 6):
            lines.append(f"\tset {name}{version} {{\n\t\ttype ipv{version}_addr\n\t\tflags interval\n"
                         f"\t\tauto-merge\n{_elements(networks, version)}\t}}")
    for direction in DIRECTIONS:
        for version in (4, 6):
            lines.append(f"\tset hits-{direction}{version} {{\n\t\ttype ipv{version}_addr\n\t\tsize {HITS_SIZE}\n"
                         f"\t\tflags dynamic,timeout\n\t\ttimeout {HITS_TIMEOUT}\n\t}}")

    def chain(name: str, hook: str | None, rules: list[str]) -> None:
        head = [f"\t\ttype filter hook {hook}; policy accept;"] if hook else []
        lines.append("\tchain " + name + " {\n" + "\n".join(head + [f"\t\t{rule}" for rule in rules]) + "\n\t}")

    skip_local = [f"iifname {wg} return", 'iifname "lo" return', *(f"iifname {pod} return" for pod in pods)]
    # A connection whose first packet came from the underlay in plaintext, from an address that does not route
    # into the tunnel (an outside client, an opted-out node): its replies may leave in plaintext.
    chain("origin", "prerouting priority dstnat + 2", [
        "ct state != new return", *skip_local, f"fib saddr oifname {wg} return",
        f"ct mark set ct mark | {mark}"])
    chain("forward", "forward priority filter - 5", [
        f"oifname {wg} return", *(f"oifname {pod} goto to-pod" for pod in pods), "jump outbound"])
    if spec.host:
        chain("output", "output priority filter - 5", [
            f"oifname {wg} return", 'oifname "lo" return', *(f"oifname {pod} return" for pod in pods),
            f"meta mark & {mark} == {mark} udp sport {spec.listen_port} return", "jump outbound"])
    # Plaintext into a local pod from an address a WireGuard node owns (it routes into the tunnel).
    chain("to-pod", None, [
        *skip_local, f"fib saddr oifname != {wg} return",
        "meta nfproto ipv4 goto plaintext-in4", "meta nfproto ipv6 goto plaintext-in6"])
    chain("outbound", None, [
        f"ct direction reply ct mark & {mark} == {mark} return",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } return",
        "ip daddr @allow4 return", "ip6 daddr @allow6 return", "ip daddr @exempt4 return", "ip6 daddr @exempt6 return",
        "ip daddr @cluster4 goto plaintext-out4", "ip daddr @published4 goto plaintext-out4",
        "ip6 daddr @cluster6 goto plaintext-out6", "ip6 daddr @published6 goto plaintext-out6"])
    for direction, field in (("out", "daddr"), ("in", "saddr")):
        for version, family in ((4, "ip"), (6, "ip6")):
            chain(f"plaintext-{direction}{version}", None, [
                f"counter name {counted}-{direction} update @hits-{direction}{version} "
                f"{{ {family} {field} counter }}{verdict}"])
    return "\n\n".join(lines) + "\n}\n"


def render_strict_boot(spec: StrictSpec) -> str:
    """The boot file: the strict table, loaded only where it is missing (`create` fails the whole transaction when
    the table exists, so a load racing the hook's never replaces the live table). Its first line, a comment to nft,
    tells the plugin how long ADD may wait for the publication (cni_plugin/strict.py reads it)."""
    return f"{ADD_HOLD_PREFIX}{spec.add_hold:g}\ncreate table inet {spec.table}\n{render_strict(spec)}"


def _strict_reset(spec: StrictSpec) -> str:
    """The transaction's head that empties the strict table but keeps its counters and the sets of addresses hit:
    every rule flushed, then our chains and other sets deleted (each added first, so a missing one is no error)."""
    table = f"inet {spec.table}"
    out = [f"add table {table}"]
    out += [f"add counter {table} {kind}-{direction}" for kind in ("dropped", "plaintext") for direction in DIRECTIONS]
    out.append(f"flush table {table}")
    out += [f"add chain {table} {name}\ndelete chain {table} {name}" for name in STRICT_CHAINS]
    out += [f"add set {table} {name} {{ type ipv{name[-1]}_addr; flags interval; }}\ndelete set {table} {name}"
            for name in STRICT_SETS]
    return "\n".join(out) + "\n"


def parse_counters(listing: dict[str, Any]) -> PlaintextCounters:
    """The counters and the hits of `nft -j list table inet <strict table>`."""
    dropped = dict.fromkeys(DIRECTIONS, 0)
    counted = dict.fromkeys(DIRECTIONS, 0)
    hits: dict[str, dict[str, int]] = {direction: {} for direction in DIRECTIONS}
    for item in listing.get("nftables", []):
        if "counter" in item:
            kind, _, direction = item["counter"]["name"].partition("-")
            if direction in DIRECTIONS:
                (dropped if kind == "dropped" else counted)[direction] = int(item["counter"].get("packets", 0))
        elif "set" in item and item["set"]["name"].startswith("hits-"):
            direction = item["set"]["name"][len("hits-"):-1]
            for element in item["set"].get("elem", []):
                value = element.get("elem", element) if isinstance(element, dict) else element
                if isinstance(value, dict) and direction in hits:
                    address = str(value.get("val"))
                    hits[direction][address] = int((value.get("counter") or {}).get("packets", 0))
    top = {direction: sorted(found.items(), key=lambda item: (-item[1], item[0]))[:TOP_HITS]
           for direction, found in hits.items()}
    return PlaintextCounters(dropped, counted, top)


class FirewallError(RuntimeError):
    pass


def strict_table_name(table: str) -> str:
    """The strict-mode table beside the hook's `table` (both in the `inet` family)."""
    return f"{table}-strict"


class NftFirewall:
    def __init__(self, table: str = "wgcni", nft: str = "nft", boot_file: Path | None = None) -> None:
        self.table = table
        self.strict_table = strict_table_name(table)
        self.nft = nft
        self.boot_file = boot_file  # what delete() removes besides the tables

    def _run(self, args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.nft, *args], input=script, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise FirewallError(f"{self.nft} not found: install nftables") from None

    def _list(self, *args: str) -> str | None:
        """`nft [options] list table FAMILY NAME`'s output (args end with the family and name), None without it."""
        command = [*args[:-2], "list", "table", *args[-2:]]
        result = self._run(command)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise FirewallError(f"nft {' '.join(command)}: {result.stderr.strip()}")
        return result.stdout

    def read(self) -> str | None:
        listings = []
        for family in FAMILIES:
            listing = self._list(family, self.table)
            if listing is None:
                return None
            listings.append(listing)
        strict = self._list("-s", "inet", self.strict_table)
        return "".join(listings) + (_HITS_BLOCK.sub("", strict) if strict is not None else "")

    def apply(self, spec: FirewallSpec) -> str:
        # One transaction: create-if-missing, delete, recreate. Never a moment without the marks rules; the strict
        # table's chains and sets are replaced in the same transaction, its counters and hits kept.
        reset = "".join(f"table {family} {spec.table} {{}}\ndelete table {family} {spec.table}\n"
                        for family in FAMILIES)
        script = reset + render_firewall(spec)
        if spec.strict is not None:
            script += _strict_reset(spec.strict) + render_strict(spec.strict)
        result = self._run(["-f", "-"], script)
        if result.returncode != 0:
            raise FirewallError(f"nft -f: {result.stderr.strip()}")
        if spec.strict is not None and spec.strict.boot_file:
            self._keep_boot_file(spec.strict)
        listing = self.read()
        if listing is None:
            raise FirewallError(f"tables {self.table} missing right after they were applied")
        return listing

    @staticmethod
    def _keep_boot_file(spec: StrictSpec) -> None:
        path = Path(spec.boot_file)
        if spec.enforce:
            text = render_strict_boot(spec).encode()
            try:
                if path.read_bytes() == text:
                    return
            except FileNotFoundError:
                pass
            write_atomically(path, text, 0o600, temporary_prefix=".strict-tmp.", create_directory=True)
        else:
            path.unlink(missing_ok=True)

    def counters(self) -> PlaintextCounters | None:
        listing = self._list("-j", "inet", self.strict_table)
        if listing is None:
            return None
        try:
            return parse_counters(json.loads(listing))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise FirewallError(f"nft -j list table inet {self.strict_table}: unreadable ({error})") from None

    def delete(self) -> None:
        for family, table in (*((family, self.table) for family in FAMILIES), ("inet", self.strict_table)):
            result = self._run(["delete", "table", family, table])
            if result.returncode != 0 and "No such file or directory" not in result.stderr:
                raise FirewallError(f"nft delete table {family} {table}: {result.stderr.strip()}")
        if self.boot_file is not None:
            self.boot_file.unlink(missing_ok=True)
