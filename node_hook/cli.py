"""`wgcni-node`: run the hook, clean up after it, show or rotate the key, install/uninstall the CNI plugin.

Errors are one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from node_hook.config import LIVE_SETTINGS, ConfigError, Settings, load_settings
from node_hook.install.cli import install_cni, uninstall_cni
from node_hook.logs import redact_everywhere, setup_logging
from node_hook.peers import PeerSource

if TYPE_CHECKING:
    from node_hook.node import Node  # the wiring pulls in netlink: only `run` imports it


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config) if config is not None else Settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


config_option = click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False),
                             help="settings file (YAML or JSON); defaults apply without one")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """wgcni-node: the node hook of wgcni (WireGuard for Azure CNI)."""


@main.command()
@config_option
def run(config: Path | None) -> None:
    """Run the hook until SIGTERM/SIGINT."""
    from node_hook.detect import DetectError, detect
    from node_hook.keys import KeyFileError, load_or_create
    from node_hook.local_api import ApiError, LocalApiServer
    from node_hook.metrics import HookMetrics, MetricsServer
    from node_hook.node import build_node

    settings = _settings(config)
    setup_logging(settings)
    log = logging.getLogger("wgcni-node")
    try:
        key = load_or_create(settings.key_file)
        environment = detect(settings)
    except (KeyFileError, DetectError, OSError) as error:
        raise click.ClickException(str(error)) from None
    redact_everywhere(key.private)
    source: PeerSource
    if settings.peers_file is not None:
        from node_hook.static_peers import StaticPeerSource

        source = StaticPeerSource(settings.peers_file, settings.announce_file)
    else:
        from node_hook.cluster import KubernetesPeerSource, api_client_from_environment

        try:
            source = KubernetesPeerSource(settings.node_name, api_client_from_environment())
        except Exception as error:  # noqa: BLE001 - kube config problems are one line for the operator
            raise click.ClickException(f"Kubernetes client: {error}") from None
    metrics = HookMetrics()
    node = build_node(settings, key, environment, source, observer=metrics)
    metrics.attach(node.view)
    server = LocalApiServer(settings.socket, node)
    metrics_server = MetricsServer(settings.metrics_address, metrics) if settings.metrics_address else None
    try:
        server.start()
    except (ApiError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if metrics_server is not None:
        try:
            metrics_server.start()
        except (OSError, ValueError) as error:
            server.stop()
            raise click.ClickException(f"metricsAddress {settings.metrics_address}: {error}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("node %s, public key %s, backend %s, interface %s, endpoint %s, mtu %d (%s), host encryption %s",
             settings.node_name, key.public_key, node.engine.appliers.wireguard.kind, settings.interface,
             environment.endpoint, environment.mtu, environment.mtu_reason, node.engine.host_encryption)
    node.start()
    follower = ConfigFollower(config, settings, node, log) if config is not None else None
    try:
        while not stop.wait(CONFIG_POLL_SECONDS):
            if follower is not None:
                follower.poll()
    finally:
        log.info("stopping")
        if metrics_server is not None:
            metrics_server.stop()
        server.stop()
        node.stop()


CONFIG_POLL_SECONDS = 5.0  # how often `run` re-reads its config file (a ConfigMap update lands within a minute)


class ConfigFollower:
    """Re-reads the config file of `run`: the strict settings are applied live, a change of any other setting is
    logged once as waiting for a restart, an invalid file once as ignored."""

    def __init__(self, config: Path, settings: Settings, node: Node, log: logging.Logger) -> None:
        self.config, self.seen, self.node, self.log = config, settings, node, log
        self.error = ""

    def poll(self) -> None:
        try:
            new = load_settings(self.config)
        except ConfigError as error:
            if str(error) != self.error:
                self.log.error("%s (the running settings stay in force)", error)
                self.error = str(error)
            return
        self.error = ""
        if new == self.seen:
            return
        later = [item.name for item in dataclasses.fields(Settings)
                 if item.name not in LIVE_SETTINGS and getattr(new, item.name) != getattr(self.seen, item.name)]
        if later:
            self.log.warning("%s changed: applied when the hook restarts", ", ".join(later))
        if any(getattr(new, name) != getattr(self.seen, name) for name in LIVE_SETTINGS):
            if new.strict_mode and not self.node.engine.host_encryption:
                self.log.error("strictMode: needs host encryption, which this hook runs without; restart it with "
                               "hostEncryption true")
            else:
                self.node.engine.strict_settings_changed(new)
                self.log.info("strict settings applied live: strictMode %s, strictCIDRs %s, strictAllow %s",
                              new.strict_mode, list(new.strict_cidrs) or "(the underlay subnets)",
                              list(new.strict_allow))
        self.seen = new


@main.command()
@config_option
def cleanup(config: Path | None) -> None:
    """Remove what the hook created (device, routes in its table, its rules, its nftables tables, the strict boot
    file) and restore the sysctls it changed. The key file and the pod records are kept."""
    from node_hook.apply.firewall import NftFirewall
    from node_hook.apply.routes import PyrouteRouting
    from node_hook.apply.sysctl import Sysctls
    from node_hook.engine import FIREWALL_TABLE
    from node_hook.local_api import request
    from node_hook.node import real_wireguard_backend
    from node_hook.strict import boot_file as strict_boot_file

    settings = _settings(config)
    try:
        request(settings.socket, {"op": "status"}, timeout=2)
    except (OSError, ValueError):
        pass
    else:
        raise click.ClickException(f"a hook is running on {settings.socket}: stop it first")
    problems: list[str] = []
    steps = (
        ("rules and routes", lambda: _flush_routing(PyrouteRouting(settings.route_table, settings.interface,
                                                                       settings.bypass_rule_priority))),
        ("device", lambda: _delete_device(real_wireguard_backend(settings, lambda code: None))),
        ("firewall", lambda: NftFirewall(FIREWALL_TABLE, boot_file=strict_boot_file(settings)).delete()),
        ("sysctls", lambda: Sysctls(settings.sysctl_originals_file).restore()),
    )
    for what, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001 - every step is attempted; each failure is one line
            problems.append(f"{what}: {error}")
    if problems:
        raise click.ClickException("; ".join(problems))
    click.echo(f"removed {settings.interface}, table {settings.route_table} routes and rules, "
               f"nftables tables inet {FIREWALL_TABLE} and inet {FIREWALL_TABLE}-strict (and its boot file); "
               "sysctls restored")


def _flush_routing(routing) -> None:  # type: ignore[no-untyped-def]
    try:
        routing.flush()
    finally:
        routing.close()


def _delete_device(backend) -> None:  # type: ignore[no-untyped-def]
    try:
        backend.delete_device()
    finally:
        backend.close()


@main.command("show-key")
@config_option
def show_key(config: Path | None) -> None:
    """Print this node's public key."""
    from node_hook.keys import KeyFileError, load_existing

    settings = _settings(config)
    try:
        click.echo(load_existing(settings.key_file).public_key)
    except KeyFileError as error:
        raise click.ClickException(str(error)) from None


@main.command("rotate-key")
@config_option
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait until the node uses the new key and the API holds it")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="seconds to wait at most")
def rotate_key(config: Path | None, wait: bool, timeout: float) -> None:
    """Replace this node's WireGuard key without cutting its connections: the running hook announces the next key,
    switches to it a few seconds later, and every peer follows (docs/design.md, key rotation)."""
    settings = _settings(config)
    started = time.monotonic()
    answer = _ask(settings.socket, {"op": "rotate-key"})
    old, new = answer["publicKey"], answer["nextPublicKey"]
    if new is None:  # switched between the question and the answer: nothing was left pending
        click.echo(f"key is {old[:8]}... (no rotation pending)")
        return
    click.echo(f"next key {new[:8]}... announced; switching from {old[:8]}... at "
               f"{time.strftime('%H:%M:%S', time.gmtime(answer['switchAt']))} UTC")
    if not wait:
        return
    deadline = started + timeout
    while time.monotonic() < deadline:
        status = _ask(settings.socket, {"op": "status"}, request_timeout=min(10.0, timeout))
        rotation = status["keyRotation"]
        if rotation["publicKey"] == new and status["publication"]["state"] == "confirmed":
            click.echo(f"key rotated: {old[:8]}... -> {new[:8]}... in {time.monotonic() - started:.1f} s; the API "
                       "holds the new key")
            return
        time.sleep(0.2)
    raise click.ClickException(f"the key did not switch within {timeout:.0f} s; see 'wgcni status' and the hook's log")


def _ask(socket_path: Path, payload: dict[str, object], request_timeout: float = 10.0) -> dict[str, Any]:
    """One local API request; its failure as a one-line CLI error."""
    from node_hook.local_api import request

    try:
        answer = request(socket_path, payload, timeout=request_timeout)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"no hook answers on {socket_path}: {error}") from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error")))
    return answer


main.add_command(install_cni)
main.add_command(uninstall_cni)


if __name__ == "__main__":
    main()
