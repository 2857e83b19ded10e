"""The lab daemon: brings the lab up, serves the test API server and the control channel for as long as the lab
lives, supervises wgcni's DaemonSet pod on every node, and tears the lab down.

`wgcni-lab up` starts it and relays its progress lines (stdout) until it prints `ready` or `error: ...`. The
daemon is the parent of every long-lived lab process (node mount holders, containerds and their shims and pods,
the hooks) and a child subreaper, so it reaps them all: without it they would be orphans of PID 1, which does not
reap on every machine. While bringing up it dies with `up` (PR_SET_PDEATHSIG): `up` killed midway = the daemon tears
down what it made. Once up it detaches (its output goes to `<lab dir>/daemon.log`) and waits for SIGTERM from
`wgcni-lab down`, on which it stops the API server (its sockets in the node namespaces would keep them alive) and
removes everything (`wgcni_lab.lab.teardown`). Meanwhile it serves `<lab dir>/control.sock` (wgcni_lab.control):
`wgcni-lab hook|reboot|reimage|node-add|node-del|label` are requests the daemon carries out (wgcni_lab.lifecycle),
and every SUPERVISION_INTERVAL its supervision loop restarts a DaemonSet pod whose container exited, as kubelet.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cni_plugin.files import write_atomically
from wgcni_lab import control, fabric, lab, lifecycle, services
from wgcni_lab.apiserver.resources import NODES
from wgcni_lab.apiserver.server import ApiServer
from wgcni_lab.cleanup import reap_children
from wgcni_lab.polling import wait_until

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
READY = "ready"
SUPERVISION_INTERVAL = 0.2  # seconds between two looks of the supervision loop at the DaemonSet pods


class Stop(BaseException):
    """SIGTERM/SIGINT arrived: stop what is being done and tear down (a BaseException: no handler swallows it)."""


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def _raise_stop(*_: object) -> None:
    raise Stop()


def progress(message: str) -> None:
    print(message, flush=True)


def bring_up(cluster: lifecycle.Cluster, pods_before_install: int, pods_per_node: int) -> None:
    """Azure's fabric and the client VM, the API server, then every node booted as AKS provisions it (containerd,
    the azure conflist, kube-proxy's chains), the pods that predate wgcni, wgcni's DaemonSet on every node, then the
    other pods; returns once every hook has every peer."""
    state, api = cluster.state, cluster.api
    underlay = f"DF limit {fabric.DF_LIMIT} bytes" if state.azure_underlay else "no DF limit (--no-azure-underlay)"
    progress(f"lab {state.id} in {state.lab_dir}: Azure's VNet fabric in netns {state.vnet_netns} "
             f"(gateway MAC {fabric.GATEWAY_MAC}, {underlay})")
    fabric.create(state)
    fabric.attach_client(state)
    progress(f"{fabric.CLIENT_NAME}: netns {state.client_netns}, eth0 {fabric.CLIENT_IP}/{lab.VNET.prefixlen} "
             "(a VM in the VNet, outside the cluster)")
    api.start()
    state.apiserver_url = api.url
    state.save()
    write_atomically(state.path / lab.KUBECONFIG_FILE, (json.dumps(api.kubeconfig(), indent=2) + "\n").encode(),
                     0o600, temporary_prefix=f".{lab.KUBECONFIG_FILE}.", durable=False)
    progress(f"test API server: {api.url} (and 127.0.0.1:{lab.API_PORT_IN_NODE} in every node)")
    for node in state.nodes:
        api.store.create(NODES, lifecycle.node_object(node))
        cluster.boot_node(node, fresh_disk=True, pods_before_daemonset=pods_before_install)
    state.daemonset_installed = True
    state.save()
    for node in state.nodes:
        cluster.start_daemonset(node)
    for node in state.nodes:
        for _ in range(pods_per_node):
            pod = lab.add_pod(state, node.name)
            progress(f"{node.name}: pod {pod['name']} {pod['ip']} (CRI RunPodSandbox)")
    pods = lab.all_pods(state)
    wait_until(lambda: lab.mesh_converged(state, pods), 60, "every hook to program every peer", interval=0.1,
               error=lab.LabError)
    state.phase = "up"
    state.save()


def control_handlers(cluster: lifecycle.Cluster) -> dict[str, control.Handler]:
    """The requests `wgcni-lab` commands send over the control channel (wgcni_lab.control). Every change of the
    lab's state goes through here: the daemon is the one writer of state.json."""
    state = cluster.state
    return {
        "hook": lambda request: cluster.daemonset(request["node"], request["action"]),
        "reboot": lambda request: cluster.reboot(request["node"]),
        "containerd": lambda request: cluster.restart_containerd(request["node"]),
        "reimage": lambda request: cluster.reboot(request["node"], reimage=True),
        "node-add": lambda request: cluster.add_node(request.get("pods_before_install", 0)),
        "node-del": lambda request: cluster.delete_node(request["node"]),
        "label": lambda request: cluster.label(request["node"], request["key"], request.get("value")),
        "api": lambda request: cluster.api_access(request["node"], request["action"]),
        "api-fault": lambda request: cluster.api_fault(request["kind"], request.get("code", 500),
                                                       request.get("count", 1), request.get("downtime", 0.0)),
        "service-add": lambda request: services.service_json(services.add_service(
            state, request["name"], request["pods"], request["port"], request.get("node_port", 0),
            request.get("policy", ""))),
        "service-del": lambda request: services.service_json(services.delete_service(state, request["name"])),
    }


def serve(lab_dir: Path, nodes: int, pods_before_install: int, pods_per_node: int, plugin: Path, hook: Path,
          settings: dict[str, Any], restart_backoff: tuple[float, float], parent: int, azure_underlay: bool,
          daemonset_image: str = "", apiserver_node: str = "", mode: str = "node-subnet",
          ip_family: str = "ipv4") -> int:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if os.getppid() != parent:  # `up` died before the death signal was armed
        return 1
    lab_dir.mkdir(mode=0o700, parents=True)
    state = lab.new_state(lab_dir, nodes, plugin, hook, settings, restart_backoff, azure_underlay, mode, ip_family)
    state.daemonset_image = daemonset_image
    state.apiserver_node = apiserver_node
    state.daemon_pid = os.getpid()
    state.save()
    api = ApiServer(crds=[yaml.safe_load(lab.CRD_FILE.read_text())],
                    manifests=[doc for doc in yaml.safe_load_all(lab.RBAC_FILE.read_text()) if doc],
                    tls_dir=lab_dir / "apiserver-tls",
                    tls_hosts=[state.node(apiserver_node).ip] if apiserver_node else [])
    cluster = lifecycle.Cluster(state, api, progress)
    server: control.ControlServer | None = None
    try:
        try:
            bring_up(cluster, pods_before_install, pods_per_node)
        except lab.LabError as error:
            progress(f"error: {control.one_line(str(error))}")
            return 1
        except Exception as error:  # noqa: BLE001 - the one line `up` shows
            progress(f"error: {type(error).__name__}: {control.one_line(str(error))}")
            return 1
        server = control.ControlServer(lab_dir, control_handlers(cluster))
        progress(READY)
        _detach(lab_dir / "daemon.log")
        while True:
            with cluster.lock:  # never reap a child an operation is waiting for
                cluster.supervise()
                reap_children()
            time.sleep(SUPERVISION_INTERVAL)
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server is not None:
            server.stop()
        with cluster.lock:  # an operation still running on a control thread finishes first
            cluster.api.stop()
            for problem in lab.teardown(state):
                print(f"teardown: {problem}", file=sys.stderr, flush=True)
            reap_children()


def _detach(log_path: Path) -> None:
    """Stop dying with `up`; send further output to the log."""
    _prctl(PR_SET_PDEATHSIG, 0)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
