"""One private containerd (CRI plugin) per simulated node, supervised and fully cleaned up.

`Containerd` starts Debian's containerd 1.6 with its own config, root, state and socket, optionally inside a
given network namespace and mount namespace (the lab's node), always in a mount namespace of its own
(`unshare --mount --propagation private`) in which `/run/containerd` (shim sockets, not configurable) and
`/var/lib/cni` (libcni's result cache and host-local's leases) are bind mounts of per-instance directories.
Nothing it mounts is visible outside, two instances never share runtime state, and the mounts, the pod
network namespaces containerd mounts under its state dir and the shims' sockets all vanish with its
processes. `restart()` is `systemctl restart containerd`: the pods and their shims run on, and the new containerd
joins the shims' mount namespace (so it sees the pods' network namespace mounts and recovers them). CNI runs as on
an AKS node: containerd's CRI plugin executes the conflist from `cni_conf_dir`
(first file by name, `max_conf_num = 1`) with the plugins in `cni_bin_dir`.

`stop()` is safe to call at any point, also after a failed `start()`: it stops and removes the remaining
pod sandboxes through CRI (so the CNI DEL chain runs), terminates containerd, kills any shim it left (and
the shim's pause processes) by PID, removes the per-instance cgroups and deletes the instance's
directories. Only processes whose command line carries this instance's config path or socket address (and
their descendants) are touched. After the supervising process itself crashed, `Containerd(same base_dir).stop()`
finds and removes what is left (the cgroup parent is remembered in the base dir).

Facts this relies on (containerd 1.6.20 here): `restrict_oom_score_adj` is required without CAP_SYS_RESOURCE,
the v1 runtime plugin must stay enabled (1.6's tasks service needs it), crun does not work (runc does), and no
image can be pulled, hence the local pause image. If a CNI DEL fails, containerd keeps the sandbox (NOTREADY).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cni_plugin.files import replace_symlink, write_atomically
from wgcni_lab.cleanup import kill_processes, process_table, remove_cgroups, remove_tree, with_descendants
from wgcni_lab.cri import CriClient, CriError, PortMapping, SandboxStatus
from wgcni_lab.pause import PauseImage, pause_image

REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
REFERENCE_PLUGINS = ("ptp", "host-local", "loopback", "portmap")
K8S_NAMESPACE = "k8s.io"
# Paths containerd and libcni use whatever the config says; each instance gets private copies of them.
PRIVATE_MOUNTPOINTS = ("/run/containerd", "/var/lib/cni")
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
)  # io.containerd.runtime.v1.linux must stay: containerd 1.6's tasks service (and so CRI) requires it
SNAPSHOTTER = "native"  # the pause image is one 700 kB file: copying beats needing overlayfs in every node
OVERLAY_SNAPSHOTTER = "overlayfs"  # for the 140 MB wgcni image: native would copy it for every container


class ContainerdError(RuntimeError):
    """containerd could not be started or did not become ready; the message carries its log tail."""


@dataclass(frozen=True)
class Pod:
    """A running pod sandbox as the lab and the tests see it."""

    id: str
    name: str
    namespace: str
    uid: str
    ip: str
    additional_ips: tuple[str, ...]
    pid: int
    netns_path: str

    @property
    def netns_proc_path(self) -> str:
        """The pod's network namespace, reachable from any mount namespace while the sandbox runs."""
        return f"/proc/{self.pid}/ns/net"


def link_cni_plugins(bin_dir: Path, extra: Mapping[str, Path] | None = None) -> None:
    """Fill a CNI bin dir with symlinks: the reference plugins (ptp, host-local, loopback, portmap) and
    `extra` (plugin type -> executable), replacing links of the same name."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    targets = {name: REFERENCE_PLUGIN_DIR / name for name in REFERENCE_PLUGINS}
    targets.update(extra or {})
    for name, target in targets.items():
        if not Path(target).exists():
            raise FileNotFoundError(f"CNI plugin {name!r}: {target} does not exist")
        replace_symlink(bin_dir / name, str(Path(target).resolve()), temporary_prefix=f".{name}.", durable=False)


def write_conflist(conf_dir: Path, conflist: Mapping[str, Any], filename: str = "10-azure.conflist") -> Path:
    """Write a conflist atomically (containerd live-reloads `conf_dir`, it must never see half a file)."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / filename
    write_atomically(path, (json.dumps(conflist, indent=2) + "\n").encode(), 0o644, temporary_prefix=f".{filename}.",
                     durable=False)
    return path


class Containerd:
    """A private containerd with the CRI plugin; see the module docstring.

    base_dir        everything of this instance lives here (config, root, state, socket, log); created on start
                    and removed by stop(). Keep it short: it holds the Unix socket path (<= 107 bytes).
    cni_conf_dir    containerd's `cni.conf_dir` (default `<base_dir>/net.d`)
    cni_bin_dir     containerd's `cni.bin_dir` (default `<base_dir>/cni-bin`, filled by link_cni_plugins)
    netns           a network namespace to run in: a name under /run/netns or a path (default: the caller's)
    mount_namespace a mount namespace file to start from (e.g. the lab node's /proc/<pid>/ns/mnt); containerd
                    still gets a private child of it. base_dir must be the same path there and outside; the CNI
                    dirs are taken as they are in that namespace (the caller creates and fills them).
    cgroup_parent   cgroup parent of this instance's sandboxes (default `/wgcni-lab-<name>-<random>`);
                    removed by stop()
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        name: str = "node",
        cni_conf_dir: Path | None = None,
        cni_bin_dir: Path | None = None,
        netns: str | None = None,
        mount_namespace: str | None = None,
        cgroup_parent: str | None = None,
        image: PauseImage | None = None,
        containerd_binary: str = "containerd",
        ctr_binary: str = "ctr",
        log_level: str = "info",
        snapshotter: str = SNAPSHOTTER,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.name = name
        self.cni_conf_dir = Path(cni_conf_dir) if cni_conf_dir else self.base_dir / "net.d"
        self.cni_bin_dir = Path(cni_bin_dir) if cni_bin_dir else self.base_dir / "cni-bin"
        self.netns = netns
        self.mount_namespace = mount_namespace
        self._cgroup_parent_file = self.base_dir / "cgroup-parent"
        if cgroup_parent is None and self._cgroup_parent_file.exists():  # recovering an instance after a crash
            cgroup_parent = self._cgroup_parent_file.read_text().strip()
        self.cgroup_parent = cgroup_parent or f"/wgcni-lab-{name}-{secrets.token_hex(4)}"
        self._image = image
        self._containerd_binary = containerd_binary
        self._ctr_binary = ctr_binary
        self._log_level = log_level
        self.snapshotter = snapshotter
        self.address = self.base_dir / "containerd.sock"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.root_dir = self.base_dir / "root"
        self.state_dir = self.base_dir / "state"
        self._process: subprocess.Popen[bytes] | None = None
        self._client: CriClient | None = None
        self._mountpoint_guards: list[SharedMountpoint] = []
        if len(str(self.address).encode()) > 100:
            raise ValueError(f"{self.address}: too long for a Unix socket path (with its .ttrpc twin)")

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def cri(self) -> CriClient:
        if self._client is None:
            raise ContainerdError(f"containerd {self.name} is not running")
        return self._client

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> Containerd:
        """Write the config, start containerd, wait for CRI, import the pause image. Cleans up on failure."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop(remove_pods=False)
            raise
        return self

    def restart(self, timeout: float = 30.0) -> None:
        """containerd stops (SIGTERM) and starts again while its pods run on (their shims are processes of their
        own); it then recovers them from its root and state dirs, as after `systemctl restart containerd`."""
        self._stop_containerd(timeout)
        self._start(timeout)

    def _stop_containerd(self, timeout: float) -> None:
        """Close the CRI client and terminate containerd itself (not its shims)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            _terminate(self._process, timeout)
            self._process = None

    def _shim_mount_namespace(self) -> str | None:
        """The mount namespace of a live shim of this instance (its containerd's, which it outlived), if any."""
        marker = str(self.address).encode()
        for info in process_table().values():
            if info.live and marker in info.argv and any(b"containerd-shim" in arg for arg in info.argv[:1]):
                return f"/proc/{info.pid}/ns/mnt"
        return None

    def _start(self, timeout: float) -> None:
        image = self._image or pause_image()
        for directory in (self.base_dir, self.root_dir, self.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.mount_namespace is None:  # otherwise the CNI dirs are the node's, seen only in its namespace
            self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
            if not self.cni_bin_dir.exists():
                link_cni_plugins(self.cni_bin_dir)
        private_dirs = []
        for mountpoint in PRIVATE_MOUNTPOINTS:
            private = self._private_dir(mountpoint)
            private.mkdir(exist_ok=True)
            private_dirs.append(str(private))
        if self.mount_namespace is None and not self._mountpoint_guards:
            for mountpoint in PRIVATE_MOUNTPOINTS:
                self._mountpoint_guards.append(SharedMountpoint.hold(Path(mountpoint)))
        elif self.mount_namespace is not None:
            self._require_node_mountpoints()
        self.config_path.write_text(self._config_toml(image.name))
        self._cgroup_parent_file.write_text(self.cgroup_parent + "\n")
        containerd = [self._containerd_binary, "--config", str(self.config_path), "--log-level", self._log_level]
        shims = self._shim_mount_namespace()
        if shims is not None:  # a restart: the binds and the pods' netns mounts are there already
            argv = [*self._enter_prefix(mount_namespace=shims), *containerd]
        else:
            # In a new mount namespace: bind the private directories ("$1", "$2", ...) over the mountpoints, then
            # become containerd.
            script = "set -e; " + " ".join(
                f'mount --bind "${index + 1}" {mountpoint};' for index, mountpoint in enumerate(PRIVATE_MOUNTPOINTS)
            ) + f' shift {len(PRIVATE_MOUNTPOINTS)}; exec "$@"'
            argv = [*self._enter_prefix(), "unshare", "--mount", "--propagation", "private", "--"]
            argv += ["/bin/sh", "-c", script, "containerd-node", *private_dirs, *containerd]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._client = CriClient(self.address, timeout=60.0)
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ContainerdError(f"containerd {self.name} exited at start-up:\n{self.log_tail()}")
            if self.address.exists():
                try:
                    self._client.version(timeout=1.0)
                    break
                except CriError as error:
                    if error.code == grpc.StatusCode.UNIMPLEMENTED:  # serving, but the CRI plugin failed
                        raise ContainerdError(
                            f"containerd {self.name} has no CRI service:\n{self.log_tail()}") from error
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd {self.name} did not serve CRI within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.import_image(image.archive, "the pause image")

    def _require_node_mountpoints(self) -> None:
        """In a node's mount namespace the mountpoints must exist already: creating them here would leave empty
        directories in whatever file system backs them there (the host's, unless the node has its own)."""
        probe = subprocess.run(
            ["nsenter", f"--mount={self.mount_namespace}", "--", "sh", "-c",
             'for d; do [ -d "$d" ] || echo "$d"; done', "probe", *PRIVATE_MOUNTPOINTS],
            capture_output=True, text=True,
        )
        missing = probe.stdout.split()
        if probe.returncode != 0:
            raise ContainerdError(
                f"containerd {self.name}: cannot enter {self.mount_namespace}: {probe.stderr.strip()}")
        if missing:
            raise ContainerdError(
                f"containerd {self.name}: {', '.join(missing)} must exist in mount namespace {self.mount_namespace} "
                "(give the node its own /run and /var/lib, or make the directories there yourself)"
            )

    def _enter_prefix(self, mount_namespace: str | None = None) -> list[str]:
        """nsenter into the instance's network namespace and `mount_namespace` (default: the node's)."""
        prefix = []
        if self.netns:
            netns_path = self.netns if "/" in self.netns else f"/run/netns/{self.netns}"
            prefix.append(f"--net={netns_path}")
        if mount_namespace or self.mount_namespace:
            prefix.append(f"--mount={mount_namespace or self.mount_namespace}")
        return ["nsenter", *prefix, "--"] if prefix else []

    def has_image(self, name: str) -> bool:
        """The image is in the CRI namespace (kept in containerd's root across a power-off)."""
        result = subprocess.run(
            [self._ctr_binary, "--address", str(self.address), "--namespace", K8S_NAMESPACE, "images", "ls", "-q"],
            capture_output=True, text=True,
        )
        return result.returncode == 0 and name in result.stdout.split()

    def import_image(self, archive: Path, what: str = "") -> None:
        """`ctr images import` of an OCI archive into the CRI namespace, unpacked for the CRI snapshotter; the
        image is named by the archive's annotations."""
        result = subprocess.run(
            [self._ctr_binary, "--address", str(self.address), "--namespace", K8S_NAMESPACE, "images", "import",
             "--snapshotter", self.snapshotter, str(archive)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ContainerdError(f"importing {what or archive} into {self.name} failed: {result.stderr.strip()}")

    def _config_toml(self, sandbox_image: str) -> str:
        cri = '"io.containerd.grpc.v1.cri"'
        disabled = ", ".join(_toml(name) for name in DISABLED_PLUGINS if not name.endswith(f".{self.snapshotter}"))
        return f"""\
# containerd config for lab node {self.name}; written by wgcni_lab.containerd
version = 2
root = {_toml(self.root_dir)}
state = {_toml(self.state_dir)}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml(self.address)}

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {_toml(self.root_dir / "opt")}
  [plugins.{cri}]
    sandbox_image = {_toml(sandbox_image)}
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    [plugins.{cri}.containerd]
      snapshotter = {_toml(self.snapshotter)}
      default_runtime_name = "runc"
      [plugins.{cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.{cri}.containerd.runtimes.runc.options]
          BinaryName = "runc"
          Root = {_toml(self.state_dir / "runc")}
          SystemdCgroup = false
    [plugins.{cri}.cni]
      bin_dir = {_toml(self.cni_bin_dir)}
      conf_dir = {_toml(self.cni_conf_dir)}
      max_conf_num = 1
"""

    def stop(self, *, remove_pods: bool = True, timeout: float = 10.0) -> None:
        """Stop everything this instance started and delete its directories; idempotent.

        With `remove_pods`, running sandboxes are stopped and removed through CRI first (CNI DEL runs for
        each); whatever is left after that is killed.
        """
        problems: list[str] = []
        if remove_pods and self.alive() and self._client is not None:
            try:
                for sandbox in self._client.list_pod_sandboxes():
                    try:
                        self._client.stop_pod_sandbox(sandbox.id)
                        self._client.remove_pod_sandbox(sandbox.id)
                    except CriError as error:
                        problems.append(str(error))
            except CriError as error:
                problems.append(str(error))
        self._stop_containerd(timeout)
        kill_processes(self.runtime_pids(), timeout)
        remove_cgroups(self.cgroup_parent, timeout)
        for guard in self._mountpoint_guards:
            guard.release()
        self._mountpoint_guards = []
        remove_tree(self.base_dir)
        if problems:
            raise ContainerdError(f"containerd {self.name}: pods could not be removed cleanly: " + "; ".join(problems))

    def power_off(self, timeout: float = 10.0) -> None:
        """The node loses power: this instance's processes are killed (no CRI call, no CNI DEL), its cgroups and
        its volatile state (the state dir and the private /run/containerd: the pods' network namespace mounts, the
        shims' sockets) are removed, while its root (the sandboxes' metadata) and its private /var/lib/cni (libcni's
        cache, host-local's leases) stay, as they are on the OS disk. `start()` then brings it back as containerd
        starts after a reboot: it finds the old sandboxes NOTREADY."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._process = None
        kill_processes(self.runtime_pids(), timeout)
        remove_cgroups(self.cgroup_parent, timeout)
        for volatile in (self.state_dir, self._private_dir("/run/containerd")):
            remove_tree(volatile)

    def _private_dir(self, mountpoint: str) -> Path:
        """The per-instance directory bound over `mountpoint` (one of PRIVATE_MOUNTPOINTS)."""
        return self.base_dir / ("mnt" + mountpoint.replace("/", "-"))

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def runtime_pids(self) -> list[int]:
        """This instance's containerd and shims (their command lines name our config or socket) and all their
        descendants (the pods' pause processes). Also finds them for an instance whose supervisor crashed."""
        markers = {str(self.address).encode(), str(self.config_path).encode()}
        table = process_table()
        roots = [info.pid for info in table.values() if markers.intersection(info.argv)]
        return sorted(with_descendants(roots, table))

    # ---- pods --------------------------------------------------------------------------------------------

    def network_ready(self) -> bool:
        return self.cri.status()["conditions"].get("NetworkReady", {}).get("status", False)

    def loaded_cni_config(self) -> dict[str, Any]:
        """What containerd's CNI library has loaded (the verbose Status `cniconfig`)."""
        config = self.cri.status(verbose=True)["info"].get("cniconfig", {})
        return config if isinstance(config, dict) else {}

    def wait_cni_config(
        self, accept: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll until the network is ready and the loaded CNI config satisfies `accept` (e.g. after a
        conflist rewrite, which containerd picks up asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            loaded = self.loaded_cni_config() if self.network_ready() else {}
            if loaded and (accept is None or accept(loaded)):
                return loaded
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd {self.name}: CNI config not loaded after {timeout}s: {loaded}")
            time.sleep(0.05)

    def run_pod(
        self,
        name: str,
        namespace: str = "default",
        uid: str | None = None,
        *,
        port_mappings: Iterable[PortMapping] = (),
        labels: Mapping[str, str] | None = None,
        sysctls: Mapping[str, str] | None = None,
    ) -> Pod:
        """RunPodSandbox as kubelet does (CNI ADD chain), then read back the pod's IPs and netns."""
        sandbox_id = self.cri.run_pod_sandbox(
            name=name,
            namespace=namespace,
            uid=uid or secrets.token_hex(16),
            port_mappings=port_mappings,
            labels=labels,
            cgroup_parent=self.cgroup_parent,
            sysctls=sysctls,
        )
        return _pod(self.cri.pod_sandbox_status(sandbox_id))

    def pod(self, sandbox_id: str) -> Pod:
        return _pod(self.cri.pod_sandbox_status(sandbox_id))

    def stop_pod(self, sandbox_id: str) -> None:
        """StopPodSandbox (CNI DEL with the netns) then RemovePodSandbox (CNI DEL with an empty netns)."""
        self.cri.stop_pod_sandbox(sandbox_id)
        self.cri.remove_pod_sandbox(sandbox_id)


def _pod(status: SandboxStatus) -> Pod:
    return Pod(
        id=status.id,
        name=status.name,
        namespace=status.namespace,
        uid=status.uid,
        ip=status.ip,
        additional_ips=status.additional_ips,
        pid=status.pid,
        netns_path=status.netns_path,
    )


class SharedMountpoint:
    """Keeps a shared mountpoint directory (/run/containerd, /var/lib/cni) alive while an instance uses it.

    Each user holds a shared flock on the directory. A directory that did not exist is created with a marker
    (an extended attribute, or failing that the creator's own memory). On release the directory is removed
    only if it carries the marker, is empty and nobody else holds it (exclusive lock granted): removing a
    directory that another live mount namespace uses as a mountpoint would detach that namespace's mount.
    """

    MARKER = "user.wgcni-lab.created"

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self._created = created

    @classmethod
    def hold(cls, path: Path) -> SharedMountpoint:
        while True:
            created = False
            try:
                path.mkdir(parents=False)
                created = True
            except FileExistsError:
                pass
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if created:
                    try:
                        os.setxattr(fd, cls.MARKER, b"1")
                    except OSError:  # no user xattrs on this file system: only the creator can remove it
                        pass
                return cls(path, fd, created)
            os.close(fd)  # removed by its last user between our mkdir and our lock: start over

    def _marked(self) -> bool:
        assert self._fd is not None  # asked only while the lock is held
        try:
            return os.getxattr(self._fd, self.MARKER) == b"1"
        except OSError:
            return self._created

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._created or self._marked():
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rmdir(self.path)
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT):
                        raise
        finally:
            os.close(self._fd)
            self._fd = None


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _toml(value: object) -> str:
    return json.dumps(str(value))
