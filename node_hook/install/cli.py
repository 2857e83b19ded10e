"""The `wgcni-node install-cni` and `wgcni-node uninstall-cni` commands (registered by node_hook/cli.py): their
options, the plugin settings they resolve (explicit options, then the hook's config file, then the defaults), and
errors as one line on stderr with exit status 1."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from cni_plugin.cni import DEFAULT_HOOK_SOCKET, DEFAULT_LOG_FILE, DEFAULT_LOG_LEVEL, DEFAULT_STATE_DIR
from cni_plugin.filelog import LEVELS
from node_hook.install.errors import InstallError
from node_hook.install.installation import install, uninstall
from node_hook.install.settings import BUNDLED_PLUGIN, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, PluginSettings
from node_hook.install.watch import Watcher

LOG_LEVELS = tuple(LEVELS)

log = logging.getLogger(__name__)


def _directory_option(flag: str, default: Path, what: str) -> Callable:
    return click.option(flag, type=click.Path(path_type=Path), default=default, show_default=True, help=what)


def _fail(command: str, message: str) -> None:
    click.echo(f"wgcni-node {command}: error: {message}", err=True)
    sys.exit(1)


def _settings_from(config: Path | None, state_dir: str | None, hook_socket: str | None, log_file: str | None,
                   log_level: str | None) -> PluginSettings:
    """Plugin settings: explicit options win, then the hook's config file (so both agree), then the defaults."""
    defaults = PluginSettings()
    if config is not None:
        from node_hook.config import ConfigError, load_settings

        try:
            hook = load_settings(config)
        except ConfigError as error:
            raise InstallError(str(error)) from None
        defaults = PluginSettings(state_dir=str(hook.state_dir), hook_socket=str(hook.socket),
                                  log_file=defaults.log_file, log_level=hook.log_level)
    return PluginSettings(
        state_dir=state_dir or defaults.state_dir,
        hook_socket=hook_socket or defaults.hook_socket,
        log_file=log_file or defaults.log_file,
        log_level=log_level or defaults.log_level,
    )


@click.command("install-cni")
@_directory_option("--conf-dir", DEFAULT_CONF_DIR, "CNI config directory holding the Azure conflist")
@_directory_option("--bin-dir", DEFAULT_BIN_DIR, "CNI plugin directory")
@click.option("--plugin", type=click.Path(path_type=Path), default=BUNDLED_PLUGIN, show_default=True,
              help="the plugin to install: an executable or a PyInstaller one-directory bundle (the image's copy)")
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False),
              help="the hook's config file: stateDir, socket and logLevel are taken from it")
@click.option("--state-dir", help=f"plugin setting stateDir (pod records)  [default: {DEFAULT_STATE_DIR}]")
@click.option("--hook-socket", help=f"plugin setting hookSocket  [default: {DEFAULT_HOOK_SOCKET}]")
@click.option("--log-file", help=f"plugin setting logFile  [default: {DEFAULT_LOG_FILE}]")
@click.option("--log-level", type=click.Choice(LOG_LEVELS),
              help=f"plugin setting logLevel  [default: {DEFAULT_LOG_LEVEL}]")
@click.option("--watch", is_flag=True, help="keep running and re-insert the entry whenever the conf dir changes")
@click.option("--wait", is_flag=True,
              help="while the conflist is missing or not chainable yet (node boot, before Azure CNS wrote it), wait "
                   "for the conf dir to change and retry; exit once installed (the init container's mode)")
@click.option("--resync", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="with --watch: seconds between full re-checks besides change events")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="with --watch: polling period used only when inotify is unavailable")
def install_cni(conf_dir: Path, bin_dir: Path, plugin: Path, config: Path | None, state_dir: str | None,
                hook_socket: str | None, log_file: str | None, log_level: str | None, watch: bool, wait: bool,
                resync: float, poll_interval: float) -> None:
    """Install the wgcni plugin and chain it right after azure-vnet in the active conflist."""
    try:
        settings = _settings_from(config, state_dir, hook_socket, log_file, log_level)
        _strict_at_boot(settings.state_dir)
        if not (watch or wait):
            for change in install(conf_dir, bin_dir, plugin, settings) or ["already installed; nothing changed"]:
                click.echo(change)
            return
        if not conf_dir.is_dir():
            raise InstallError(f"{conf_dir} is not a directory; pass --conf-dir or mount it")
    except (InstallError, OSError) as error:
        _fail("install-cni", str(error))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    watcher = Watcher(conf_dir, bin_dir, plugin, settings, resync_interval=resync, poll_interval=poll_interval)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    log.info("watching %s (%s)", conf_dir, "inotify" if watcher.uses_inotify else f"polling every {poll_interval}s")
    if not watcher.run(until_installed=not watch):
        sys.exit(1)  # stopped by a signal before the entry could be installed


def _strict_at_boot(state_dir: str) -> None:
    """The init container runs first on a booting node: load the strict table where strict mode was on and the table
    is missing (cni_plugin/strict.py; the plugin does the same on ADD, the hook when it starts)."""
    from cni_plugin.cni import CniError
    from cni_plugin.strict import ensure_strict_table

    try:
        done, _hold = ensure_strict_table(state_dir)
    except CniError as error:
        log.warning("%s: %s", error.msg, error.details)
    else:
        if done:
            click.echo(done)


@click.command("uninstall-cni")
@_directory_option("--conf-dir", DEFAULT_CONF_DIR, "CNI config directory holding the Azure conflist")
@_directory_option("--bin-dir", DEFAULT_BIN_DIR, "CNI plugin directory")
def uninstall_cni(conf_dir: Path, bin_dir: Path) -> None:
    """Restore the conflists wgcni edited and remove the plugin."""
    try:
        changes = uninstall(conf_dir, bin_dir)
    except (InstallError, OSError) as error:
        _fail("uninstall-cni", str(error))
    for change in changes or ["not installed; nothing changed"]:
        click.echo(change)
