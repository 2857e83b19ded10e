"""The pod host routes of a real main table (node_hook.pod_routes.KernelPodRoutes), in a namespace the test enters
(the `netns` fixture): azure-vnet's `<pod IP>/32 dev azv<hash>` routes are found, everything else in the table is not,
and a deleted pod interface takes its IPs with it."""

from __future__ import annotations

import pytest

from node_hook.pod_routes import KernelPodRoutes
from wgcni_lab.harness.netns import Namespaces, sh

pytestmark = pytest.mark.netns


def test_pod_host_routes_are_read_by_interface(netns: str) -> None:
    with Namespaces() as namespaces:
        pod = namespaces.add_unique("podrt")
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "uplink", "netns", pod)
        sh("ip", "link", "set", "eth0", "up")
        sh("ip", "addr", "add", "10.240.0.4/16", "dev", "eth0")
        sh("ip", "link", "add", "azv0123456789a", "type", "veth", "peer", "name", "eth0", "netns", pod)
        sh("ip", "link", "set", "azv0123456789a", "up")
        sh("ip", "route", "add", "10.240.0.5/32", "dev", "azv0123456789a")
        sh("ip", "route", "add", "10.240.0.6/32", "dev", "azv0123456789a")
        sh("ip", "route", "add", "10.240.0.7/32", "dev", "eth0")  # not a pod interface
        sh("ip", "route", "add", "10.241.0.0/24", "dev", "azv0123456789a")  # not a host route
        sh("ip", "route", "add", "10.240.0.8/32", "dev", "azv0123456789a", "table", "100")  # not the main table
        source = KernelPodRoutes(("azv",))
        try:
            assert source.read() == {"azv0123456789a": frozenset({"10.240.0.5", "10.240.0.6"})}
            other = KernelPodRoutes(("veth",))
            assert other.read() == {}
            other.close()
            sh("ip", "link", "del", "azv0123456789a")
            assert source.read() == {}
        finally:
            source.close()
