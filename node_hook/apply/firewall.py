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
- ARP input (table `arp <table>`): the same mark on ARP requests. The kernel answers an ARP request only if a route
  lookup from the sender passes the reverse-path check; with host encryption the sender (a node IP) routes into
  the tunnel, so under strict rp_filter unmarked requests go unanswered and nodes on a shared L2 lose each other
  (Azure's fabric answers ARP itself, bare L2 networks and the netns tests do not);
- INPUT: the WireGuard UDP port is accepted;
- FORWARD: TCP SYNs leaving through the WireGuard device get their MSS clamped to the route MTU, so pods whose
  veths keep MTU 1500 open connections that fit the tunnel even where ICMP "fragmentation needed" is filtered.

These two tables are the only nftables objects the hook touches; `delete()` removes them and nothing else. The nft CLI
is the
supported interface to nftables (libnftables' Python binding is not on PyPI); one process per apply.
"""

from __future__ import annotations

import subprocess

from node_hook.contracts import FirewallSpec

FAMILIES = ("inet", "arp")


def render_firewall(spec: FirewallSpec) -> str:
    """The nftables ruleset text for `spec` (shared by the real applier and the fake): two tables, both named
    `spec.table`, one `inet` (IP packets) and one `arp` (ARP requests take the same reverse-path check)."""
    exempt = [f'iifname "{spec.wireguard_interface}" return', 'iifname "lo" return']
    exempt += [f'iifname "{prefix}*" return' for prefix in spec.pod_interface_prefixes]
    body = "\n\t\t".join(exempt)
    mark = f"meta mark set meta mark | {spec.fwmark:#x}"
    return (
        f"table inet {spec.table} {{\n"
        "\tchain mark-underlay {\n"
        "\t\ttype filter hook prerouting priority dstnat + 1; policy accept;\n"
        f"\t\t{body}\n"
        f'\t\tfib daddr oifname "{spec.wireguard_interface}" return\n'
        f"\t\t{mark}\n"
        "\t}\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter - 1; policy accept;\n"
        f"\t\tudp dport {spec.listen_port} accept\n"
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority mangle; policy accept;\n"
        f'\t\toifname "{spec.wireguard_interface}" tcp flags syn tcp option maxseg size set rt mtu\n'
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


class FirewallError(RuntimeError):
    pass


class NftFirewall:
    def __init__(self, table: str = "wgcni", nft: str = "nft") -> None:
        self.table = table
        self.nft = nft

    def _run(self, args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.nft, *args], input=script, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise FirewallError(f"{self.nft} not found: install nftables") from None

    def read(self) -> str | None:
        listings = []
        for family in FAMILIES:
            result = self._run(["list", "table", family, self.table])
            if result.returncode != 0:
                if "No such file or directory" in result.stderr:
                    return None
                raise FirewallError(f"nft list table {family} {self.table}: {result.stderr.strip()}")
            listings.append(result.stdout)
        return "".join(listings)

    def apply(self, spec: FirewallSpec) -> str:
        # One transaction: create-if-missing, delete, recreate. Never a moment without the marks rules.
        reset = "".join(f"table {family} {spec.table} {{}}\ndelete table {family} {spec.table}\n"
                        for family in FAMILIES)
        result = self._run(["-f", "-"], reset + render_firewall(spec))
        if result.returncode != 0:
            raise FirewallError(f"nft -f: {result.stderr.strip()}")
        listing = self.read()
        if listing is None:
            raise FirewallError(f"tables {self.table} missing right after they were applied")
        return listing

    def delete(self) -> None:
        for family in FAMILIES:
            result = self._run(["delete", "table", family, self.table])
            if result.returncode != 0 and "No such file or directory" not in result.stderr:
                raise FirewallError(f"nft delete table {family} {self.table}: {result.stderr.strip()}")
