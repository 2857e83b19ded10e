"""The lab's runtime machinery itself: CRI descriptors taken from the containerd binary, the local pause image,
and a private containerd that runs inside a node's namespaces and leaves nothing behind, even after a crash.

These use only the reference plugins (ptp + host-local): the plugin under test is not involved.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgcni_lab import pause
from wgcni_lab.buildcache import CACHE_ENV
from wgcni_lab.cleanup import CGROUP_ROOT, process_state
from wgcni_lab.containerd import (
    PRIVATE_MOUNTPOINTS,
    Containerd,
    SharedMountpoint,
    link_cni_plugins,
    write_conflist,
)
from wgcni_lab.cri import RUNTIME_SERVICE, cri_descriptor
from wgcni_lab.harness.netns import Namespaces
from wgcni_lab.harness.polling import wait_until

KUBELET_SANDBOX_CALLS = {"Version", "Status", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox",
                         "ListPodSandbox", "PodSandboxStatus"}


def reference_conflist(subnet: str) -> dict:
    return {"cniVersion": "1.0.0", "name": "lab", "plugins": [
        {"type": "ptp", "ipMasq": False, "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]]}}]}


def test_cri_descriptor_comes_from_the_containerd_binary() -> None:
    proto = cri_descriptor()

    assert proto.package == "runtime.v1"
    [service] = [service for service in proto.service if f"{proto.package}.{service.name}" == RUNTIME_SERVICE]
    assert KUBELET_SANDBOX_CALLS <= {method.name for method in service.method}
    assert not [dependency for dependency in proto.dependency if "gogo" in dependency]
    config = next(message for message in proto.message_type if message.name == "PodSandboxConfig")
    labels_entry = next(nested for nested in config.nested_type if nested.name == "LabelsEntry")
    assert labels_entry.options.map_entry, "map fields must stay maps when the gogo options are dropped"


def test_pause_image_is_reproducible_and_named_in_its_index(tmp_path: Path, monkeypatch) -> None:
    image = pause.pause_image()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # a second, independent build from the same sources

    rebuilt = pause.pause_image()

    assert rebuilt.archive != image.archive and rebuilt.name == image.name
    assert rebuilt.archive.read_bytes() == image.archive.read_bytes()
    [manifest] = json.loads(_member(image.archive, "index.json"))["manifests"]
    assert manifest["annotations"]["io.containerd.image.name"] == image.name
    layer_digest = json.loads(_member(image.archive, "blobs/sha256/" + manifest["digest"].split(":")[1]))[
        "layers"][0]["digest"]
    with tarfile.open(fileobj=_open_member(image.archive, "blobs/sha256/" + layer_digest.split(":")[1])) as layer:
        binary = layer.getmember("pause")
        assert binary.mode == 0o755
        assert layer.extractfile(binary).read(4) == b"\x7fELF"


def _open_member(archive: Path, name: str) -> io.BytesIO:
    with tarfile.open(archive) as outer:
        return io.BytesIO(outer.extractfile(name).read())


def _member(archive: Path, name: str) -> bytes:
    return _open_member(archive, name).read()


@pytest.fixture
def node_netns() -> Iterator[str]:
    with Namespaces() as namespaces:
        yield namespaces.add_unique("wgcni-rt-node")


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def _host_mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _left_behind(existed_before: dict[str, bool]) -> list[str]:
    """Mountpoint dirs that exist now but did not before and that no live instance holds (others may run)."""
    leaked = []
    for path, existed in existed_before.items():
        if existed or not os.path.isdir(path):
            continue
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            leaked.append(path)
        except BlockingIOError:
            pass  # held by another containerd instance running at the same time
        finally:
            os.close(fd)
    return leaked


def _cgroup_dirs(cgroup_parent: str) -> list[Path]:
    return [hierarchy / cgroup_parent.strip("/") for hierarchy in CGROUP_ROOT.iterdir()
            if (hierarchy / cgroup_parent.strip("/")).is_dir()]


def test_stop_after_a_crash_leaves_no_process_mount_cgroup_or_state(tmp_path_factory, node_netns: str) -> None:
    base = tmp_path_factory.mktemp("crash") / "ctrd"
    mountpoints_before = {path: os.path.exists(path) for path in PRIVATE_MOUNTPOINTS}
    containerd = Containerd(base, name="crash", netns=node_netns)
    try:
        write_conflist(containerd.cni_conf_dir, reference_conflist("10.244.9.0/24"))
        containerd.start()
        containerd.wait_cni_config()
        pods = [containerd.run_pod(f"victim-{index}") for index in range(2)]
        runtime_pids = containerd.runtime_pids()
        assert {pod.pid for pod in pods} <= set(runtime_pids)
        assert str(base) not in _host_mounts(), "containerd's mounts must stay in its own mount namespace"
        assert _cgroup_dirs(containerd.cgroup_parent)

        os.kill(containerd.pid, signal.SIGKILL)  # the runtime dies; its shims and pods live on
        wait_until(lambda: not _alive(containerd.pid), 10, "containerd to die", interval=0.01)
        assert all(_alive(pod.pid) for pod in pods)
        recovered = Containerd(base, name="crash")  # as `wgcni-lab down` would after its own crash
        assert recovered.cgroup_parent == containerd.cgroup_parent
        recovered.stop()
    finally:
        containerd.stop(remove_pods=False)

    assert not [pid for pid in runtime_pids if _alive(pid)]
    assert not base.exists()
    assert str(base) not in _host_mounts()
    assert _cgroup_dirs(containerd.cgroup_parent) == []
    assert _left_behind(mountpoints_before) == []


def test_containerd_runs_inside_a_node_mount_namespace(tmp_path_factory, node_netns: str) -> None:
    """As in the lab: the node's own mount namespace holds its CNI dirs and its /run and /var/lib (here tmpfs that
    only the node sees); containerd started into it finds them there and leaves nothing outside."""
    base = tmp_path_factory.mktemp("mntns") / "ctrd"
    node_only = ("/srv/cni", *PRIVATE_MOUNTPOINTS)
    host_before = {path: os.path.exists(path) for path in node_only}
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         "mount -t tmpfs lab-node /srv && mkdir -p /srv/cni/net.d /srv/cni/bin"
         " && mount -t tmpfs lab-node-run /run && mkdir /run/containerd"
         " && mount -t tmpfs lab-node-var-lib /var/lib && mkdir /var/lib/cni && echo ready && exec sleep 600"],
        stdout=subprocess.PIPE, text=True)
    containerd = None
    try:
        assert holder.stdout.readline().strip() == "ready"
        node_root = Path(f"/proc/{holder.pid}/root")
        link_cni_plugins(node_root / "srv/cni/bin")
        write_conflist(node_root / "srv/cni/net.d", reference_conflist("10.244.10.0/24"))
        containerd = Containerd(base, name="mntns", netns=node_netns, mount_namespace=f"/proc/{holder.pid}/ns/mnt",
                                cni_conf_dir=Path("/srv/cni/net.d"), cni_bin_dir=Path("/srv/cni/bin"))
        containerd.start()
        loaded = containerd.wait_cni_config()
        assert [network["Config"]["Name"] for network in loaded["Networks"]] == ["cni-loopback", "lab"]

        pod = containerd.run_pod("in-node")

        assert pod.ip.startswith("10.244.10.")
        assert os.readlink(f"/proc/{pod.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        containerd.stop_pod(pod.id)
    finally:
        if containerd is not None:
            containerd.stop()
        holder.kill()
        holder.wait()
    assert _left_behind(host_before) == []


def test_a_shared_mountpoint_is_removed_by_its_last_user_only(tmp_path: Path) -> None:
    created_here = tmp_path / "run-containerd"
    first, second = SharedMountpoint.hold(created_here), SharedMountpoint.hold(created_here)

    first.release()
    assert created_here.is_dir(), "still the mountpoint of the second instance"
    second.release()  # not its creator, but the directory carries the creator's marker
    assert not created_here.exists()

    preexisting = tmp_path / "var-lib-cni"
    preexisting.mkdir()
    guard = SharedMountpoint.hold(preexisting)
    guard.release()
    assert preexisting.is_dir(), "a directory that existed before is never removed"
