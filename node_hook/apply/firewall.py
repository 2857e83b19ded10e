"""Firewall applier: the hook's own nftables table (`inet <table>`), replaced atomically with `nft -f`.

What the table does (rendered by `render_firewall`, shared with the fake):
- raw PREROUTING: every packet that arrives on anything but lo, the WireGuard device or a pod veth gets the fwmark
  bit, so with `src_valid_mark=1` the reverse-path check of plaintext packets from the underlay (WireGuard's own
  UDP, nodes without a key, peers that have not programmed us yet) skips the hook's table and passes;
- INPUT: the WireGuard UDP port is accepted;
- FORWARD: TCP SYNs leaving through the WireGuard device get their MSS clamped to the route MTU, so pods whose
  veths keep MTU 1500 open connections that fit the tunnel even where ICMP "fragmentation needed" is filtered.

The table is the only nftables object the hook touches; `delete()` removes it and nothing else. The nft CLI is the
supported interface to nftables (libnftables' Python binding is not on PyPI); one process per apply.
"""

from __future__ import annotations

import subprocess

from node_hook.apply.dataplane import FirewallSpec
from node_hook.apply.fakes import render_firewall


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
        result = self._run(["list", "table", "inet", self.table])
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise FirewallError(f"nft list table inet {self.table}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, spec: FirewallSpec) -> str:
        # One transaction: create-if-missing, delete, recreate. Never a moment without the marks rule.
        script = f"table inet {spec.table} {{}}\ndelete table inet {spec.table}\n{render_firewall(spec)}"
        result = self._run(["-f", "-"], script)
        if result.returncode != 0:
            raise FirewallError(f"nft -f: {result.stderr.strip()}")
        listing = self.read()
        if listing is None:
            raise FirewallError(f"table inet {spec.table} missing right after it was applied")
        return listing

    def delete(self) -> None:
        result = self._run(["delete", "table", "inet", self.table])
        if result.returncode != 0 and "No such file or directory" not in result.stderr:
            raise FirewallError(f"nft delete table inet {self.table}: {result.stderr.strip()}")
