"""install and uninstall as a whole: the plugin before the conflist entry, both under the conf dir's lock.

The conflist edit is planned (and refused) before anything is touched, and the plugin goes in before the entry, so a
conflist never names a plugin that is not there yet. The lock is an flock on the conf dir itself: the init container
and the watcher never interleave, and no file is added to a directory the runtime reads. Azure CNS takes no lock, so
a file that changed between the plan and the write is planned again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node_hook.install.conflist_files import apply_conflist, plan_conflist, restore_conflists
from node_hook.install.conflist_text import AZURE_TYPE
from node_hook.install.errors import InstallError
from node_hook.install.plugin_files import install_plugin, remove_plugin
from node_hook.install.settings import PLUGIN_TYPE, PluginSettings


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise installers working on the same directory (init container vs watcher) without adding a file to it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_REPLAN_ATTEMPTS = 5


def install(conf_dir: Path, bin_dir: Path, plugin: Path, settings: PluginSettings) -> list[str]:
    """Install the plugin and the conflist entry; returns what changed (empty: all was in place)."""
    for directory in (conf_dir, bin_dir):
        if not directory.is_dir():
            raise InstallError(f"{directory} is not a directory; pass --conf-dir/--bin-dir or mount it")
    changes: list[str] = []
    entry = settings.entry()
    with _locked(conf_dir):
        plan = plan_conflist(conf_dir, entry)  # refuse before touching anything
        if install_plugin(plugin, bin_dir):
            changes.append(f"installed plugin {bin_dir / PLUGIN_TYPE}")
        for _ in range(_REPLAN_ATTEMPTS):
            if apply_conflist(plan):
                break
            plan = plan_conflist(conf_dir, entry)  # the owner rewrote the file between our read and write
        else:
            raise InstallError(f"{plan.path} kept changing while wgcni tried to edit it; try again")
        if plan.new_text is not None:
            changes.append(f"inserted wgcni after {AZURE_TYPE} in {plan.path}")
    return changes


def uninstall(conf_dir: Path, bin_dir: Path) -> list[str]:
    """Take wgcni out of every conflist it is in (restoring originals) and remove the plugin; returns what changed."""
    changes: list[str] = []
    if conf_dir.is_dir():
        with _locked(conf_dir):
            changes.extend(restore_conflists(conf_dir))
    if bin_dir.is_dir() and remove_plugin(bin_dir):
        changes.append(f"removed plugin {bin_dir / PLUGIN_TYPE}")
    return changes
