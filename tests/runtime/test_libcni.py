"""The built plugin driven through libcni (the library inside every CNI runtime) by a small Go driver, for the
commands containerd 1.6 never sends: CHECK (with libcni's cached prevResult), GC and STATUS (spec 1.1.0).

The conflist is `ptp` + `host-local` + `wgcni` at 1.0.0. The driver runs inside a per-test "node" network
namespace, each pod gets its own network namespace, and host-local's leases and libcni's cache live in the
test's temp dir, so nothing touches the host's namespaces or /var/lib/cni.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.helpers import NETWORK, plugin_settings, record_path
from wgcni_lab.containerd import link_cni_plugins
from wgcni_lab.harness.fake_hook import FakeHook

pytestmark = [pytest.mark.runtime, pytest.mark.netns]

CNI_VERSION = "1.0.0"
ERR_UNKNOWN_CONTAINER = 3
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_RECORD_MISMATCH = 100
ERR_NOT_PROGRAMMED = 101


class LibcniNode:
    """A node netns with a bin dir, a conflist and a libcni cache; runs the driver there."""

    def __init__(self, driver: Path, plugin: Path, base: Path, node_netns: str, netns_factory) -> None:
        self.driver = driver
        self.base = base
        self.node_netns = node_netns
        self._netns_factory = netns_factory
        self.settings = plugin_settings(base)
        self.bin_dir = base / "bin"
        link_cni_plugins(self.bin_dir, {"wgcni": plugin})
        self.conflist = base / "net.d" / "10-azure.conflist"
        self.conflist.parent.mkdir()
        self.conflist.write_text(json.dumps({
            "cniVersion": CNI_VERSION,
            "name": NETWORK,
            "plugins": [
                {"type": "ptp", "ipMasq": False, "ipam": {
                    "type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]],
                    "dataDir": str(base / "ipam")}},
                {"type": "wgcni", **self.settings},
            ],
        }))
        self.pod_netns: dict[str, str] = {}

    def new_pod(self) -> str:
        """A container ID with a fresh pod network namespace."""
        container_id = uuid.uuid4().hex
        self.pod_netns[container_id] = self._netns_factory("wgcni-rt-pod")
        return container_id

    def run(self, command: str, container_id: str = "", keep: tuple[str, ...] = ()) -> tuple[int, dict]:
        argv = ["ip", "netns", "exec", self.node_netns, str(self.driver), "-conflist", str(self.conflist),
                "-bin-dir", str(self.bin_dir), "-cache-dir", str(self.base / "cache"), "-ifname", "eth0"]
        if container_id:
            argv += ["-container-id", container_id, "-netns", f"/run/netns/{self.pod_netns[container_id]}",
                     "-args", f"IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME=pod-{container_id[:6]};"
                              f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uuid.uuid4()}"]
        if keep:
            argv += ["-keep", ",".join(f"{item}@eth0" for item in keep)]
        done = subprocess.run([*argv, command], capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, 1), f"driver failed: {done.stderr}"
        return done.returncode, json.loads(done.stdout)

    def ok(self, command: str, container_id: str = "", keep: tuple[str, ...] = ()) -> dict:
        code, outcome = self.run(command, container_id, keep)
        assert (code, outcome["ok"]) == (0, True), outcome
        return outcome

    def failure(self, command: str, container_id: str = "") -> dict:
        code, outcome = self.run(command, container_id)
        assert (code, outcome.get("ok", False)) == (1, False), outcome
        return outcome

    def record(self, container_id: str) -> dict | None:
        path = record_path(self.settings, container_id)
        return json.loads(path.read_text()) if path.exists() else None

    def delete_all(self) -> None:
        for container_id in self.pod_netns:
            self.run("del", container_id)


@pytest.fixture
def libcni_node(libcni_driver: Path, plugin_binary: Path, netns_factory, tmp_path_factory) -> Iterator[LibcniNode]:
    base = tmp_path_factory.mktemp("libcni")
    node = LibcniNode(libcni_driver, plugin_binary, base, netns_factory("wgcni-rt-node"), netns_factory)
    try:
        yield node
    finally:
        node.delete_all()


@pytest.fixture
def hook(libcni_node: LibcniNode) -> Iterator[FakeHook]:
    with FakeHook(libcni_node.settings["hookSocket"], libcni_node.settings["stateDir"]) as fake:
        yield fake


def test_add_check_del_through_libcni(libcni_node: LibcniNode) -> None:
    container_id = libcni_node.new_pod()

    added = libcni_node.ok("add", container_id)

    pod_ip = added["result"]["ips"][0]["address"].split("/")[0]
    assert libcni_node.record(container_id)["ips"] == [pod_ip]
    libcni_node.ok("check", container_id)  # prevResult replayed from libcni's cache; no hook: record decides
    libcni_node.ok("del", container_id)
    assert libcni_node.record(container_id) is None
    libcni_node.ok("del", container_id)  # again, now without a cached prevResult


def test_check_fails_when_the_record_was_tampered_with_or_removed(libcni_node: LibcniNode) -> None:
    container_id = libcni_node.new_pod()
    libcni_node.ok("add", container_id)
    path = record_path(libcni_node.settings, container_id)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "ips": ["10.99.0.1"]}))

    tampered = libcni_node.failure("check", container_id)

    assert tampered["code"] == ERR_RECORD_MISMATCH
    assert "10.99.0.1" in tampered["msg"]

    path.unlink()

    removed = libcni_node.failure("check", container_id)

    assert removed["code"] == ERR_UNKNOWN_CONTAINER
    assert container_id in removed["msg"]


def test_check_asks_the_hook_whether_the_pod_is_programmed(libcni_node: LibcniNode, hook: FakeHook) -> None:
    container_id = libcni_node.new_pod()
    libcni_node.ok("add", container_id)
    assert hook.programmed_ips() == set(libcni_node.record(container_id)["ips"])

    libcni_node.ok("check", container_id)
    hook.programmed.clear()  # the hook lost the pod's route/AllowedIPs

    missing = libcni_node.failure("check", container_id)

    assert missing["code"] == ERR_NOT_PROGRAMMED
    assert libcni_node.record(container_id)["ips"][0] in missing["msg"]


def test_gc_removes_only_the_records_not_listed_as_valid(libcni_node: LibcniNode, hook: FakeHook) -> None:
    kept, stale, also_stale = (libcni_node.new_pod() for _ in range(3))
    for container_id in (kept, stale, also_stale):
        libcni_node.ok("add", container_id)

    libcni_node.ok("gc", keep=(kept,))

    assert libcni_node.record(kept) is not None
    assert libcni_node.record(stale) is None and libcni_node.record(also_stale) is None
    deleted = {request["containerID"] for request in hook.requests if request["op"] == "pod-deleted"}
    assert deleted == {stale, also_stale}


def test_status_reflects_the_hook(libcni_node: LibcniNode) -> None:
    absent = libcni_node.failure("status")
    assert absent["code"] == ERR_NOT_AVAILABLE

    with FakeHook(libcni_node.settings["hookSocket"], libcni_node.settings["stateDir"]) as hook:
        libcni_node.ok("status")
        hook.dataplane_programmed = False
        hook.status_message = "3 peers not programmed yet"

        limited = libcni_node.failure("status")

    assert limited["code"] == ERR_LIMITED_CONNECTIVITY
    assert "3 peers not programmed yet" in limited["msg"]
