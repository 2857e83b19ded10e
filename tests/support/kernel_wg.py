"""Test helper: gate tests on kernel WireGuard (skip on hosts without it; fail inside the VM tier, where it must be)."""

from __future__ import annotations

import functools
import os
import secrets
import subprocess

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from node_hook.apply.wg_kernel import WireGuardSocket

# Set by tests/vm/kernel_vm.py inside the VM: there a missing wireguard family is a broken VM, not a reason to skip.
REQUIRE_ENV = "WGCNI_REQUIRE_KERNEL_WG"


@functools.cache
def _available() -> bool:
    """Whether the kernel's WireGuard answers: its generic netlink family resolves (which autoloads the module). An
    independent probe: the daemon's own `auto` choice (`node_hook.detect.kernel_wireguard_available`) looks for the
    module's files instead."""
    try:
        probe = WireGuardSocket()
    except (NetlinkError, OSError):
        return False
    probe.close()
    return True


def require_kernel_wireguard() -> None:
    """Skip the calling test (or fixture) unless kernel WireGuard is usable here; in the VM tier, fail instead."""
    if _available():
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail("the wireguard generic netlink family is missing inside the VM tier (module not loaded?)")
    pytest.skip("no kernel WireGuard on this host (runs in the VM tier: make test-vm)")


# Parameters for a fixture that runs the same dataplane tests on both WireGuard backends: the kernel variant carries
# the kernel_wg marker (so the VM tier selects it) and must call `require_kernel_wireguard()` before building.
BACKEND_PARAMS = ["userspace", pytest.param("kernel", marks=pytest.mark.kernel_wg)]


def unique_name(prefix: str) -> str:
    """An interface or namespace name unique to this run (interface names stay within 15 characters)."""
    return f"{prefix}{secrets.token_hex(4)}"[:15]


def ip(*args: str) -> str:
    """Run iproute2's `ip` (an independent view of the kernel state) and return its output."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout
