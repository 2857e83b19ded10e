"""What AKS does to a node's pods that the first lab never did, on the lab's Azure fabric (which delivers plaintext to
any pod IP, as Azure's does): a pod without a pod record - every pod that runs when wgcni is installed, CoreDNS
among them - keeps every connection, encrypted; `wgcni pods` and `wgcni check` say it has no record.

Facts come from pings between pods, the fabric capture (WireGuard only between the nodes) and the node's own
`wgcni` CLI. One lab (2 nodes x 1 pod) for the module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.lab.conftest import Cli, captured, force_down
from tests.support.polling import wait_until
from wgcni_lab.wire import only_wireguard_between_nodes

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]


@pytest.fixture(scope="module")
def cli(lab_parent, built) -> Iterator[Cli]:  # type: ignore[no-untyped-def]
    cli = Cli(lab_parent / "running")
    try:
        cli.run("up", "--nodes", "2", "--pods-per-node", "1", timeout=300)
        yield cli
    finally:
        force_down(cli)


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
