"""`wgcni-lab`: an AKS-like cluster with wgcni on one Linux machine (see wgcni_lab.lab for what it builds).

    wgcni-lab up [--nodes N] [--pods-per-node M]     bring the lab up (leaves it running); --pods-before-install K
                 [--setting KEY=VALUE ...]           pods made before wgcni is installed (no pod record), hook
                 [--no-azure-underlay]               settings merged into every node's config, no DF limit
    wgcni-lab status [--json]                        fabric, client, nodes (with wgcni's DaemonSet pod), pods and
                                                     services
    wgcni-lab pod-add NODE [--host-network]          create a pod the way kubelet does (prints its JSON)
    wgcni-lab pod-del POD                            delete a pod the way kubelet does (prints its JSON)
    wgcni-lab service-add NAME --pod POD... --port P [--node-port N] [--external-traffic-policy Cluster|Local]
    wgcni-lab service-del NAME                       a Service, programmed on every node as kube-proxy does
    wgcni-lab label NODE KEY=VALUE|KEY-              set / remove a label on the Node object
    wgcni-lab api deny|allow NODE                    the API server refuses (403) / takes NODE's hook's writes
    wgcni-lab hook NODE stop|start|kill              freeze / resume / kill the node's DaemonSet pod (kubelet,
                                                     that is the lab daemon, restarts a killed one)
    wgcni-lab reboot NODE / reimage NODE             reboot the node (OS disk kept) / reimage it (OS disk new)
    wgcni-lab node-add [--pods-before-install K]     scale the cluster up by one node (K pods before its DaemonSet)
    wgcni-lab node-del NODE                          remove a node
    wgcni-lab exec NODE|POD|client -- CMD...         run a host command in a node (its netns and mount namespace),
                                                     a pod or the client VM (its netns); exits with its exit code
    wgcni-lab capture [--seconds S]                  what enters Azure's fabric from the nodes and the client
    wgcni-lab down                                   remove everything, also after a crash or a half-finished up

Every error is one line on stderr and a non-zero exit code. The lab dir is /run/wgcni-lab (or $WGCNI_LAB_DIR, or
--lab-dir). hook, reboot, reimage, node-add, node-del, label, api, service-add and service-del are carried out by the
lab
daemon, the one writer of the lab's state (over its control socket, wgcni_lab.control; what they do:
wgcni_lab.lifecycle, wgcni_lab.services).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from wgcni_lab import control, fabric, lab, lifecycle, services
from wgcni_lab.cleanup import remove_tree

TEARDOWN_WAIT = 120.0  # seconds a failed `up` waits for the daemon to remove what it made
LAB_OWNED_SETTINGS = ("nodeName", "endpoint", "socket")  # each node's own (NODE_NAME, its route) / the lab's socket
REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "containerd", "containerd-shim-runc-v2", "runc", "ctr", "wireguard-go",
                  "wg", "nft", "gcc")


class LabGroup(click.Group):
    """Turns LabError (and OSError) into one line on stderr instead of a traceback; output cut short by a closed pipe
    (`wgcni-lab status | head`) ends quietly, as a shell tool does."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except lab.LabError as error:
            raise click.ClickException(str(error)) from None
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
            ctx.exit(1)
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            raise click.ClickException(f"{error.strerror or error}{where}") from None


@click.group(cls=LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lab-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help=f"the lab's state directory  [default: ${lab.LAB_DIR_ENV} or {lab.DEFAULT_LAB_DIR}]")
@click.pass_context
def cli(ctx: click.Context, lab_dir: Path | None) -> None:
    """wgcni-lab: an AKS-like cluster with wgcni in network namespaces on this machine."""
    ctx.obj = (lab_dir or lab.lab_dir_from_environment()).absolute()


def _preflight(plugin: Path, hook: Path) -> None:
    if os.geteuid() != 0:
        raise lab.LabError("the lab creates namespaces and mounts: run it as root")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise lab.LabError(f"missing tools: {', '.join(missing)} (run `make deps`)")
    if not (plugin / "wgcni").is_file() and not (plugin.is_file() and os.access(plugin, os.X_OK)):
        raise lab.LabError(f"plugin {plugin} not found: run `make build` (or pass --plugin)")
    if not (hook.is_file() and os.access(hook, os.X_OK)):
        raise lab.LabError(f"hook {hook} not found: run `make build` (or pass --hook)")
    from wgcni_lab.containerd import REFERENCE_PLUGIN_DIR, REFERENCE_PLUGINS

    for name in REFERENCE_PLUGINS:
        if not (REFERENCE_PLUGIN_DIR / name).exists():
            raise lab.LabError(f"{REFERENCE_PLUGIN_DIR / name} missing: install containernetworking-plugins")


def parse_settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`KEY=VALUE` hook settings (file keys, VALUE a YAML scalar), validated as the hook validates its config."""
    import yaml

    from node_hook.config import ConfigError, settings_from_mapping

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            raise lab.LabError(f"--setting {pair!r}: give KEY=VALUE, e.g. --setting logLevel=debug")
        if key in LAB_OWNED_SETTINGS:
            raise lab.LabError(f"--setting {key}: the lab sets it itself")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise lab.LabError(f"--setting {pair!r}: the value is not a YAML scalar") from None
        if isinstance(value, (dict, list)):
            raise lab.LabError(f"--setting {pair!r}: the value must be a scalar, not a YAML {type(value).__name__}")
        settings[key] = value
    try:
        settings_from_mapping(lab.hook_config(True, settings))
    except ConfigError as error:
        raise lab.LabError(f"--setting: {error}") from None
    return settings


@cli.command()
@click.option("--nodes", type=click.IntRange(1, lab.MAX_NODES), default=3, show_default=True)
@click.option("--pods-per-node", type=click.IntRange(0, lab.MAX_PODS), default=2, show_default=True)
@click.option("--pods-before-install", type=click.IntRange(0, lab.MAX_PODS), default=0, show_default=True,
              help="pods per node made before wgcni's DaemonSet is installed (they have no pod record)")
@click.option("--setting", "settings", multiple=True, metavar="KEY=VALUE",
              help="a hook setting (config.yaml key, YAML scalar value) for every node; repeatable")
@click.option("--restart-backoff", type=click.FloatRange(min=0), default=lab.KUBELET_RESTART_BACKOFF[0],
              show_default=True,
              help="seconds before the second restart of a crashing DaemonSet pod, doubling (kubelet: 10)")
@click.option("--restart-backoff-max", type=click.FloatRange(min=0), default=lab.KUBELET_RESTART_BACKOFF[1],
              show_default=True,
              help="the cap of that delay (kubelet: 300)")
@click.option("--plugin", type=click.Path(path_type=Path), default=lab.DEFAULT_PLUGIN, show_default=True,
              help="the wgcni plugin (bundle dir or file) install-cni puts on each node")
@click.option("--hook", type=click.Path(path_type=Path), default=lab.DEFAULT_HOOK, show_default=True,
              help="the wgcni-node executable each node runs")
@click.option("--timeout", type=click.FloatRange(min=10), default=300, show_default=True,
              help="seconds until a lab that is not up yet is given up (and removed)")
@click.option("--no-azure-underlay", is_flag=True,
              help="no DF limit of 1400 bytes in the fabric and `azure: false` in the hooks (auto MTU 1440)")
@click.option("--daemonset-runtime", type=click.Choice(["auto", "containerd", "processes"]), default="auto",
              show_default=True,
              help="containerd: conf/daemonset.yaml run from the wgcni image (`make image`, built if needed) through "
                   "each node's containerd; processes: the bundles of dist/ as bare processes; auto: containerd when "
                   "mmdebstrap and buildah are installed")
@click.option("--apiserver-on", metavar="NODE", default="",
              help="serve the API server on this node's IP (a self-managed control plane, inside the addresses "
                   "host encryption covers) instead of on loopback in every node (AKS's managed API server)")
@click.option("--mode", type=click.Choice(lab.MODES), default="node-subnet", show_default=True,
              help="Azure CNI's: pod IPs from the VNet subnet (node-subnet) or from a /24 per node of the pod CIDR "
                   f"{lab.OVERLAY_POD_CIDR}, routed to the node by the fabric (overlay)")
@click.option("--ip-family", type=click.Choice(lab.IP_FAMILIES), default="ipv4", show_default=True,
              help=f"dual: every node and pod has an IPv6 address too (the VNet's {lab.VNET6}; overlay pods: a "
                   f"/{lab.OVERLAY_NODE_PREFIX6} per node of {lab.OVERLAY_POD_CIDR6})")
@click.pass_obj
def up(lab_dir: Path, nodes: int, pods_per_node: int, pods_before_install: int, settings: tuple[str, ...],
       restart_backoff: float, restart_backoff_max: float, plugin: Path, hook: Path, timeout: float,
       no_azure_underlay: bool, daemonset_runtime: str, apiserver_on: str, mode: str, ip_family: str) -> None:
    """Bring the lab up and leave it running."""
    plugin, hook = plugin.absolute(), hook.absolute()
    if pods_before_install + pods_per_node > lab.MAX_PODS:
        raise lab.LabError(f"--pods-before-install + --pods-per-node is more than a node's {lab.MAX_PODS} pod IPs")
    if restart_backoff_max < restart_backoff:
        raise lab.LabError("--restart-backoff-max is below --restart-backoff")
    if apiserver_on and apiserver_on not in lab.node_names(nodes):
        raise lab.LabError(f"--apiserver-on {apiserver_on}: no such node (nodes: {', '.join(lab.node_names(nodes))})")
    hook_settings = parse_settings(settings)
    _preflight(plugin, hook)
    if lab.load_state(lab_dir) is not None or lab_dir.exists():
        raise lab.LabError(f"a lab already exists in {lab_dir}: `wgcni-lab down` first, or run a second lab beside it "
                           f"with another --lab-dir (or ${lab.LAB_DIR_ENV})")
    image_archive = _daemonset_image(daemonset_runtime)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(lab_dir), "daemon", "--nodes", str(nodes),
         "--pods-per-node", str(pods_per_node), "--pods-before-install", str(pods_before_install),
         "--settings-json", json.dumps(hook_settings), "--restart-backoff", f"{restart_backoff}:{restart_backoff_max}",
         "--plugin", str(plugin), "--hook", str(hook), "--parent", str(os.getpid()),
         "--daemonset-image", image_archive, "--apiserver-on", apiserver_on, "--mode", mode,
         "--ip-family", ip_family,
         *(["--no-azure-underlay"] if no_azure_underlay else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    started = time.monotonic()
    timed_out = threading.Event()

    def give_up() -> None:
        timed_out.set()
        daemon.terminate()  # SIGTERM: the daemon removes what it made and exits

    watchdog = threading.Timer(timeout, give_up)
    watchdog.start()
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            line = line.rstrip("\n")
            if line == "ready":
                click.echo(f"lab up in {time.monotonic() - started:.1f}s: `wgcni-lab status`; "
                           "remove with `wgcni-lab down`")
                return
            if line.startswith("error: "):
                _await_teardown(daemon, lab_dir)
                raise lab.LabError(f"up failed (everything it made is removed): {line[len('error: '):]}")
            click.echo(line)
    finally:
        watchdog.cancel()
    _await_teardown(daemon, lab_dir)
    if timed_out.is_set():
        raise lab.LabError(f"the lab was not up within {timeout:g}s (everything it made is removed); see --timeout")
    raise lab.LabError(f"the lab daemon exited ({daemon.returncode}) before the lab was up")


def _daemonset_image(choice: str) -> str:
    """The image archive the DaemonSet runs from ("" = bare processes), said on one line either way."""
    from wgcni_lab import image

    missing = image.missing_tools()
    if choice == "processes" or (choice == "auto" and missing):
        why = "--daemonset-runtime processes" if choice == "processes" else (
            f"{', '.join(missing)} not installed, so no image: `make deps` installs them")
        click.echo(f"DaemonSet: the bundles of dist/ as bare processes ({why})")
        return ""
    started = time.monotonic()
    try:
        built = image.build_image()
    except image.ImageError as error:
        raise lab.LabError(f"--daemonset-runtime {choice}: {error}") from None
    click.echo(f"DaemonSet: conf/daemonset.yaml from {built.name} through each node's containerd "
               f"(image {built.archive.parent.name}, {time.monotonic() - started:.1f}s)")
    return str(built.archive)


def _await_teardown(daemon: subprocess.Popen[str], lab_dir: Path) -> None:
    """Wait for a failed `up`'s daemon to remove what it made and exit; a LabError if it has not after
    TEARDOWN_WAIT."""
    try:
        daemon.wait(TEARDOWN_WAIT)
    except subprocess.TimeoutExpired:
        raise lab.LabError(f"the lab daemon (pid {daemon.pid}) did not remove the lab in {lab_dir} within "
                           f"{TEARDOWN_WAIT:g}s: `wgcni-lab --lab-dir {lab_dir} down` removes what is left") from None


@cli.command(hidden=True)
@click.option("--nodes", type=int, required=True)
@click.option("--pods-per-node", type=int, required=True)
@click.option("--pods-before-install", type=int, required=True)
@click.option("--settings-json", required=True)
@click.option("--restart-backoff", required=True, help="FIRST:CAP seconds")
@click.option("--plugin", type=click.Path(path_type=Path), required=True)
@click.option("--hook", type=click.Path(path_type=Path), required=True)
@click.option("--parent", type=int, required=True)
@click.option("--no-azure-underlay", is_flag=True)
@click.option("--daemonset-image", default="")
@click.option("--apiserver-on", default="")
@click.option("--mode", default="node-subnet")
@click.option("--ip-family", default="ipv4")
@click.pass_obj
def daemon(lab_dir: Path, nodes: int, pods_per_node: int, pods_before_install: int, settings_json: str,
           restart_backoff: str, plugin: Path, hook: Path, parent: int, no_azure_underlay: bool,
           daemonset_image: str, apiserver_on: str, mode: str, ip_family: str) -> None:
    """The lab daemon (started by `up`)."""
    from wgcni_lab.daemon import serve

    first, cap = (float(part) for part in restart_backoff.split(":"))
    sys.exit(serve(lab_dir, nodes, pods_before_install, pods_per_node, plugin, hook, json.loads(settings_json),
                   (first, cap), parent, azure_underlay=not no_azure_underlay, daemonset_image=daemonset_image,
                   apiserver_node=apiserver_on, mode=mode, ip_family=ip_family))


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status(lab_dir: Path, as_json: bool) -> None:
    """Fabric, client, nodes, pods and services of the lab."""
    state = lab.require_state(lab_dir)
    report = lab.status(state)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    underlay = "DF limit 1400" if report["azure_underlay"] else "no DF limit"
    click.echo(f"lab {state.id} ({report['phase']}): VNet {report['subnet']} on Azure's fabric (netns "
               f"{report['fabric_netns']}, gateway MAC {report['gateway_mac']}, {underlay}), "
               f"API server {report['apiserver'] or '-'}")
    pod_ips = f"a /24 per node of {report['pod_cidr']}" if report["mode"] == "overlay" else "secondary IPs of the VNet"
    if report["ip_family"] == "dual":
        overlay = report["mode"] == "overlay"
        pod_ips += (f" and a /{lab.OVERLAY_NODE_PREFIX6} per node of {report['pod_cidr6']}" if overlay
                    else f" in {report['subnet6']} too")
        click.echo(f"dual-stack: IPv6 VNet {report['subnet6']}, gateway {report['gateway6']}")
    click.echo(f"pod IPs: {report['mode']}, {pod_ips}")
    client = report["client"]
    click.echo(f"client {' '.join(client['ips'])} (netns {client['netns']}): `wgcni-lab exec client -- CMD`")
    click.echo("")
    click.echo(_table([("NODE", "IP", "NETNS", "WIREGUARD", "DAEMONSET", "RESTARTS", "HOOK SOCKET")] + [
        (node["name"], " ".join(node["ips"]), node["netns"], f"{node['wg_interface']}:{node['wg_port']}",
         node["daemonset"].get("reason") or node["daemonset"].get("state", "-"),
         str(node["daemonset"].get("restarts", 0)), node["hook_socket"])
        for node in report["nodes"]]))
    click.echo("")
    click.echo(_table([("DAEMONSET POD", "NODE", "READY", "STATUS", "RESTARTS", "AGE", "RUNTIME")] + [
        (f"wgcni-node-{node['name']}", node["name"], node["daemonset"].get("ready", "0/2"),
         node["daemonset"].get("status", "Pending"), str(node["daemonset"].get("restarts", 0)),
         _age(node["daemonset"].get("created_at", 0.0)), node["daemonset"].get("runtime", "-"))
        for node in report["nodes"]]))
    click.echo("")
    if report["pods"]:
        click.echo(_table([("POD", "NODE", "IP", "NETWORK", "NETNS")] + [
            (pod["name"], pod["node"], " ".join(pod["ips"]), _pod_network(pod), pod["netns"])
            for pod in report["pods"]]))
    else:
        click.echo("no pods (`wgcni-lab pod-add NODE`)")
    if report["services"]:
        click.echo("")
        click.echo(_table([("SERVICE", "CLUSTER-IP", "PORT", "NODE-PORT", "POLICY", "ENDPOINTS")] + [
            (service["name"], service["cluster_ip"], str(service["port"]), str(service["node_port"] or "-"),
             service["external_traffic_policy"] or "-",
             ",".join(f"{endpoint['pod']}({endpoint['ip']})" for endpoint in service["endpoints"]))
            for service in report["services"]]))
    for problem in report["problems"]:
        click.echo(f"problem: {problem}")


@cli.command()
@click.pass_obj
def kubeconfig(lab_dir: Path) -> None:
    """Print the kubeconfig for kubectl against the lab's API server, as the cluster's administrator:
    `wgcni-lab kubeconfig > lab.kubeconfig; kubectl --kubeconfig lab.kubeconfig get wireguardnodes`."""
    state = _require_up(lab_dir)
    try:
        click.echo((state.path / lab.KUBECONFIG_FILE).read_text(), nl=False)
    except OSError as error:
        raise lab.LabError(f"no kubeconfig in {state.path}: {error.strerror}") from None


def _age(created_at: float) -> str:
    """kubectl's AGE: seconds up to 2 minutes, then minutes up to 2 hours, then hours."""
    if not created_at:
        return "-"
    seconds = max(0, int(time.time() - created_at))
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def _pod_network(pod: dict[str, Any]) -> str:
    if pod["host_network"]:
        return "host"
    return "pod, before wgcni" if pod["predates_install"] else "pod"


def _require_up(lab_dir: Path) -> lab.LabState:
    state = lab.require_state(lab_dir)
    if state.phase != "up":
        raise lab.LabError(f"the lab in {lab_dir} is not up (phase {state.phase}): `wgcni-lab down`, then `up`")
    return state


@cli.command("pod-add")
@click.argument("node")
@click.option("--host-network", is_flag=True, help="a hostNetwork pod: the node's network namespace, no CNI call")
@click.pass_obj
def pod_add(lab_dir: Path, node: str, host_network: bool) -> None:
    """Create a pod on NODE (CRI RunPodSandbox) and print it as JSON."""
    click.echo(json.dumps(lab.add_pod(_require_up(lab_dir), node, host_network=host_network)))


@cli.command("pod-del")
@click.argument("pod")
@click.pass_obj
def pod_del(lab_dir: Path, pod: str) -> None:
    """Delete POD (CRI StopPodSandbox + RemovePodSandbox) and print it as JSON."""
    click.echo(json.dumps(lab.delete_pod(_require_up(lab_dir), pod)))


@cli.command("service-add")
@click.argument("name")
@click.option("--pod", "pods", multiple=True, required=True, help="an endpoint (repeat for more)")
@click.option("--port", type=int, required=True, help="the Service port, also the pods' target port")
@click.option("--node-port", type=int, default=0, help="make it a NodePort Service on this port (30000-32767)")
@click.option("--external-traffic-policy", type=click.Choice(services.POLICIES), default=None,
              help="for a NodePort Service  [default: Cluster]")
@click.pass_obj
def service_add(lab_dir: Path, name: str, pods: tuple[str, ...], port: int, node_port: int,
                external_traffic_policy: str | None) -> None:
    """Add the Service NAME over PODs, programmed on every node as kube-proxy does; print it as JSON."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "service-add", name=name, pods=list(pods), port=port,
                                      node_port=node_port, policy=external_traffic_policy or "")))


@cli.command("service-del")
@click.argument("name")
@click.pass_obj
def service_del(lab_dir: Path, name: str) -> None:
    """Delete the Service NAME and its rules on every node; print it as JSON."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "service-del", name=name)))


@cli.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(lab_dir: Path, target: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a node (network + mount namespace), a pod or the client (network namespace); exit with its
    code."""
    if command[:1] == ("--",):
        command = command[1:]
    if not command:
        raise lab.LabError("exec: give a command after --, e.g. `wgcni-lab exec node-1 -- wg show`")
    state = _require_up(lab_dir)
    if target in {node.name for node in state.nodes}:
        argv, env = [*lab.node_enter_argv(state.node(target)), *command], lab.node_env()
    elif target == fabric.CLIENT_NAME:
        argv, env = ["nsenter", f"--net=/run/netns/{state.client_netns}", "--", *command], dict(os.environ)
    else:
        _, pod = lab.find_pod(state, target)
        argv, env = ["nsenter", f"--net={pod['netns']}", "--", *command], dict(os.environ)
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        raise lab.LabError(f"cannot run nsenter: {error.strerror}") from None


@cli.command()
@click.option("--seconds", type=click.FloatRange(0.5, 600), default=3.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per packet")
@click.pass_obj
def capture(lab_dir: Path, seconds: float, as_json: bool) -> None:
    """Capture what enters Azure's fabric from the nodes and the client for SECONDS (IP packets, each once, on
    its sender's link; ARP left out) and print it. Says "capturing on ..." on stderr once tcpdump listens; SIGINT
    or SIGTERM ends it early (what it has is printed)."""
    from wgcni_lab.wire import capture_fabric

    def listening() -> None:
        click.echo(f"capturing on the fabric for {seconds:g}s", err=True)  # callers wait for this line

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    packets = capture_fabric(_require_up(lab_dir), seconds, listening, stop)
    for packet in packets:
        click.echo(json.dumps(packet) if as_json else packet["line"])
    if not as_json:
        click.echo(f"{len(packets)} packets in {seconds:g}s on the fabric", err=True)


def _ask_daemon(lab_dir: Path, op: str, **arguments: Any) -> Any:
    _require_up(lab_dir)
    return control.request(lab_dir, op, **arguments)


@cli.command()
@click.argument("node")
@click.argument("change", metavar="KEY=VALUE|KEY-")
@click.pass_obj
def label(lab_dir: Path, node: str, change: str) -> None:
    """Set (KEY=VALUE) or remove (KEY-) a label on NODE's Node object; prints the Node's labels as JSON."""
    key, value = lifecycle.parse_label(change)
    click.echo(json.dumps(_ask_daemon(lab_dir, "label", node=node, key=key, value=value)))


@cli.command()
@click.argument("action", type=click.Choice(["deny", "allow"]))
@click.argument("node")
@click.pass_obj
def api(lab_dir: Path, action: str, node: str) -> None:
    """deny: the lab's API server answers every write of NODE's hook with 403 Forbidden (as RBAC or the admission
    policy would refuse it; NODE may be one `node-add` will make); allow: it takes them again."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "api", node=node, action=action)))


@cli.command("api-fault")
@click.argument("kind", type=click.Choice(lifecycle.API_FAULTS))
@click.option("--code", type=click.Choice([str(code) for code in lifecycle.API_ERROR_METHODS]), default="500",
              show_default=True, help="error: the HTTP status (409 writes only, 410 reads only)")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="error: how many of the hooks' requests get it")
@click.option("--downtime", type=click.FloatRange(min=0, max=60), default=0.0, show_default=True,
              help="restart: seconds the API server is away")
@click.pass_obj
def api_fault(lab_dir: Path, kind: str, code: str, count: int, downtime: float) -> None:
    """Make the lab's API server fail the hooks: `error` answers their next requests with an HTTP error, `cut-watches`
    aborts every watch, `drop-connections` every connection, `restart` restarts it and loses its history."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "api-fault", kind=kind, code=int(code), count=count,
                                      downtime=downtime)))


@cli.command()
@click.argument("node")
@click.argument("action", type=click.Choice(["stop", "start", "kill"]))
@click.pass_obj
def hook(lab_dir: Path, node: str, action: str) -> None:
    """stop (SIGSTOP), start (SIGCONT) or kill (SIGKILL) NODE's wgcni DaemonSet pod: the hook with its wireguard-go
    and install-cni --watch. A killed pod is restarted as kubelet does: init container, then containers."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "hook", node=node, action=action)))


@cli.command()
@click.argument("node")
@click.argument("action", type=click.Choice(["restart"]))
@click.pass_obj
def containerd(lab_dir: Path, node: str, action: str) -> None:
    """restart: NODE's containerd restarts (as `systemctl restart containerd`) while its pods run on; it recovers
    them, and later CNI DELs find their network namespaces."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "containerd", node=node)))


@cli.command()
@click.argument("node")
@click.pass_obj
def reboot(lab_dir: Path, node: str) -> None:
    """Reboot NODE: its processes, network namespace and /run are lost, its OS disk (/etc, /opt, /var/lib, /var/log)
    kept; containerd, wgcni's DaemonSet and its pods come back. Returns once they are back."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "reboot", node=node)))


@cli.command()
@click.argument("node")
@click.pass_obj
def reimage(lab_dir: Path, node: str) -> None:
    """Reimage NODE: a reboot with a new OS disk (a new WireGuard key, the CNI files provisioned again)."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "reimage", node=node)))


@cli.command("node-add")
@click.option("--pods-before-install", type=click.IntRange(0, lab.MAX_PODS), default=0, show_default=True,
              help="pods that start on the new node before its DaemonSet pod has chained wgcni (no pod record)")
@click.pass_obj
def node_add(lab_dir: Path, pods_before_install: int) -> None:
    """Add a node (the next name, its own node IP and pod IPs) with its Node object, and boot it."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "node-add", pods_before_install=pods_before_install)))


@cli.command("node-del")
@click.argument("node")
@click.pass_obj
def node_del(lab_dir: Path, node: str) -> None:
    """Remove NODE: its pods (CNI DEL), processes, namespaces and directories, and its Node object."""
    click.echo(json.dumps(_ask_daemon(lab_dir, "node-del", node=node)))


@cli.command()
@click.pass_obj
def down(lab_dir: Path) -> None:
    """Remove the lab: processes, namespaces, mounts, cgroups, state. Idempotent."""
    state = lab.load_state(lab_dir)
    if state is None:
        if lab_dir.exists():
            remove_tree(lab_dir)
        click.echo(f"no lab in {lab_dir}: nothing to remove")
        return
    _stop_daemon(state)
    problems = lab.teardown(state)
    if problems:
        raise lab.LabError("down left something behind: " + "; ".join(problems))
    click.echo(f"lab {state.id} removed")


def _stop_daemon(state: lab.LabState, timeout: float = 60.0) -> None:
    """Ask the lab daemon to tear down (SIGTERM) and wait for it; kill it if it does not finish."""
    pid = state.daemon_pid
    if not pid or not lab.is_lab_daemon(pid, state):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while lab.is_lab_daemon(pid, state):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error (usage or operation) is one line on stderr, exit code 2 for usage, else 1."""
    try:
        cli.main(args=argv, prog_name="wgcni-lab", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("wgcni-lab: aborted", err=True)
        sys.exit(1)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "wgcni-lab"
        click.echo(f"wgcni-lab: {error.format_message()} (see '{command} --help')", err=True)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"wgcni-lab: {error.format_message()}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
