"""install-cni --watch: the wgcni entry comes back whenever Azure CNS rewrites or replaces the conflist."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import node_hook.install.watch as installer
from node_hook.install.conflist_files import BACKUP_SUFFIX
from node_hook.install.settings import PluginSettings
from node_hook.install.watch import Watcher
from wgcni_lab.harness.polling import wait_until

DATA = Path(__file__).parents[1] / "cni" / "data"  # the AKS conflists, shared with the plugin's tests
DEADLINE = 10.0  # seconds; the watcher normally reacts within milliseconds (inotify) or one poll interval


def _chained(path: Path) -> bool:
    """The file is valid JSON with wgcni right after azure-vnet."""
    try:
        types = [plugin["type"] for plugin in json.loads(path.read_text())["plugins"]]
    except (OSError, ValueError):
        return False
    return "azure-vnet" in types and types[types.index("azure-vnet") + 1 : types.index("azure-vnet") + 2] == ["wgcni"]


def _wait_for(condition, what: str) -> None:
    wait_until(condition, DEADLINE, what, interval=0.005)


@pytest.fixture(params=["inotify", "polling"])
def watched_node(request, node, monkeypatch):
    """A node's CNI dirs with the watcher running in a thread; stopped and joined whatever the test does."""
    if request.param == "polling":  # inotify unavailable: the watcher must fall back to polling
        def no_inotify(*_args, **_kwargs):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(installer.ctypes, "CDLL", no_inotify)
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"
    conflist.write_bytes((DATA / "azure-linux.conflist").read_bytes())
    passes = []
    watcher = Watcher(conf_dir, bin_dir, plugin, PluginSettings(), resync_interval=60.0, poll_interval=0.05,
                      on_pass=passes.append)
    assert watcher.uses_inotify == (request.param == "inotify")
    thread = threading.Thread(target=watcher.run, name="wgcni-install-watch", daemon=True)
    thread.start()
    try:
        _wait_for(lambda: _chained(conflist), "the first insertion")
        yield conflist, bin_dir, passes
    finally:
        watcher.stop()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "watcher did not stop"


def test_in_place_rewrite_is_repaired(watched_node):
    conflist, _, _ = watched_node
    regenerated = (DATA / "azure-linux-swift.conflist").read_bytes()
    with open(conflist, "wb") as handle:  # CNS-style truncate and write
        handle.write(regenerated)
    _wait_for(lambda: _chained(conflist), "re-insertion after an in-place rewrite")
    assert (conflist.parent / (conflist.name + BACKUP_SUFFIX)).read_bytes() == regenerated
    assert json.loads(conflist.read_text())["plugins"][0]["executionMode"] == "v4swift"


def test_replacement_by_rename_is_repaired(watched_node):
    conflist, _, _ = watched_node
    staged = conflist.with_name(".staged")
    staged.write_bytes((DATA / "azure-linux-swift-overlay.conflist").read_bytes())
    os.replace(staged, conflist)
    _wait_for(lambda: _chained(conflist), "re-insertion after an atomic replacement")


def test_half_written_file_is_left_alone_until_complete(watched_node):
    conflist, _, _ = watched_node
    complete = (DATA / "azure-linux-swift-overlay-dualstack.conflist").read_bytes()
    with open(conflist, "wb") as handle:
        handle.write(complete[: len(complete) // 2])
        handle.flush()
        time.sleep(0.2)  # the watcher may look now: invalid JSON must not be touched
        assert conflist.read_bytes() == complete[: len(complete) // 2]
        handle.write(complete[len(complete) // 2 :])
    _wait_for(lambda: _chained(conflist), "insertion once the writer finished")


def test_a_new_file_that_sorts_first_takes_over(watched_node):
    conflist, _, _ = watched_node
    newer = conflist.with_name("05-azure.conflist")
    newer.write_bytes((DATA / "azure-chained-cilium.conflist").read_bytes())
    _wait_for(lambda: _chained(newer), "insertion into the file that now sorts first")
    assert _chained(conflist)  # the old one keeps its entry; uninstall restores both


def test_deleted_plugin_binary_comes_back_at_the_next_pass(watched_node):
    conflist, bin_dir, passes = watched_node
    (bin_dir / "wgcni").unlink()
    seen = len(passes)
    with open(conflist, "ab"):  # any event triggers a full pass (the periodic resync does the same without one)
        pass
    _wait_for(lambda: len(passes) > seen and (bin_dir / "wgcni").exists(), "the plugin to be reinstalled")


def test_cli_watch_runs_until_sigterm(node):
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"  # appears only after the watcher started, as CNS may do at boot
    command = [sys.executable, "-c", "from node_hook.install.cli import install_cni; install_cni()", "--watch",
               "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir), "--plugin", str(plugin)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in process.stderr.readline()
        conflist.write_bytes((DATA / "azure-linux.conflist").read_bytes())
        _wait_for(lambda: _chained(conflist), "the watcher to insert the entry")
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_wait_returns_once_the_conflist_appears_and_is_chained(node):
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"
    command = [sys.executable, "-c", "from node_hook.install.cli import install_cni; install_cni()", "--wait",
               "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir), "--plugin", str(plugin)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in process.stderr.readline()
        assert "no CNI config" in process.stderr.readline()
        conflist.write_text("{")  # CNS half-way: still waiting, one new line for the new problem
        assert "not valid JSON" in process.stderr.readline()
        assert process.poll() is None
        conflist.write_bytes((DATA / "azure-linux.conflist").read_bytes())
        assert process.wait(DEADLINE) == 0
        assert _chained(conflist) and (bin_dir / "wgcni").exists()
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
