"""Fixtures for the kernel WireGuard backend tests (marker kernel_wg; they run inside the VM tier)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.kernel_wg import ip, require_kernel_wireguard, unique_name


@pytest.fixture
def kernel_wireguard() -> None:
    """Use in every kernel_wg test: skips on a host without kernel WireGuard, fails in a VM without it."""
    require_kernel_wireguard()


@pytest.fixture
def wg_ifname():
    """A fresh wireguard interface name; whatever link has that name is removed afterwards."""
    name = unique_name("wgk")
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def netns():
    """A network namespace created for the test and removed afterwards (with everything inside it)."""
    created: list[str] = []

    def make() -> str:
        name = unique_name("wgkns")
        ip("netns", "add", name)
        created.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
