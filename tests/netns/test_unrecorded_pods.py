"""A pod without a pod record, as every pod that runs when wgcni is installed: the real hook learns it from
azure-vnet's host route through netlink (no rescan, no notification), treats it as local, publishes it, says so in
`diagnose`, and forgets it when the pod's interface goes. Checked on the kernel's table, the hook's announcement
file and pings both ways."""

from __future__ import annotations

import json

import pytest

from wgcni_lab.harness.netns import in_ns
from wgcni_lab.harness.netns_lab import Lab, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": ["10.240.0.12"], "b": ["10.240.0.70"]}


def announced_pod_ips(lab: Lab, name: str) -> set[str]:
    return set(json.loads(lab.nodes[name].announce_file.read_text())["podIPs"])


def no_record_rescans(lab: Lab) -> None:
    for node in lab.nodes.values():
        lab.write_config(node, recordRescanInterval=3600)


def test_a_pod_without_a_record_is_learned_from_its_route_and_published() -> None:
    with running_lab(NODES, PODS, no_record_rescans) as lab:
        node = lab.nodes["a"]
        pod = lab.add_pod(node, "10.240.0.13", record=False)
        # no rescan within the test: only the netlink route event can make it known this fast
        wait_until(lambda: "10.240.0.13" in announced_pod_ips(lab, "a"), 3, "the route-learned pod to be published")
        table = node.exec("ip", "route", "show", "table", str(node.api("status")["routeTable"])).stdout
        assert "throw 10.240.0.13 " in table
        (learned,) = [entry for entry in node.api("pods")["pods"] if entry["sources"] == ["route"]]
        assert learned["ips"] == ["10.240.0.13"] and learned["hostInterface"] == pod.host_veth
        (finding,) = [entry for entry in node.api("diagnose")["findings"] if entry["check"] == "records"]
        assert "1 pod(s) have no pod record: 10.240.0.13" in finding["message"]
        lab.sync_peers()
        lab.wait_converged()
        (remote,) = lab.nodes["b"].pods.values()
        assert in_ns(pod.netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", remote.ip, check=False).returncode == 0
        assert in_ns(remote.netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", pod.ip, check=False).returncode == 0
        node.exec("ip", "link", "del", pod.host_veth)  # the pod goes (IPv4 sends no RTM_DELROUTE for it)
        wait_until(lambda: "10.240.0.13" not in announced_pod_ips(lab, "a"), 3, "the pod to be forgotten")
