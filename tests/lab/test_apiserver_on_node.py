"""A self-managed control plane: the API server served on node-1's IP (`up --apiserver-on node-1`), so the hooks reach
it across the fabric through addresses host encryption covers (AKS's managed API server is outside them; the other
lab modules serve it on loopback in each node). A node whose key its peers cannot know - reimaged, key file lost -
must still reach it and publish its new key: its requests leave in plaintext (its key was never held, so it keeps
out of the tunnel), and node-1 answers them in plaintext (replies follow the request) instead of into a tunnel under
the old key that the node can no longer decrypt.

One 3-node lab (the DaemonSet as bare processes: this module does not test it); facts are checked with independent
tools - the fabric capture, `wg show dump` in the nodes, ping between pods, `wgcni check`.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.lab.conftest import Cli, captured, lab_up
from wgcni_lab import lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

API_NODE = "node-1"
RECOVERED_WITHIN = 20.0  # seconds from the reimage (or restart) to every peer on the node's new key


@pytest.fixture(scope="module")
def cli(lab_parent, built):  # type: ignore[no-untyped-def]
    with lab_up(lab_parent / "apiserver-on-node", "--nodes", "3", "--pods-per-node", "1", "--apiserver-on", API_NODE,
                "--daemonset-runtime", "processes") as cli:
        yield cli


def public_key(cli: Cli, node: str) -> str:
    """The device's public key ("" while no hook serves a userspace device's UAPI socket)."""
    return cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "public-key", check=False).stdout.strip()


def keys_of_peers(cli: Cli, node: str) -> set[str]:
    lines = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout.splitlines()[1:]
    return {line.split("\t")[0] for line in lines}


def pods(cli: Cli) -> list[dict[str, Any]]:
    return [pod for pod in cli.json("status", "--json")["pods"] if not pod["host_network"]]


def pings(source: dict[str, Any], target: str) -> bool:
    return subprocess.run(["nsenter", f"--net={source['netns']}", "--", "ping", "-c", "1", "-W", "1", target],
                          capture_output=True).returncode == 0


def failures(cli: Cli, node: str) -> list[str]:
    return [line for line in cli.run("exec", node, "--", "wgcni", "check", check=False).stdout.splitlines()
            if line.startswith("FAIL")]


def api_traffic_is_encrypted(cli: Cli, node: str) -> None:
    """A pod added on `node` makes its hook write to the API server at node-1's IP: on the fabric that is WireGuard
    only, as is the ping that proves the new pod reachable."""
    with captured(cli) as packets:
        added = json.loads(cli.run("pod-add", node).stdout)
        source = next(pod for pod in pods(cli) if pod["node"] == API_NODE)
        wait_until(lambda: pings(source, added["ip"]), 10, f"the new pod on {node} reached from {API_NODE}")
    plaintext = only_wireguard_between_nodes(cli.state(), packets)
    assert packets and not plaintext, [(p["proto"], p["src"], p.get("sport"), p["dst"], p.get("dport"))
                                       for p in plaintext]
    cli.run("pod-del", added["name"])


def recovered(cli: Cli, node: str, old_key: str, since: float) -> float:
    """Seconds from `since` until every peer holds `node`'s new key (which only the API can have told them) and
    none the old one, every pod of `node` answers a ping from node-1, and `wgcni check` fails nowhere."""
    new_key = public_key(cli, node)
    assert new_key and new_key != old_key
    others = [other.name for other in cli.state().nodes if other.name != node]

    def everywhere() -> bool:
        return all(new_key in keys_of_peers(cli, other) and old_key not in keys_of_peers(cli, other)
                   for other in others)

    wait_until(everywhere, RECOVERED_WITHIN - (time.monotonic() - since), f"every peer on {node}'s new key",
               interval=0.2, detail=lambda: {other: sorted(keys_of_peers(cli, other)) for other in others})
    source = next(pod for pod in pods(cli) if pod["node"] == API_NODE) if node != API_NODE else next(
        pod for pod in pods(cli) if pod["node"] != node)
    for pod in [pod for pod in pods(cli) if pod["node"] == node]:
        wait_until(lambda pod=pod: pings(source, pod["ip"]), RECOVERED_WITHIN - (time.monotonic() - since),
                   f"{pod['name']} reached from {source['name']}")
    took = time.monotonic() - since
    wait_until(lambda: all(not failures(cli, name) for name in [node, *others]), 15, "wgcni check passing",
               detail=lambda: {name: failures(cli, name) for name in [node, *others]})
    return took


def test_the_hooks_reach_the_api_server_at_a_node_ip_through_the_tunnel(cli: Cli) -> None:
    api_ip = cli.state().node(API_NODE).ip
    kubeconfig = json.loads(cli.run("exec", "node-2", "--", "cat", str(lab.NODE_CONFIG_DIR / "kubeconfig")).stdout)
    assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://{api_ip}:{lab.API_PORT_IN_NODE}"
    for node in ("node-1", "node-2", "node-3"):
        assert not failures(cli, node), failures(cli, node)
    api_traffic_is_encrypted(cli, "node-2")


def test_a_reimaged_node_publishes_its_new_key_through_the_api_server_behind_a_peer(cli: Cli) -> None:
    old_key = public_key(cli, "node-2")
    cli.run("reimage", "node-2", timeout=180)
    returned = time.monotonic()
    took = recovered(cli, "node-2", old_key, returned)
    print(f"\nreimage of node-2 with the API server on {API_NODE}'s IP: new key on every peer and every pod "
          f"reachable {took:.2f} s after the command returned")
    api_traffic_is_encrypted(cli, "node-2")  # back in the tunnel once the new key is held


def test_a_node_that_lost_its_key_file_recovers_through_the_api_server_behind_a_peer(cli: Cli) -> None:
    """The key file is deleted and the hook killed: the restarted hook makes a new key while the device, its peers
    and the tunnel rule still hold the old one."""
    old_key = public_key(cli, "node-3")
    cli.run("exec", "node-3", "--", "rm", "/var/lib/wgcni/private.key")
    cli.run("hook", "node-3", "kill")
    killed = time.monotonic()
    wait_until(lambda: public_key(cli, "node-3") not in ("", old_key), RECOVERED_WITHIN,
               "node-3's hook restarted on a new key")
    took = recovered(cli, "node-3", old_key, killed)
    print(f"\nnode-3 lost its key file: new key on every peer and every pod reachable {took:.2f} s after the kill")
    api_traffic_is_encrypted(cli, "node-3")
