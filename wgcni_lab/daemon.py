"""The lab daemon: brings the lab up, serves the test API server for as long as the lab lives, and tears it down.

`wgcni-lab up` starts it and relays its progress lines (stdout) until it prints `ready` or `error: ...`. The
daemon is the parent of every long-lived lab process (node mount holders, containerds and their shims and pods,
the hooks) and a child subreaper, so it reaps them all: without it they would be orphans of PID 1, which does not
reap on every machine. While bringing up it dies with `up` (PR_SET_PDEATHSIG): `up` killed midway = the daemon tears
down what it made. Once up it detaches (its output goes to `<lab dir>/daemon.log`) and waits for SIGTERM from
`wgcni-lab down`, on which it stops the API server (its sockets in the node namespaces would keep them alive) and
removes everything (`wgcni_lab.lab.teardown`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from wgcni_lab import fabric, lab, services
from wgcni_lab.apiserver import NODES, ApiServer, NamespacedListener
from wgcni_lab.polling import wait_until

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
READY = "ready"


class Stop(BaseException):
    """SIGTERM/SIGINT arrived: stop what is being done and tear down (a BaseException: no handler swallows it)."""


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def _raise_stop(*_: object) -> None:
    raise Stop()


def one_line(message: str) -> str:
    """A multi-line message (e.g. with a log tail) as one line: its first and last lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else "(no message)"


def progress(message: str) -> None:
    print(message, flush=True)


def node_object(node: lab.NodeState) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                                                   "kubernetes.azure.com/role": "agent"}},
        "status": {"addresses": [{"type": "InternalIP", "address": node.ip},
                                 {"type": "Hostname", "address": node.name}]},
    }


def bring_up(state: lab.LabState, pods_per_node: int) -> ApiServer:
    underlay = f"DF limit {fabric.DF_LIMIT} bytes" if state.azure_underlay else "no DF limit (--no-azure-underlay)"
    progress(f"lab {state.id} in {state.lab_dir}: Azure's VNet fabric in netns {state.vnet_netns} "
             f"(gateway MAC {fabric.GATEWAY_MAC}, {underlay})")
    fabric.create(state)
    for node in state.nodes:
        lab.create_node_network(state, node)
        lab.start_node_mounts(state, node)
        services.program_node(state, node)
        progress(f"{node.name}: netns {node.netns}, eth0 {node.ip}/{lab.VNET.prefixlen}, private mount namespace, "
                 "kube-proxy chains")
    fabric.attach_client(state)
    progress(f"{fabric.CLIENT_NAME}: netns {state.client_netns}, eth0 {fabric.CLIENT_IP}/{lab.VNET.prefixlen} "
             "(a VM in the VNet, outside the cluster)")
    crd = yaml.safe_load(lab.CRD_FILE.read_text())
    api = ApiServer(crds=[crd], also_listen=[NamespacedListener(node.netns, "127.0.0.1", lab.API_PORT_IN_NODE)
                                             for node in state.nodes])
    api.start()
    for node in state.nodes:
        api.store.create(NODES, node_object(node))
    state.apiserver_url = api.url
    state.save()
    progress(f"test API server: {api.url} (and 127.0.0.1:{lab.API_PORT_IN_NODE} in every node)")
    runtimes = {}
    for node in state.nodes:
        lab.prepare_node_cni(node)
        runtime = lab.node_containerd(state, node)
        runtime.start()
        runtimes[node.name] = runtime
        lab.write_node_config(state, node)
        lab.install_cni(state, node)
        progress(f"{node.name}: containerd (CRI) up, wgcni installed after azure-vnet in /etc/cni/net.d")
    hooks = {node.name: lab.start_node_agents(state, node) for node in state.nodes}
    for node in state.nodes:
        lab.wait_hook_ready(state, node, hooks[node.name])
        lab.wait_chained(runtimes[node.name])
        progress(f"{node.name}: wgcni-node ready ({lab.WG_INTERFACE}, UDP {lab.WG_PORT}), host encryption on")
    for node in state.nodes:
        for _ in range(pods_per_node):
            pod = lab.add_pod(state, node.name)
            progress(f"{node.name}: pod {pod['name']} {pod['ip']} (CRI RunPodSandbox)")
    pods = lab.all_pods(state)
    wait_until(lambda: lab.mesh_converged(state, pods), 60, "every hook to program every peer", interval=0.1,
               error=lab.LabError)
    state.phase = "up"
    state.save()
    return api


def serve(lab_dir: Path, nodes: int, pods_per_node: int, plugin: Path, hook: Path, parent: int,
          azure_underlay: bool) -> int:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if os.getppid() != parent:  # `up` died before the death signal was armed
        return 1
    lab_dir.mkdir(mode=0o700, parents=True)
    state = lab.new_state(lab_dir, nodes, plugin, hook, azure_underlay)
    state.daemon_pid = os.getpid()
    state.save()
    api: ApiServer | None = None
    try:
        try:
            api = bring_up(state, pods_per_node)
        except lab.LabError as error:
            progress(f"error: {one_line(str(error))}")
            return 1
        except Exception as error:  # noqa: BLE001 - the one line `up` shows
            progress(f"error: {type(error).__name__}: {one_line(str(error))}")
            return 1
        progress(READY)
        _detach(lab_dir / "daemon.log")
        while True:
            _reap()
            time.sleep(0.5)
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if api is not None:
            api.stop()
        for problem in lab.teardown(state):
            print(f"teardown: {problem}", file=sys.stderr, flush=True)
        _reap()


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


def _reap() -> None:
    """Collect every exited child (including orphans handed to us as subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
