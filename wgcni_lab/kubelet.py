"""The lab's kubelet for wgcni's DaemonSet: the pod template of conf/daemonset.yaml run on a node's containerd
through CRI from the wgcni image (`make image`), as kubelet runs it. The manifest is the one source of the pod's
settings: nothing of it is repeated here.

- `load_template()` reads the pod template: init containers and containers with their image, command and args, env
  (values and the downward API's `spec.nodeName`, `metadata.name`, `metadata.namespace`), volume mounts, security
  context (privileged, capabilities, read-only root, allowPrivilegeEscalation), named ports and httpGet probes;
  hostNetwork; hostPath, configMap and emptyDir volumes. A field the lab cannot honour is a one-line LabError.
- `ImageDaemonSetPod` runs it on one node: a sandbox (hostNetwork: CRI NamespaceMode NODE, privileged when a
  container is), the init containers one after another to completion, then the containers; hostPath volumes are
  the node's paths (DirectoryOrCreate made there), the configMap is the lab's ConfigMap written under the pod's
  volume dir, emptyDir a directory there. What the lab adds, as AKS adds it outside the manifest: the credentials
  (the service-account token; here a kubeconfig and a node-bound token from the lab's API server, mounted read-only
  at CREDENTIALS_DIR and named by KUBECONFIG; the token is renewed once 80% of its lifetime is over, as kubelet does).
- Probes: one worker thread per probe, in the node's network namespace, as kubelet's prober does: the startup probe
  gates the others; `failureThreshold` failures in a row of liveness kill the container (SIGTERM, then SIGKILL after
  terminationGracePeriodSeconds); readiness sets the container's READY.
- Restarts (restartPolicy Always): a container that exited, was killed (`wgcni-lab hook NODE kill`: SIGKILL, as an
  OOM kill or a crash ends it) or failed liveness is created again (attempt + 1) after its crash-loop backoff
  (lifecycle.RestartBackoff), alone: the init containers do not run again. The status is kubectl's: READY n/m,
  STATUS (Init:0/1, PodInitializing, Running, CrashLoopBackOff, ...), RESTARTS (the sum), AGE.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from wgcni_lab import lab
from wgcni_lab.cleanup import process_table, with_descendants
from wgcni_lab.cri import CriClient, CriError
from wgcni_lab.image import DAEMONSET_FILE, normalized

if TYPE_CHECKING:
    from wgcni_lab.apiserver.server import ApiServer
    from wgcni_lab.lifecycle import RestartBackoff

CLONE_NEWNET = 0x40000000
CREDENTIALS_DIR = Path("/var/run/secrets/wgcni-lab")
POD_LABEL = {"wgcni-lab/daemonset": "wgcni-node"}
FIELD_PATHS = ("spec.nodeName", "metadata.name", "metadata.namespace")
HOST_PATH_TYPES = ("", "Directory", "DirectoryOrCreate")


# ---- the pod template -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    kind: str  # startup | liveness | readiness
    path: str
    host: str
    port: int
    period: float
    timeout: float
    failure_threshold: int
    success_threshold: int
    initial_delay: float

    def check(self) -> tuple[bool, str]:
        """One httpGet: success is a status from 200 to 399, as kubelet counts it."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("GET", self.path, headers={"User-Agent": "kube-probe/wgcni-lab"})
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as error:
            return False, f"Get http://{self.host}:{self.port}{self.path}: {error or type(error).__name__}"
        finally:
            connection.close()
        return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"


@dataclass(frozen=True)
class Mount:
    volume: str
    path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    args: list[str]
    env: list[tuple[str, str, str]]  # (name, value, fieldPath): one of the last two is empty
    mounts: list[Mount]
    privileged: bool
    add_capabilities: list[str]
    drop_capabilities: list[str]
    read_only_root: bool
    no_new_privileges: bool
    probes: dict[str, Probe]


@dataclass(frozen=True)
class PodTemplate:
    name: str
    namespace: str
    host_network: bool
    grace_seconds: int
    init_containers: list[ContainerSpec]
    containers: list[ContainerSpec]
    volumes: dict[str, dict[str, Any]]


def load_template(path: Path = DAEMONSET_FILE) -> PodTemplate:
    """The DaemonSet's pod template, checked for what the lab's kubelet can run."""
    manifest = yaml.safe_load(path.read_text())
    spec = manifest["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for volume in volumes.values():
        kinds = set(volume) - {"name"}
        if kinds not in ({"hostPath"}, {"configMap"}, {"emptyDir"}):
            raise lab.LabError(f"{path.name}: volume {volume['name']}: the lab runs hostPath, configMap and emptyDir")
        if "hostPath" in volume and volume["hostPath"].get("type", "") not in HOST_PATH_TYPES:
            raise lab.LabError(f"{path.name}: volume {volume['name']}: hostPath type {volume['hostPath']['type']}")
    return PodTemplate(
        name=manifest["metadata"]["name"], namespace=manifest["metadata"].get("namespace", "default"),
        host_network=bool(spec.get("hostNetwork")), grace_seconds=int(spec.get("terminationGracePeriodSeconds", 30)),
        init_containers=[_container(path, item, volumes) for item in spec.get("initContainers", [])],
        containers=[_container(path, item, volumes) for item in spec["containers"]],
        volumes=volumes,
    )


def _container(path: Path, item: dict[str, Any], volumes: dict[str, Any]) -> ContainerSpec:
    where = f"{path.name}: container {item['name']}"
    env = []
    for variable in item.get("env", []):
        field_path = ((variable.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
        if "valueFrom" in variable and field_path not in FIELD_PATHS:
            raise lab.LabError(f"{where}: env {variable['name']}: the lab fills fieldRef {', '.join(FIELD_PATHS)}")
        env.append((variable["name"], str(variable.get("value", "")), field_path))
    mounts = []
    for mount in item.get("volumeMounts", []):
        if mount["name"] not in volumes:
            raise lab.LabError(f"{where}: volumeMount {mount['name']} names no volume")
        mounts.append(Mount(mount["name"], mount["mountPath"], bool(mount.get("readOnly"))))
    ports = {port["name"]: port["containerPort"] for port in item.get("ports", []) if "name" in port}
    probes = {}
    for kind in ("startup", "liveness", "readiness"):
        probe = item.get(f"{kind}Probe")
        if probe is None:
            continue
        if set(probe) & {"exec", "tcpSocket", "grpc"} or "httpGet" not in probe:
            raise lab.LabError(f"{where}: {kind}Probe: the lab runs httpGet probes")
        get = probe["httpGet"]
        port = ports.get(get["port"], get["port"])
        if not isinstance(port, int):
            raise lab.LabError(f"{where}: {kind}Probe: port {get['port']!r} is not a named port of the container")
        probes[kind] = Probe(kind, get.get("path", "/"), get.get("host", "127.0.0.1"), port,
                             float(probe.get("periodSeconds", 10)), float(probe.get("timeoutSeconds", 1)),
                             int(probe.get("failureThreshold", 3)), int(probe.get("successThreshold", 1)),
                             float(probe.get("initialDelaySeconds", 0)))
    security = item.get("securityContext") or {}
    capabilities = security.get("capabilities") or {}
    return ContainerSpec(
        name=item["name"], image=normalized(item["image"]), command=list(item.get("command", [])),
        args=list(item.get("args", [])), env=env, mounts=mounts, privileged=bool(security.get("privileged")),
        add_capabilities=list(capabilities.get("add", [])), drop_capabilities=list(capabilities.get("drop", [])),
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False, probes=probes,
    )


# ---- probes ---------------------------------------------------------------------------------------------------------

class ProbeWorker(threading.Thread):
    """One probe of one container run, in the node's network namespace (setns applies to this thread only)."""

    def __init__(self, probe: Probe, netns: str, run: ContainerRun) -> None:
        super().__init__(name=f"probe-{run.spec.name}-{probe.kind}", daemon=True)
        self.probe = probe
        self.netns = netns
        self.run_ = run
        self.stopped = threading.Event()
        self.failures = 0
        self.successes = 0
        self.last_message = ""

    def run(self) -> None:
        with open(f"/run/netns/{self.netns}") as namespace:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                self.last_message = f"setns into {self.netns} failed: {os.strerror(ctypes.get_errno())}"
                return
        if self.stopped.wait(self.probe.initial_delay):
            return
        while not self.stopped.is_set():
            if self.probe.kind == "startup" and self.run_.started:
                return  # kubelet stops a startup probe once it has passed
            if self.probe.kind == "startup" or self.run_.started:
                ok, message = self.probe.check()
                if self.stopped.is_set():
                    return
                self.record(ok, message)
            self.stopped.wait(self.probe.period)

    def record(self, ok: bool, message: str) -> None:
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            if self.successes >= self.probe.success_threshold:
                self.run_.probe_succeeded(self.probe.kind)
        else:
            self.failures, self.successes, self.last_message = self.failures + 1, 0, message
            if self.failures >= self.probe.failure_threshold:
                self.run_.probe_failed(self.probe.kind, message)


# ---- containers and the pod -----------------------------------------------------------------------------------------

@dataclass
class ContainerRun:
    """A container of the pod through its restarts: the current CRI container and what kubectl shows of it."""

    spec: ContainerSpec
    backoff: RestartBackoff
    id: str = ""
    restarts: int = 0
    state: str = "waiting"  # waiting -> running -> terminated -> waiting (backoff) -> running
    reason: str = "ContainerCreating"
    last_termination: str = ""
    started_at: float = 0.0
    restart_at: float = 0.0
    started: bool = False  # the startup probe passed (or there is none)
    ready: bool = False
    liveness_failed: str = ""
    killed: bool = False  # by `wgcni-lab hook NODE kill`
    coming_back: bool = False  # restarted, not ready yet since
    workers: list[ProbeWorker] = field(default_factory=list)

    def probe_succeeded(self, kind: str) -> None:
        if kind == "startup":
            self.started = True
        elif kind == "readiness":
            self.ready, self.coming_back = True, False

    def probe_failed(self, kind: str, message: str) -> None:
        if kind == "readiness":
            self.ready = False
        elif kind == "liveness" or kind == "startup" and not self.started:
            self.liveness_failed = f"{kind} probe failed: {message}"

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stopped.set()
        self.workers = []


class FreezablePod:
    """`wgcni-lab hook NODE stop|start` on either kind of DaemonSet pod: SIGSTOP / SIGCONT to each of its processes
    (`pids()`), its phase running <-> stopped."""

    node: lab.NodeState
    phase: str

    def pids(self) -> set[int]:
        raise NotImplementedError

    def publish(self) -> None:
        raise NotImplementedError

    def signal_all(self, signum: signal.Signals) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def freeze(self) -> None:
        if self.phase != "running":
            raise lab.LabError(f"{self.node.name}: the DaemonSet pod is {self.phase}, not running")
        self.signal_all(signal.SIGSTOP)
        self.phase = "stopped"
        self.publish()

    def thaw(self) -> None:
        if self.phase != "stopped":
            raise lab.LabError(f"{self.node.name}: the DaemonSet pod is {self.phase}, not stopped")
        self.signal_all(signal.SIGCONT)
        self.phase = "running"
        self.publish()


class ImageDaemonSetPod(FreezablePod):
    """wgcni's DaemonSet pod on one node, run from the image through the node's containerd (module docstring)."""

    runtime_kind = "containerd"

    def __init__(self, state: lab.LabState, node: lab.NodeState, template: PodTemplate,
                 backoff: Callable[[], RestartBackoff], api: ApiServer, restarts: int = 0) -> None:
        self.state = state
        self.node = node
        self.api = api  # issues the pod's service-account token, as TokenRequest does for the kubelet
        self.token_issued_at = 0.0
        self.template = template
        self.uid = secrets.token_hex(16)
        self.sandbox_id = ""
        self.sandbox_config: dict[str, Any] = {}
        self.created_at = 0.0
        self.phase = "pending"  # pending -> init -> running <-> stopped
        self.init_done = 0
        self.runs = {spec.name: ContainerRun(spec, backoff()) for spec in template.containers}
        self.carried_restarts = restarts  # restarts of the pod's previous sandboxes (a reboot keeps the count)
        self.retry_backoff = backoff()  # a pod that could not start is started again after it, as kubelet does
        self.retry_at = 0.0
        self.started_at = 0.0
        self.env_fields: dict[str, str] = {}
        self.volumes: dict[str, str] = {}
        self.credentials = Path()  # the credentials volume's directory in the node, made at start
        self.shown: tuple[Any, ...] = ()

    # ---- paths in the node --------------------------------------------------------------------------------------

    @property
    def pod_dir(self) -> Path:
        return Path("/var/lib/kubelet/pods") / self.uid

    @property
    def log_dir(self) -> Path:
        return Path("/var/log/pods") / f"{self.template.namespace}_{self.template.name}-{self.node.name}_{self.uid}"

    def in_node(self, path: Path) -> Path:
        return self.node.root / str(path).lstrip("/")

    def log_file(self, name: str, attempt: int) -> Path:
        """A container's log as the host reaches it (CRI's format: time, stream, tag, line)."""
        return self.in_node(self.log_dir / name / f"{attempt}.log")

    # ---- start ------------------------------------------------------------------------------------------------------

    def cri(self) -> CriClient:
        return lab.cri_client(self.state, self.node)

    def start(self, runtime: Any) -> None:
        """The sandbox, the init containers to completion, then the containers; returns once they run, the hook
        serves and containerd has loaded the conflist with wgcni in it."""
        volumes = self._volume_paths()
        env_fields = {"spec.nodeName": self.node.name, "metadata.name": f"{self.template.name}-{self.node.name}",
                      "metadata.namespace": self.template.namespace}
        self.env_fields, self.volumes, self.started_at = env_fields, volumes, time.monotonic()
        privileged = any(spec.privileged for spec in self.template.init_containers + self.template.containers)
        with self.cri() as cri:
            try:
                self._remove_old_sandboxes(cri)
                self.sandbox_config = cri.sandbox_config(
                    name=f"{self.template.name}-{self.node.name}", namespace=self.template.namespace, uid=self.uid,
                    log_directory=str(self.log_dir), labels=POD_LABEL,
                    cgroup_parent=self.state.cgroup_parent(self.node), host_network=self.template.host_network,
                    privileged=privileged)
                self.sandbox_id = cri.run_sandbox(self.sandbox_config)
                self.created_at = time.time()
                self.phase = "init"
                self.publish()
                for index, spec in enumerate(self.template.init_containers):
                    self._run_init(cri, spec)
                    self.init_done = index + 1
                self.phase = "running"
                for run in self.runs.values():
                    self._create(cri, run)
            except CriError as error:
                raise lab.LabError(f"{self.node.name}: {self.template.name}: {error.details or error}") from None
        lab.wait_until(self._serving, 90, f"wgcni-node on {self.node.name} to be ready", interval=0.1,
                       error=lab.LabError)
        lab.wait_chained(runtime)
        self.publish()

    def _volume_paths(self) -> dict[str, str]:
        """Each volume's path in the node, made as kubelet makes it."""
        paths = {}
        for name, volume in self.template.volumes.items():
            if "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
                kind = volume["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    self.in_node(path).mkdir(parents=True, exist_ok=True)
                elif kind == "Directory" and not self.in_node(path).is_dir():
                    # Not there on this host (no kernel modules installed): kubelet would refuse the pod; the lab
                    # mounts an empty directory instead and says so in the node's daemon log.
                    path = self.pod_dir / "volumes" / "missing-host-path" / name
                    self.in_node(path).mkdir(parents=True, exist_ok=True)
                    print(f"{self.node.name}: hostPath {volume['hostPath']['path']} (type Directory) does not exist "
                          "on this host: mounting an empty directory", flush=True)
                paths[name] = str(path)
            elif "configMap" in volume:
                path = self.pod_dir / "volumes" / "kubernetes.io~configmap" / name
                self.in_node(path).mkdir(parents=True, exist_ok=True)
                config = lab.hook_config(self.state.azure_underlay, self.state.settings)
                (self.in_node(path) / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
                paths[name] = str(path)
            else:
                path = self.pod_dir / "volumes" / "kubernetes.io~empty-dir" / name
                self.in_node(path).mkdir(parents=True, exist_ok=True)
                paths[name] = str(path)
        credentials = self.pod_dir / "volumes" / "wgcni-lab~credentials"
        self.in_node(credentials).mkdir(parents=True, exist_ok=True)
        kubeconfig = lab.kubeconfig(self.state, self.node, self.api.tls.ca_pem, token_file=CREDENTIALS_DIR / "token")
        (self.in_node(credentials) / "kubeconfig").write_text(json.dumps(kubeconfig, indent=2) + "\n")
        paths[""] = str(credentials)
        self.credentials = credentials
        self.rotate_token()
        return paths

    def rotate_token(self) -> None:
        """A new service-account token bound to the node's Node in the credentials volume, replaced atomically (the
        hook re-reads the file when it changes)."""
        lab.write_node_token(self.node, self.api.node_token(self.node.name, lab.TOKEN_TTL), self.credentials)
        self.token_issued_at = time.monotonic()

    def _remove_old_sandboxes(self, cri: CriClient) -> None:
        """What kubelet does with the pod's dead sandbox after a reboot: stop and remove it."""
        for sandbox in cri.list_pod_sandboxes(labels=POD_LABEL):
            cri.stop_pod_sandbox(sandbox.id)
            cri.remove_pod_sandbox(sandbox.id)

    def container_config(self, spec: ContainerSpec, attempt: int) -> dict[str, Any]:
        envs = [{"key": name, "value": self.env_fields[field_path] if field_path else value}
                for name, value, field_path in spec.env]
        mounts = [{"container_path": mount.path, "host_path": self.volumes[mount.volume], "readonly": mount.read_only}
                  for mount in spec.mounts]
        envs.append({"key": "KUBECONFIG", "value": str(CREDENTIALS_DIR / "kubeconfig")})
        mounts.append({"container_path": str(CREDENTIALS_DIR), "host_path": self.volumes[""], "readonly": True})
        with self.cri() as cri:
            node_mode, container_mode = cri.namespace_mode("NODE"), cri.namespace_mode("CONTAINER")
        security: dict[str, Any] = {
            "privileged": spec.privileged, "readonly_rootfs": spec.read_only_root,
            "no_new_privs": spec.no_new_privileges,
            "namespace_options": {"network": node_mode if self.template.host_network else 0, "pid": container_mode},
        }
        if not spec.privileged:
            security["capabilities"] = {"add_capabilities": spec.add_capabilities,
                                        "drop_capabilities": spec.drop_capabilities}
        return {
            "metadata": {"name": spec.name, "attempt": attempt}, "image": {"image": spec.image},
            "command": spec.command, "args": spec.args, "envs": envs, "mounts": mounts,
            "labels": {"io.kubernetes.container.name": spec.name}, "log_path": f"{spec.name}/{attempt}.log",
            "linux": {"security_context": security},
        }

    def _run_init(self, cri: CriClient, spec: ContainerSpec) -> None:
        container = cri.create_container(self.sandbox_id, self.container_config(spec, 0), self.sandbox_config)
        cri.start_container(container)

        def exited() -> bool:
            return cri.container_status(container).state == "CONTAINER_EXITED"

        lab.wait_until(exited, 180, f"init container {spec.name} on {self.node.name}", interval=0.1,
                       error=lab.LabError)
        status = cri.container_status(container)
        cri.remove_container(container)
        if status.exit_code != 0:
            raise lab.LabError(f"{self.node.name}: init container {spec.name} exited with {status.exit_code}: "
                               f"{self._log_tail(spec.name, 0)}")

    def _create(self, cri: CriClient, run: ContainerRun) -> None:
        run.id = cri.create_container(self.sandbox_id, self.container_config(run.spec, run.restarts),
                                      self.sandbox_config)
        cri.start_container(run.id)
        run.state, run.reason, run.started_at = "running", "", time.monotonic()
        run.started = "startup" not in run.spec.probes
        run.ready = "readiness" not in run.spec.probes
        run.liveness_failed = ""
        run.workers = [ProbeWorker(probe, self.node.netns, run) for probe in run.spec.probes.values()]
        for worker in run.workers:
            worker.start()
        if run.spec.name == "wgcni-node":
            self.node.hook_pid = cri.container_status(run.id).pid

    def _serving(self) -> bool:
        """Every container runs and the hook answers on its socket with its device made (what the lab needs to go
        on; the probes run on their own: a hook whose node is not published yet is not ready, and kubelet does not
        wait for readiness either)."""
        with self.cri() as cri:
            for run in self.runs.values():
                if run.state == "running" and cri.container_status(run.id).state == "CONTAINER_EXITED":
                    raise lab.LabError(f"{self.node.name}: container {run.spec.name} exited at start: "
                                       f"{self._log_tail(run.spec.name, run.restarts)}")
                if run.state != "running":
                    return False
        status = lab.hook_request(self.node, "status")
        return bool(status and status.get("ready"))

    def _log_tail(self, name: str, attempt: int) -> str:
        try:
            lines = self.log_file(name, attempt).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1].split(" ", 3)[-1] if lines else "no log"

    # ---- hook NODE stop|start|kill ---------------------------------------------------------------------------------

    def _container_pids(self, run: ContainerRun) -> set[int]:
        with self.cri() as cri:
            pid = cri.container_status(run.id).pid if run.id else 0
        return with_descendants({pid}, process_table()) if pid else set()

    def pids(self) -> set[int]:
        return {pid for run in self.runs.values() for pid in self._container_pids(run)}

    def kill(self) -> None:
        """SIGKILL the hook container's process (as a crash or an OOM kill ends it) and wait until the runtime
        reports it exited; the supervision loop restarts it after its backoff."""
        run = self.runs["wgcni-node"]
        if self.phase not in ("running", "stopped") or run.state != "running":
            raise lab.LabError(f"{self.node.name}: the wgcni-node container is {run.state}: nothing to kill")
        if self.phase == "stopped":
            self.thaw()
        with self.cri() as cri:
            pid = cri.container_status(run.id).pid
            if pid:
                run.killed = True
                os.kill(pid, signal.SIGKILL)
            lab.wait_until(lambda: cri.container_status(run.id).state == "CONTAINER_EXITED", 30,
                           f"the wgcni-node container on {self.node.name} to exit", interval=0.05, error=lab.LabError)
        self.supervise(None)

    # ---- supervision --------------------------------------------------------------------------------------------

    def supervise(self, runtime: Any) -> None:
        """One look, as kubelet's pod worker takes: a container that exited or failed liveness is terminated and
        scheduled for restart after its backoff; one whose backoff is over is created again."""
        if self.phase == "failed" and runtime is not None and time.monotonic() >= self.retry_at:
            self.carried_restarts += 1
            try:
                self.start(runtime)
            except lab.LabError as error:
                self.fail(str(error))
            return
        if self.phase not in ("running", "stopped"):
            return
        if time.monotonic() - self.token_issued_at >= 0.8 * lab.TOKEN_TTL:
            self.rotate_token()
        with self.cri() as cri:
            for run in self.runs.values():
                try:
                    if run.state == "running":
                        status = cri.container_status(run.id)
                        if run.liveness_failed and status.state == "CONTAINER_RUNNING":
                            cri.stop_container(run.id, timeout=self.template.grace_seconds)
                            status = cri.container_status(run.id)
                        if status.state == "CONTAINER_EXITED":
                            self._terminated(run, status.exit_code, status.reason)
                    elif run.state == "terminated" and time.monotonic() >= run.restart_at:
                        cri.remove_container(run.id)
                        run.restarts += 1
                        self._create(cri, run)
                        run.coming_back = not run.ready
                        self.publish()
                except CriError as error:
                    run.last_termination = f"CRI: {error.details or error}"
                    self.publish()
        if self._shown() != self.shown:  # a probe changed READY: status reads the state file
            self.publish()

    def _shown(self) -> tuple[Any, ...]:
        return (self.phase, self.status_column(),
                tuple((run.state, run.ready, run.restarts) for run in self.runs.values()))

    def _terminated(self, run: ContainerRun, exit_code: int, reason: str) -> None:
        run.stop_workers()
        why = ("killed (SIGKILL)" if run.killed else
               run.liveness_failed or f"{run.spec.name} exited with {exit_code} ({reason or 'Error'})")
        run.killed = False
        delay = run.backoff.next_delay(time.monotonic() - run.started_at)
        run.state, run.ready, run.last_termination = "terminated", False, why
        run.reason = "CrashLoopBackOff" if delay else reason or "Error"
        run.restart_at = time.monotonic() + delay
        if run.spec.name == "wgcni-node":
            self.node.hook_pid = 0
        self.publish()

    def stop_probes(self) -> None:
        for run in self.runs.values():
            run.stop_workers()

    # ---- status -------------------------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        return self.carried_restarts + sum(run.restarts for run in self.runs.values())

    def status_column(self) -> str:
        """kubectl's STATUS of the pod."""
        total_init = len(self.template.init_containers)
        if self.phase == "failed":
            return "Init:Error" if self.init_done < total_init else "Error"
        if self.phase in ("pending", "init"):
            return f"Init:{self.init_done}/{total_init}" if total_init else "ContainerCreating"
        waiting = [run.reason for run in self.runs.values() if run.state != "running" and run.reason]
        if waiting:
            return waiting[0]
        return "Running"

    def report(self) -> dict[str, Any]:
        """The pod as `status --json` shows it: kubectl's READY, STATUS, RESTARTS and AGE, and per container."""
        now = time.monotonic()
        containers = {}
        with self.cri() as cri:
            for name, run in self.runs.items():
                pid = 0
                if run.id and run.state == "running":
                    try:
                        pid = cri.container_status(run.id).pid
                    except CriError:
                        pid = 0
                containers[name] = pid
        ready = sum(run.ready and run.state == "running" for run in self.runs.values())
        waiting = max((max(0.0, run.restart_at - now) for run in self.runs.values() if run.state == "terminated"),
                      default=0.0)
        state = "restarting" if self.phase == "running" and any(
            run.state == "terminated" or run.coming_back for run in self.runs.values()) else self.phase
        return {
            "runtime": self.runtime_kind, "image": self.template.containers[0].image, "state": state,
            "status": self.status_column(), "ready": f"{ready}/{len(self.runs)}", "restarts": self.restarts,
            "created_at": self.created_at, "pid": containers.get("wgcni-node", 0), "containers": containers,
            "container_status": {name: {"state": run.state, "ready": run.ready, "restarts": run.restarts,
                                        "reason": run.reason, "last_termination": run.last_termination,
                                        "id": run.id}
                                 for name, run in self.runs.items()},
            "last_termination": "; ".join(run.last_termination for run in self.runs.values() if run.last_termination),
            "reason": "CrashLoopBackOff" if waiting else "", "restart_in_seconds": round(waiting, 1),
        }

    def publish(self) -> None:
        self.shown = self._shown()
        self.node.daemonset = self.report()
        self.state.save()

    def fail(self, why: str) -> None:
        """The pod could not be started: tear down what was made of it; the lab's caller reports `why`."""
        self.stop_probes()
        self.phase = "failed"
        self.retry_at = time.monotonic() + self.retry_backoff.next_delay(time.monotonic() - self.started_at)
        self.runs = {name: ContainerRun(run.spec, run.backoff, restarts=run.restarts)
                     for name, run in self.runs.items()}
        for run in self.runs.values():
            run.last_termination = run.last_termination or why
        try:
            with self.cri() as cri:
                self._remove_old_sandboxes(cri)
        except CriError:
            pass
        self.node.hook_pid = 0
        self.publish()
