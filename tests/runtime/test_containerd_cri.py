"""The built plugin under containerd's CRI plugin, driven over CRI exactly as kubelet drives it on AKS.

One private containerd (in its own network and mount namespace) serves the whole module; the conflist is
shaped like AKS's (`"name": "azure"`, cniVersion 0.3.0, ptp + host-local standing in for azure-vnet, then
wgcni, then portmap with portMappings and snat) and is run again at 1.0.0. A journaling wrapper records every
plugin invocation, and a fake node hook receives the plugin's notifications.
"""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runtime.helpers import (
    NETWORK,
    Journal,
    aks_shaped_conflist,
    journaling_plugin,
    plugin_settings,
    record_path,
)
from wgcni_lab.containerd import Containerd, link_cni_plugins, write_conflist
from wgcni_lab.cri import CriError, PortMapping
from wgcni_lab.harness.fake_hook import FakeHook
from wgcni_lab.harness.netns import Namespaces

pytestmark = [pytest.mark.runtime, pytest.mark.netns]

POD_SUBNET = "10.244.1.0/24"
CONCURRENT_PODS = 6


@dataclass
class CriNode:
    containerd: Containerd
    journal: Journal
    settings: dict
    hook: FakeHook

    def use_conflist(self, conflist: dict) -> None:
        """Install the conflist and wait until containerd's CNI library has loaded exactly it."""
        write_conflist(self.containerd.cni_conf_dir, conflist)
        wanted = conflist["cniVersion"], [plugin["type"] for plugin in conflist["plugins"]]

        def loaded_it(config: dict) -> bool:
            for network in config.get("Networks") or []:
                loaded = network["Config"]
                types = [plugin["Network"]["type"] for plugin in loaded["Plugins"]]
                if loaded["Name"] == conflist["name"] and (loaded["CNIVersion"], types) == wanted:
                    sources = [json.loads(plugin["Source"]) for plugin in loaded["Plugins"]]
                    return sources == conflist["plugins"]
            return False

        self.containerd.wait_cni_config(loaded_it)

    def record(self, container_id: str) -> dict | None:
        path = record_path(self.settings, container_id)
        return json.loads(path.read_text()) if path.exists() else None

    def records(self) -> set[str]:
        directory = Path(self.settings["stateDir"]) / "pods" / NETWORK
        return {path.name for path in directory.glob("*.json")} if directory.exists() else set()


@pytest.fixture(scope="module")
def cri_node(module_tmp: Path, plugin_binary: Path) -> Iterator[CriNode]:
    with Namespaces() as namespaces:
        containerd = Containerd(module_tmp / "ctrd", name="rt", netns=namespaces.add_unique("wgcni-rt-node"))
        settings = plugin_settings(module_tmp)
        hook = FakeHook(settings["hookSocket"], settings["stateDir"])
        try:
            journal = Journal(module_tmp / "journal.jsonl")
            wrapper = journaling_plugin(module_tmp / "wrapper", plugin_binary, journal.path)
            link_cni_plugins(containerd.cni_bin_dir, {"wgcni": wrapper})
            hook.start()
            containerd.start()
            yield CriNode(containerd, journal, settings, hook)
        finally:
            try:
                containerd.stop()
            finally:
                hook.stop()


@pytest.fixture(params=["0.3.0", "1.0.0"])
def aks_node(request: pytest.FixtureRequest, cri_node: CriNode) -> Iterator[CriNode]:
    cri_node.use_conflist(aks_shaped_conflist(request.param, cri_node.settings, POD_SUBNET))
    yield cri_node
    for sandbox in cri_node.containerd.cri.list_pod_sandboxes():  # a failed test's pods: keep the next test clean
        cri_node.containerd.stop_pod(sandbox.id)


def test_run_pod_sandbox_records_the_pod_and_stop_remove_delete_it(aks_node: CriNode) -> None:
    node, cri = aks_node, aks_node.containerd.cri
    cni_version = json.loads(next(node.containerd.cni_conf_dir.glob("*.conflist")).read_text())["cniVersion"]
    uid = str(uuid.uuid4())

    pod = node.containerd.run_pod("web-0", "shop", uid, port_mappings=[PortMapping(8080, 30080)])

    record = node.record(pod.id)
    assert record is not None, "RunPodSandbox completed but wgcni wrote no record"
    assert {key: record[key] for key in ("network", "containerID", "ifname", "netns", "ips", "cniVersion")} == {
        "network": NETWORK,
        "containerID": pod.id,
        "ifname": "eth0",
        "netns": pod.netns_path,
        "ips": [pod.ip],
        "cniVersion": cni_version,
    }
    assert (record["podNamespace"], record["podName"], record["podUID"]) == ("shop", "web-0", uid)
    assert stat.S_IMODE(record_path(node.settings, pod.id).stat().st_mode) == 0o600
    [add] = node.journal.entries(pod.id)
    assert (add["command"], add["exit"], add["prevResult"]) == ("ADD", 0, True)
    assert add["runtimeConfig"] is None, "wgcni declares no capabilities, so it must get no runtimeConfig"
    assert json.loads(add["stdout"])["ips"][0]["address"].startswith(f"{pod.ip}/")
    assert node.hook.programmed[(NETWORK, pod.id, "eth0")] == [pod.ip]

    cri.stop_pod_sandbox(pod.id)

    assert node.record(pod.id) is None
    add, first_del = node.journal.entries(pod.id)
    assert (first_del["command"], first_del["exit"], first_del["netns"]) == ("DEL", 0, pod.netns_path)
    # libcni replays the cached result as prevResult on DEL from cniVersion 0.4.0 on, never under 0.3.x
    assert first_del["prevResult"] is (cni_version != "0.3.0")
    assert (NETWORK, pod.id, "eth0") not in node.hook.programmed

    cri.remove_pod_sandbox(pod.id)

    _, _, second_del = node.journal.entries(pod.id)
    assert (second_del["command"], second_del["exit"]) == ("DEL", 0), second_del["stdout"]
    assert (second_del["netns"], second_del["prevResult"]) == ("", False)
    assert node.record(pod.id) is None
    assert pod.id not in {sandbox.id for sandbox in cri.list_pod_sandboxes()}


def test_concurrent_pods_get_exact_records(aks_node: CriNode) -> None:
    node = aks_node
    names = [f"batch-{index}" for index in range(CONCURRENT_PODS)]
    with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
        pods = list(pool.map(lambda name: node.containerd.run_pod(name, "batch"), names))

    assert node.records() == {f"{pod.id}@eth0.json" for pod in pods}
    for pod in pods:
        record = node.record(pod.id)
        assert (record["podName"], record["ips"]) == (pod.name, [pod.ip])
    assert len({pod.ip for pod in pods}) == CONCURRENT_PODS

    with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
        list(pool.map(lambda pod: node.containerd.stop_pod(pod.id), pods))

    assert node.records() == set()
    for pod in pods:
        calls = [(entry["command"], entry["exit"]) for entry in node.journal.entries(pod.id)]
        assert calls == [("ADD", 0), ("DEL", 0), ("DEL", 0)], calls


def test_failed_sandbox_is_rolled_back_and_leaves_no_record(aks_node: CriNode) -> None:
    """The sandbox fails after the CNI ADD chain succeeded (runc cannot apply a sysctl): containerd rolls the
    network back with DEL, and wgcni's record goes with it."""
    before = aks_node.records()
    uid = str(uuid.uuid4())

    with pytest.raises(CriError) as failure:
        aks_node.containerd.run_pod("doomed", "shop", uid, sysctls={"net.ipv4.wgcni_no_such_knob": "1"})

    assert "wgcni_no_such_knob" in failure.value.details
    calls = [
        (entry["command"], entry["exit"])
        for entry in aks_node.journal.entries()
        if f"K8S_POD_UID={uid};" in (entry["args"] or "") + ";"
    ]
    assert calls[0] == ("ADD", 0) and calls[1:] and set(calls[1:]) == {("DEL", 0)}, calls
    assert aks_node.records() == before
    assert aks_node.containerd.cri.list_pod_sandboxes() == []
