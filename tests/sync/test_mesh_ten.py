"""Ten simulated AKS nodes synced only through the test Kubernetes API server (the slower sibling of
test_mesh.py): the full mesh converges to exactly the truth, cross-node traffic is encrypted on the wire, and
pod churn across many nodes under a restart and a cut watch converges again."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from tests.sync.mesh import Mesh, programmed_everywhere, running_mesh
from tests.sync.test_mesh import CONVERGE, Capture, converge
from wgcni_lab.harness.polling import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.runtime, pytest.mark.slow]

NODES = 10


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with running_mesh([f"node-{index}" for index in range(NODES)], 60) as mesh:
        yield mesh


def test_ten_node_mesh_is_exact_encrypted_and_survives_churn_with_faults(mesh):
    nodes = list(mesh.nodes.values())
    pods = [mesh.run_pod(node, f"p{slot}-{node.name}") for node in nodes for slot in range(2)]
    converge(mesh, "ten-node mesh")
    source = pods[0]
    targets = [pod for pod in pods if pod.node is not source.node][::2]
    with Capture(mesh, "icmp") as capture:
        for target in targets:
            assert source.ping(target.ip), f"{source.name} -> {target.name}"
    pod_ips = {pod.ip for pod in pods}
    assert not [line for line in capture.packets if any(ip in line for ip in pod_ips)], capture.packets[:5]

    for node in nodes[:5]:
        mesh.delete_pod(next(iter(node.pods.values())))
    mesh.server.restart(downtime=0.5)
    for node in nodes[5:]:
        mesh.run_pod(node, f"late-{node.name}")
    mesh.server.cut_watches()
    converge(mesh, "ten-node mesh after churn with a restart and a cut watch")


def test_a_pod_added_on_one_node_reaches_the_nine_others(mesh):
    """Correctness only: how fast is measured in bench/ (P2, P5)."""
    source, others = mesh.nodes["node-0"], [node for name, node in mesh.nodes.items() if name != "node-0"]
    key = mesh.keys()["node-0"]
    for index in range(3):
        pod = mesh.run_pod(source, f"conv-{index}")
        wait_until(functools.partial(programmed_everywhere, others, key, pod.ip), CONVERGE,
                   "AllowedIP and route on nine nodes", interval=0.01)
        mesh.delete_pod(pod)
