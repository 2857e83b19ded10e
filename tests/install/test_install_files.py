"""install-cni / uninstall-cni on real directories: which file, atomic writes, backups, exact restore, plugin copy."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from node_hook.install.cli import install_cni, uninstall_cni
from node_hook.install.conflist_files import BACKUP_SUFFIX, active_config
from node_hook.install.errors import InstallError
from node_hook.install.installation import install, uninstall
from node_hook.install.plugin_files import BUNDLE_DIR_NAME
from node_hook.install.settings import PluginSettings

DATA = Path(__file__).parents[1] / "cni" / "data"  # the AKS conflists, shared with the plugin's tests
AKS_CONFLISTS = sorted(DATA.glob("*.conflist"))
SETTINGS = PluginSettings()


def _aks_conflist(conf_dir: Path) -> Path:
    """Put AKS's conflist (azure-linux) on the node as 10-azure.conflist, as the node image does."""
    conflist = conf_dir / "10-azure.conflist"
    conflist.write_bytes((DATA / "azure-linux.conflist").read_bytes())
    return conflist


def _snapshot(*directories: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry below the directories: content (or symlink target) and mode."""
    result = {}
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                result[str(path)] = (os.readlink(path), info.st_mode)
            elif stat.S_ISREG(info.st_mode):
                result[str(path)] = (path.read_bytes(), info.st_mode)
            else:
                result[str(path)] = (b"<dir>", info.st_mode)
    return result


@pytest.mark.parametrize("source", AKS_CONFLISTS, ids=lambda path: path.name)
def test_install_then_uninstall_restores_every_aks_conflist_byte_for_byte(node, source):
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"
    conflist.write_bytes(source.read_bytes())
    conflist.chmod(0o640)
    before = _snapshot(conf_dir, bin_dir)

    changes = install(conf_dir, bin_dir, plugin, SETTINGS)
    assert changes == [f"installed plugin {bin_dir / 'wgcni'}", f"inserted wgcni after azure-vnet in {conflist}"]
    installed = json.loads(conflist.read_text())
    types = [p["type"] for p in installed["plugins"]]
    assert types[types.index("azure-vnet") + 1] == "wgcni"
    assert stat.S_IMODE(conflist.stat().st_mode) == 0o640
    assert (conf_dir / ("10-azure.conflist" + BACKUP_SUFFIX)).read_bytes() == source.read_bytes()
    assert subprocess.run([bin_dir / "wgcni"], capture_output=True, text=True).stdout == "wgcni-plugin-v1\n"
    assert stat.S_IMODE((bin_dir / "wgcni").stat().st_mode) == 0o755
    assert sorted(os.listdir(conf_dir)) == ["10-azure.conflist", "10-azure.conflist" + BACKUP_SUFFIX]

    assert uninstall(conf_dir, bin_dir)[0] == f"restored {conflist} from 10-azure.conflist{BACKUP_SUFFIX}"
    assert _snapshot(conf_dir, bin_dir) == before


def test_install_is_idempotent_and_touches_nothing_the_second_time(node):
    conf_dir, bin_dir, plugin = node
    _aks_conflist(conf_dir)
    install(conf_dir, bin_dir, plugin, SETTINGS)
    inodes = {path.name: path.stat().st_ino for path in [*conf_dir.iterdir(), *bin_dir.iterdir()]}
    before = _snapshot(conf_dir, bin_dir)
    assert install(conf_dir, bin_dir, plugin, SETTINGS) == []
    assert _snapshot(conf_dir, bin_dir) == before
    assert {path.name: path.stat().st_ino for path in [*conf_dir.iterdir(), *bin_dir.iterdir()]} == inodes


def test_changed_settings_update_the_entry_in_place(node):
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"
    original = (DATA / "azure-linux-swift.conflist").read_bytes()
    conflist.write_bytes(original)
    install(conf_dir, bin_dir, plugin, SETTINGS)
    debug = PluginSettings(log_level="debug", state_dir="/var/lib/wgcni2")
    assert install(conf_dir, bin_dir, plugin, debug) == [f"inserted wgcni after azure-vnet in {conflist}"]
    plugins = json.loads(conflist.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["azure-vnet", "wgcni", "portmap"]
    assert plugins[1] == debug.entry()
    uninstall(conf_dir, bin_dir)
    assert conflist.read_bytes() == original


def test_only_the_first_config_by_name_is_edited(node):
    conf_dir, bin_dir, plugin = node
    _aks_conflist(conf_dir)
    overlay = (DATA / "azure-linux-swift-overlay.conflist").read_bytes()
    (conf_dir / "15-azure-swift-overlay.conflist").write_bytes(overlay)
    (conf_dir / "05-notes.txt").write_text("not a CNI config")
    (conf_dir / "01-dir.conflist").mkdir()
    untouched = _snapshot(conf_dir)
    del untouched[str(conf_dir / "10-azure.conflist")]
    assert active_config(conf_dir) == conf_dir / "10-azure.conflist"
    install(conf_dir, bin_dir, plugin, SETTINGS)
    after = _snapshot(conf_dir)
    assert all(after[name] == value for name, value in untouched.items())
    assert "wgcni" in (conf_dir / "10-azure.conflist").read_text()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("10-azure.conflist", '{"cniVersion": "0.3.0", "name": "azure", "plugins": [', "not valid JSON"),
        ("10-azure.conflist", json.dumps({"cniVersion": "0.3.0", "name": "k", "plugins": [{"type": "bridge"}]}),
         "no azure-vnet plugin"),
        ("10-azure.conf", json.dumps({"cniVersion": "0.3.0", "name": "azure", "type": "azure-vnet"}),
         "single-plugin config"),
        ("10-azure.conflist", b"\xff\xfe{}", "not UTF-8"),
        ("00-other.json", json.dumps({"cniVersion": "0.3.0", "name": "x", "plugins": [{"type": "ptp"}]}),
         "00-other.json has no azure-vnet plugin"),
    ],
    ids=["invalid-json", "no-azure-vnet", "single-plugin-conf", "not-utf8", "other-config-sorts-first"],
)
def test_refusal_changes_nothing(node, name, content, message):
    conf_dir, bin_dir, plugin = node
    _aks_conflist(conf_dir)
    (conf_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(conf_dir, bin_dir)
    with pytest.raises(InstallError, match=message):
        install(conf_dir, bin_dir, plugin, SETTINGS)
    assert _snapshot(conf_dir, bin_dir) == before


def test_no_config_at_all_is_refused(node):
    conf_dir, bin_dir, plugin = node
    with pytest.raises(InstallError, match="no CNI config"):
        install(conf_dir, bin_dir, plugin, SETTINGS)
    assert not any(bin_dir.iterdir())


def test_symlinked_config_is_refused(node, tmp_path):
    conf_dir, bin_dir, plugin = node
    real = tmp_path / "real.conflist"
    real.write_bytes((DATA / "azure-linux.conflist").read_bytes())
    (conf_dir / "10-azure.conflist").symlink_to(real)
    with pytest.raises(InstallError, match="symlink"):
        install(conf_dir, bin_dir, plugin, SETTINGS)


def test_missing_plugin_is_refused_before_the_conflist_is_touched(node, tmp_path):
    conf_dir, bin_dir, _ = node
    _aks_conflist(conf_dir)
    before = _snapshot(conf_dir, bin_dir)
    with pytest.raises(InstallError, match="not found"):
        install(conf_dir, bin_dir, tmp_path / "missing", SETTINGS)
    assert _snapshot(conf_dir, bin_dir) == before


def test_rewrite_by_the_owner_refreshes_the_backup(node):
    conf_dir, bin_dir, plugin = node
    conflist = _aks_conflist(conf_dir)
    install(conf_dir, bin_dir, plugin, SETTINGS)
    regenerated = (DATA / "azure-linux-swift-overlay.conflist").read_bytes()
    conflist.write_bytes(regenerated)  # Azure CNS regenerates the file without wgcni
    install(conf_dir, bin_dir, plugin, SETTINGS)
    assert (conf_dir / ("10-azure.conflist" + BACKUP_SUFFIX)).read_bytes() == regenerated
    uninstall(conf_dir, bin_dir)
    assert conflist.read_bytes() == regenerated


def test_uninstall_keeps_later_edits_and_removes_only_the_entry(node):
    conf_dir, bin_dir, plugin = node
    conflist = _aks_conflist(conf_dir)
    install(conf_dir, bin_dir, plugin, SETTINGS)
    edited = json.loads(conflist.read_text())
    edited["plugins"].append({"type": "bandwidth"})
    conflist.write_text(json.dumps(edited))
    changes = uninstall(conf_dir, bin_dir)
    assert "changed since install" in changes[0]
    assert [p["type"] for p in json.loads(conflist.read_text())["plugins"]] == ["azure-vnet", "portmap", "bandwidth"]
    assert not list(conf_dir.glob("*" + BACKUP_SUFFIX))


def test_uninstall_leaves_a_file_rewritten_without_wgcni_alone(node):
    conf_dir, bin_dir, plugin = node
    conflist = _aks_conflist(conf_dir)
    install(conf_dir, bin_dir, plugin, SETTINGS)
    regenerated = (DATA / "azure-linux-swift.conflist").read_bytes()
    conflist.write_bytes(regenerated)
    uninstall(conf_dir, bin_dir)
    assert conflist.read_bytes() == regenerated
    assert os.listdir(conf_dir) == ["10-azure.conflist"] and os.listdir(bin_dir) == []


def test_uninstall_when_nothing_is_installed_changes_nothing(node):
    conf_dir, bin_dir, _ = node
    _aks_conflist(conf_dir)
    before = _snapshot(conf_dir, bin_dir)
    assert uninstall(conf_dir, bin_dir) == []
    assert _snapshot(conf_dir, bin_dir) == before


def _bundle(root: Path, marker: str) -> Path:
    """A PyInstaller-like one-directory bundle: an executable that needs a file from its own _internal dir."""
    (root / "_internal").mkdir(parents=True)
    (root / "_internal" / "marker").write_text(marker)
    executable = root / "wgcni"
    executable.write_text('#!/bin/sh\nexec cat "$(dirname "$(readlink -f "$0")")/_internal/marker"\n')
    executable.chmod(0o755)
    return root


def test_one_directory_bundle_is_installed_behind_an_atomic_symlink(node, tmp_path):
    conf_dir, bin_dir, _ = node
    _aks_conflist(conf_dir)
    first = _bundle(tmp_path / "v1" / "wgcni", "one")
    install(conf_dir, bin_dir, first, SETTINGS)
    assert (bin_dir / "wgcni").is_symlink()
    assert os.readlink(bin_dir / "wgcni").startswith(BUNDLE_DIR_NAME + "/")
    assert subprocess.run([bin_dir / "wgcni"], capture_output=True, text=True).stdout == "one"
    assert install(conf_dir, bin_dir, first, SETTINGS) == []

    second = _bundle(tmp_path / "v2" / "wgcni", "two")
    install(conf_dir, bin_dir, second, SETTINGS)
    assert subprocess.run([bin_dir / "wgcni"], capture_output=True, text=True).stdout == "two"
    assert len(list((bin_dir / BUNDLE_DIR_NAME).iterdir())) == 2  # the previous one survives one upgrade
    third = _bundle(tmp_path / "v3" / "wgcni", "three")
    install(conf_dir, bin_dir, third, SETTINGS)
    assert len(list((bin_dir / BUNDLE_DIR_NAME).iterdir())) == 2

    install(conf_dir, bin_dir, tmp_path / "dist" / "wgcni", SETTINGS)  # back to a single file: bundles go
    assert not (bin_dir / BUNDLE_DIR_NAME).exists() and not (bin_dir / "wgcni").is_symlink()
    install(conf_dir, bin_dir, third, SETTINGS)
    uninstall(conf_dir, bin_dir)
    assert os.listdir(bin_dir) == []


def test_bundle_without_its_executable_is_refused(node, tmp_path):
    conf_dir, bin_dir, _ = node
    _aks_conflist(conf_dir)
    empty = tmp_path / "bundle"
    empty.mkdir()
    with pytest.raises(InstallError, match="no executable wgcni"):
        install(conf_dir, bin_dir, empty, SETTINGS)


def test_cli_install_and_uninstall(node, tmp_path):
    conf_dir, bin_dir, plugin = node
    conflist = conf_dir / "10-azure.conflist"
    original = (DATA / "azure-chained-cilium.conflist").read_bytes()
    conflist.write_bytes(original)
    hook_config = tmp_path / "config.yaml"
    hook_config.write_text("stateDir: /var/lib/wgcni-test\nsocket: /run/wgcni-test/hook.sock\nlogLevel: debug\n")
    dirs = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    runner = CliRunner()
    result = runner.invoke(install_cni, [*dirs, "--plugin", str(plugin), "--config", str(hook_config),
                                         "--log-file", "/tmp/wgcni-test.log"])
    assert result.exit_code == 0, result.output
    assert "inserted wgcni after azure-vnet" in result.output
    entry = json.loads(conflist.read_text())["plugins"][1]
    assert entry == {"type": "wgcni", "stateDir": "/var/lib/wgcni-test", "hookSocket": "/run/wgcni-test/hook.sock",
                     "logFile": "/tmp/wgcni-test.log", "logLevel": "debug"}
    result = runner.invoke(install_cni, [*dirs, "--plugin", str(plugin), "--config", str(hook_config),
                                         "--log-file", "/tmp/wgcni-test.log"])
    assert result.exit_code == 0 and result.output == "already installed; nothing changed\n"
    result = runner.invoke(uninstall_cni, dirs)
    assert result.exit_code == 0 and "restored" in result.output
    assert conflist.read_bytes() == original and os.listdir(bin_dir) == []
    result = runner.invoke(uninstall_cni, dirs)
    assert result.exit_code == 0 and result.output == "not installed; nothing changed\n"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--plugin", "/nonexistent/wgcni"], "plugin /nonexistent/wgcni not found"),
        (["--conf-dir", "/nonexistent/net.d"], "/nonexistent/net.d is not a directory"),
        (["--config", "/nonexistent/config.yaml"], "config.yaml"),
    ],
    ids=["missing-plugin", "missing-conf-dir", "missing-config"],
)
def test_cli_errors_are_one_line_without_traceback(node, arguments, message):
    conf_dir, bin_dir, plugin = node
    _aks_conflist(conf_dir)
    base = {"--conf-dir": str(conf_dir), "--bin-dir": str(bin_dir), "--plugin": str(plugin)}
    base.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    command = [sys.executable, "-c", "from node_hook.install.cli import install_cni; install_cni()",
               *[item for pair in base.items() for item in pair]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cli_invalid_conflist_is_one_line(node):
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-azure.conflist").write_text("{not json")
    result = CliRunner().invoke(install_cni, ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir),
                                              "--plugin", str(plugin)])
    assert result.exit_code == 1
    assert result.output.startswith("wgcni-node install-cni: error: ") and result.output.count("\n") == 1
    assert "not valid JSON" in result.output
    assert os.listdir(bin_dir) == []
