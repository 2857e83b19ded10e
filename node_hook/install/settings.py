"""Names and defaults of an installation: the node's CNI directories, where the image keeps the plugin, the names
wgcni uses in those directories, and the settings it writes into the plugin's conflist entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cni_plugin.cni import DEFAULT_HOOK_SOCKET, DEFAULT_LOG_FILE, DEFAULT_LOG_LEVEL, DEFAULT_STATE_DIR

DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIR = Path("/opt/cni/bin")
# Where the DaemonSet image keeps the plugin (packaging/Dockerfile copies dist/bin/wgcni here): a PyInstaller
# one-directory bundle (a directory holding the `wgcni` executable) or a single executable file.
BUNDLED_PLUGIN = Path("/opt/wgcni/wgcni")

PLUGIN_TYPE = "wgcni"
TEMPORARY_PREFIX = ".wgcni-tmp."  # of every file, symlink and staging directory wgcni writes in the CNI dirs


@dataclass(frozen=True)
class PluginSettings:
    """The settings written into the wgcni entry of the conflist (read by the plugin on every ADD/DEL)."""

    state_dir: str = DEFAULT_STATE_DIR
    hook_socket: str = DEFAULT_HOOK_SOCKET
    log_file: str = DEFAULT_LOG_FILE
    log_level: str = DEFAULT_LOG_LEVEL

    def entry(self) -> dict[str, str]:
        """The conflist entry, "type" first."""
        return {
            "type": PLUGIN_TYPE,
            "stateDir": self.state_dir,
            "hookSocket": self.hook_socket,
            "logFile": self.log_file,
            "logLevel": self.log_level,
        }
