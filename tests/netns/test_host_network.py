"""Two nodes with host encryption OFF: host-network pods and pods still talk both ways (Calico #9751: replies from
host-network pods dropped as "unallowed src"), and restarting a hook keeps the same key and the traffic flowing.

Why #9751 happens: with host encryption off the request from a pod to a host-network pod (a node IP) leaves in
plaintext, but the reply (node IP -> pod IP) matches the pod's /32 in the table and goes through the tunnel with
the node IP as source; a receiver whose peer entry lacks the node IP drops it. In wgcni that reply follows its
request in plaintext (the firewall's conntrack bit; the VNet delivers pod IPs as Azure does), and a host-network
pod's own request to a pod goes through the tunnel with the node IP as source, which the peer accepts: wgcni always
lists a peer's node IPs in its AllowedIPs (sources it accepts) while routing to them through the tunnel only with
host encryption on, and sets loose rp_filter on the WireGuard device.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.kernel_wg import BACKEND_PARAMS, require_kernel_wireguard
from wgcni_lab.harness.netns import PYTHON, in_ns
from wgcni_lab.harness.netns_lab import Lab, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

ECHO_SERVER = """
import socket
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 5202)); server.listen(4); print("ready", flush=True)
for _ in range(4):
    connection, peer = server.accept()
    connection.sendall(connection.recv(100) + f" from {peer[0]}".encode()); connection.close()
"""

ECHO_CLIENT = """
import socket, sys
connection = socket.create_connection((sys.argv[1], 5202), timeout=5)
connection.sendall(b"hello"); print(connection.recv(200).decode())
"""


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if request.param == "kernel":
        require_kernel_wireguard()
    with running_lab({"a": "10.240.0.4", "b": "10.240.0.35"}, {"a": ["10.240.0.70"], "b": ["10.240.0.71"]},
                     host_encryption=False, backend=request.param) as lab:
        yield lab


def echo(server_netns: str, client_netns: str, target: str) -> str:
    server = subprocess.Popen(["ip", "netns", "exec", server_netns, PYTHON, "-c", ECHO_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return in_ns(client_netns, PYTHON, "-c", ECHO_CLIENT, target).stdout.strip()
    finally:
        server.kill()
        server.wait()


def test_node_ips_are_allowed_sources_but_not_routed(lab: Lab) -> None:
    a = lab.nodes["a"]
    allowed = a.exec("wg", "show", a.wg, "allowed-ips").stdout
    assert "10.240.0.35/32" in allowed and "10.240.0.71/32" in allowed
    assert "10.240.0.35" not in a.exec("ip", "route", "show", "table", "51820").stdout
    assert a.api("status")["hostEncryption"] is False


def test_pod_to_host_network_pod_reply_comes_back(lab: Lab) -> None:
    pod_a = lab.nodes["a"].pods["pod1"]
    # the server is a host-network pod on b: it runs in b's own namespace and answers from the node IP
    assert echo(lab.nodes["b"].netns, pod_a.netns, "10.240.0.35") == "hello from 10.240.0.70"


def test_host_network_pod_to_pod_reply_comes_back(lab: Lab) -> None:
    pod_a = lab.nodes["a"].pods["pod1"]
    assert echo(pod_a.netns, lab.nodes["b"].netns, "10.240.0.70") == "hello from 10.240.0.35"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_hook_restart_keeps_the_key_the_device_and_the_traffic(lab: Lab, how: str) -> None:
    """A rollout restart (SIGTERM) and a killed container (SIGKILL: the hook's process dies without a word) both keep
    the key and cut no traffic: the device is the kernel's (or a wireguard-go outside the hook's process)."""
    a = lab.nodes["a"]
    pod_a, pod_b = a.pods["pod1"], lab.nodes["b"].pods["pod2"]
    key = a.exec("wg", "show", a.wg, "public-key").stdout.strip()
    pinger = subprocess.Popen(["ip", "netns", "exec", pod_a.netns, "ping", "-c", "30", "-i", "0.1", "-W", "1",
                               pod_b.ip], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    a.stop_hook() if how == "SIGTERM" else a.kill_hook()
    lab.start_hook(a)
    output = pinger.communicate(timeout=30)[0]
    assert " 0% packet loss" in output, output  # the device (wireguard-go or kernel) kept serving without a hook
    assert a.exec("wg", "show", a.wg, "public-key").stdout.strip() == key
    wait_until(lambda: a.api("status")["dataplane_programmed"], 10, what="restarted hook in sync")
