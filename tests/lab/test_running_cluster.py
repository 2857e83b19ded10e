"""What AKS does to a node's pods that the first lab never did, on the lab's Azure fabric (which delivers plaintext to
any pod IP, as Azure's does): a pod without a pod record - every pod that runs when wgcni is installed, CoreDNS
among them - keeps every connection, encrypted; `wgcni pods` and `wgcni check` say it has no record. A node whose
writes the API refuses (RBAC, the admission policy) keeps its pods reachable, in plaintext, and says why; once its
writes pass it is every node's peer.

Facts come from pings between pods, the fabric capture (WireGuard only between the nodes) and the node's own
`wgcni` CLI. One lab (2 nodes x 1 pod, a third added by the test) for the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import Cli, captured, lab_up
from wgcni_lab import lab
from wgcni_lab.harness.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    # The DaemonSet as bare processes: this module does not test it (test_daemonset_image.py, test_lifecycle.py do)
    with lab_up(lab_parent / "running", "--nodes", "2", "--pods-per-node", "1",
                "--daemonset-runtime", "processes") as cli:
        yield cli


def pod_on(cli: Cli, node: str) -> dict[str, Any]:
    return next(pod for pod in cli.json("status", "--json")["pods"] if pod["node"] == node)


def node_pods(cli: Cli, node: str) -> list[dict[str, Any]]:
    return json.loads(cli.run("exec", node, "--", "wgcni", "pods", "--json").stdout)


def ping(cli: Cli, source: str, target_ip: str) -> bool:
    return cli.run("exec", source, "--", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target_ip,
                   check=False).returncode == 0


def test_a_pod_whose_record_is_gone_keeps_every_connection_encrypted(cli: Cli) -> None:
    local, remote = pod_on(cli, "node-1"), pod_on(cli, "node-2")
    node = cli.state().node("node-1")
    (record,) = Path(node.root, "var/lib/wgcni/pods/azure").glob(f"{local['id']}@*.json")
    record.rename(record.with_name(f".moved-away-{record.name}"))  # what a pod from before the install has: none
    wait_until(lambda: [pod["sources"] for pod in node_pods(cli, "node-1")] == [["route"]], 30,
               "the hook to know the pod from its route only")

    with captured(cli) as packets:
        there = ping(cli, local["name"], remote["ip"])
        back = ping(cli, remote["name"], local["ip"])

    assert there and back, "a pod without a record lost its cross-node traffic"
    assert packets and only_wireguard_between_nodes(cli.state(), packets) == []
    check = cli.run("exec", "node-1", "--", "wgcni", "check", check=False)
    assert check.returncode == 1 and f"1 pod(s) have no pod record: {local['ip']}" in check.stdout
    table = cli.run("exec", "node-1", "--", "wgcni", "pods").stdout
    assert "route only" in table and local["ip"] in table


FETCH = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:9820" + sys.argv[1], timeout=5) as answer:
        print(answer.status, answer.read().decode().strip())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode().strip())
"""


def fetch(cli: Cli, node: str, path: str) -> tuple[int, str]:
    code, _, body = cli.run("exec", node, "--", sys.executable, "-c", FETCH, path).stdout.strip().partition(" ")
    return int(code), body


def peer_endpoints(cli: Cli, node: str) -> set[str]:
    lines = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "endpoints").stdout.splitlines()
    return {line.split("\t")[1].rsplit(":", 1)[0] for line in lines if "\t" in line}


def publication(cli: Cli, node: str) -> dict[str, Any]:
    return json.loads(cli.run("exec", node, "--", "wgcni", "status", "--json").stdout)["publication"]


def test_a_node_whose_writes_are_refused_keeps_its_pods_reachable_and_says_why(cli: Cli) -> None:
    """RBAC or the admission policy refuses a new node's writes: it is nobody's peer, so it must not send into the
    tunnel; its pods reach and are reached in plaintext (what the default mode does; strict mode would drop), and
    it says why. Once the API takes its writes it becomes every node's peer and the traffic is encrypted."""
    cli.run("api", "deny", "node-3")
    added = json.loads(cli.run("node-add", timeout=180).stdout)
    assert added["node"] == "node-3"
    pod = json.loads(cli.run("pod-add", "node-3").stdout)
    remote = pod_on(cli, "node-1")
    node_3_ip = cli.state().node("node-3").ip
    wait_until(lambda: publication(cli, "node-3")["state"] == "denied", 30, "node-3 to see its writes refused")

    with captured(cli) as packets:
        there = ping(cli, pod["name"], remote["ip"])
        back = ping(cli, remote["name"], pod["ip"])

    assert there and back, "a node that cannot publish cut its pods off"
    assert node_3_ip not in peer_endpoints(cli, "node-1")
    assert any(packet["proto"] == "icmp" and packet["src"] == pod["ip"] for packet in packets), \
        "its pods reach other nodes in plaintext until it is published"
    state = publication(cli, "node-3")
    assert state["tunnel"] is False and "API error 403" in state["message"]
    check = cli.run("exec", "node-3", "--", "wgcni", "check", check=False)
    assert check.returncode == 1 and "publication: this node's publication is denied" in check.stdout
    code, body = fetch(cli, "node-3", "/readyz")
    assert code == 503 and body.startswith("publication denied")
    metrics = fetch(cli, "node-3", "/metrics")[1]
    assert 'wgcni_publication{state="denied"} 1.0' in metrics

    cli.run("api", "allow", "node-3")
    wait_until(lambda: publication(cli, "node-3")["state"] == "confirmed"
               and node_3_ip in peer_endpoints(cli, "node-1"), 30, "node-3 to be published and peered")
    with captured(cli) as packets:
        there = ping(cli, pod["name"], remote["ip"])
    assert there and packets and only_wireguard_between_nodes(cli.state(), packets) == []
    assert fetch(cli, "node-3", "/readyz")[0] == 200


def test_host_network_pods_and_nodes_reach_remote_pods_and_nodes_encrypted(cli: Cli) -> None:
    """With host encryption, what leaves a node's own network namespace (a hostNetwork pod, the node itself) to a
    pod or node elsewhere goes through the tunnel, and the replies pass the reverse-path check on the way back."""
    host_pod = json.loads(cli.run("pod-add", "node-1", "--host-network").stdout)
    remote = pod_on(cli, "node-2")
    node_2_ip = cli.state().node("node-2").ip
    with captured(cli) as packets:
        to_pod = ping(cli, host_pod["name"], remote["ip"])
        to_node = ping(cli, "node-1", node_2_ip)
        from_pod = ping(cli, remote["name"], host_pod["ip"])
    assert to_pod and to_node and from_pod
    assert packets and only_wireguard_between_nodes(cli.state(), packets) == []
    cli.run("pod-del", host_pod["name"])


def test_an_operator_uses_kubectl_and_a_nodes_hook_follows_its_opt_out_label(cli: Cli, tmp_path: Path) -> None:
    """The real kubectl with `wgcni-lab kubeconfig`: the nodes and their WireguardNodes with the CRD's columns, and
    `kubectl label node ... wgcni.io/wireguard=disabled`, which that node's hook follows (it publishes no key, so
    peers reach it in plaintext) until the label is removed."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(cli.run("kubeconfig").stdout)

    def kubectl(*args: str) -> str:
        result = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "--kubeconfig", str(kubeconfig),
                                 *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    nodes = [line.split() for line in kubectl("get", "nodes").splitlines()[1:]]
    assert [(node[0], node[1]) for node in nodes][:2] == [("node-1", "Ready"), ("node-2", "Ready")]
    header, *rows = kubectl("get", "wireguardnodes").splitlines()
    assert header.split()[:3] == ["NAME", "KEY", "ENCRYPTION"]
    assert {row.split()[0]: row.split()[2] for row in rows}["node-2"] == "WireGuard"
    assert "Name:               node-1" in kubectl("describe", "node", "node-1")
    applied = kubectl("apply", "-k", str(lab.REPO / "conf")).splitlines()  # the lab applied crd.yaml and rbac.yaml
    assert "daemonset.apps/wgcni-node created" in applied and "configmap/wgcni-config created" in applied
    assert "clusterrole.rbac.authorization.k8s.io/wgcni-node configured" in applied

    def encryption(node: str) -> str:
        return kubectl("get", "wgn", node, "-o", "jsonpath={.status.encryption}")

    assert kubectl("label", "node", "node-2", "wgcni.io/wireguard=disabled").strip() == "node/node-2 labeled"
    wait_until(lambda: encryption("node-2") == "OptedOut" and publication(cli, "node-2")["state"] == "opted-out",
               30, "node-2's hook to follow the opt-out label")
    assert kubectl("get", "node", "node-2", "-o", "jsonpath={.metadata.annotations}").find("wgcni.io/public-key") < 0
    kubectl("label", "node", "node-2", "wgcni.io/wireguard-")
    wait_until(lambda: encryption("node-2") == "WireGuard" and publication(cli, "node-2")["state"] == "confirmed",
               30, "node-2's hook to publish its key again")
