"""Settings loading/validation and the key file (create once, 0600 in a 0700 dir, reused, never in repr)."""

from __future__ import annotations

import base64
import os
import socket
import stat
from pathlib import Path

import pytest

from node_hook import keys
from node_hook.config import (
    SETTINGS_DOC,
    ConfigError,
    Settings,
    load_settings,
    settings_as_mapping,
    with_live_settings,
)
from node_hook.keys import KeyFileError, load_existing, load_or_create


def test_every_setting_is_documented_with_its_default() -> None:
    documented = {key for key, _, _ in SETTINGS_DOC}
    assert documented == set(settings_as_mapping(Settings(node_name="n")))


def test_a_running_hook_takes_the_strict_settings_live_and_nothing_else() -> None:
    running = Settings(node_name="a")
    new = Settings(node_name="b", strict_mode=True, strict_cidrs=("10.0.0.0/8",), strict_allow=("10.1.0.0/16",),
                   resync_interval=5.0)
    live = with_live_settings(running, new)
    assert (live.strict_mode, live.strict_cidrs, live.strict_allow) == (True, ("10.0.0.0/8",), ("10.1.0.0/16",))
    assert (live.node_name, live.resync_interval) == ("a", running.resync_interval)


def test_yaml_and_json_load(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("nodeName: n1\ninterface: wgA\nfwmark: '0x200000'\nhostEncryption: false\n"
                         "podInterfacePrefixes: [azv, veth]\n")
    settings = load_settings(yaml_file)
    assert (settings.node_name, settings.interface, settings.fwmark) == ("n1", "wgA", 0x200000)
    assert settings.host_encryption == "false" and settings.pod_interface_prefixes == ("azv", "veth")
    json_file = tmp_path / "c.json"
    json_file.write_text('{"nodeName": "n2", "stateDir": "/tmp/x", "listenPort": 51999}')
    settings = load_settings(json_file)
    assert settings.key_file == Path("/tmp/x/private.key") and settings.listen_port == 51999
    assert settings.route_table == 51820 and settings.rule_priority == 99


@pytest.mark.parametrize("text,needle", [
    ("interface: averyveryverylongname", "interface"),
    ("listenPort: 70000", "listenPort"),
    ("routeTable: 254", "routeTable"),
    ("mtu: 500", "mtu"),
    ("backend: magic", "backend"),
    ("stateDir: relative", "stateDir"),
    ("bogus: 1", "unknown setting"),
    ("nodeName: [", "not valid YAML"),
    ("- a list", "mapping"),
    ("endpoint: nowhere", "endpoint"),
    ("resyncInterval: -1", "resyncInterval"),
    ("rulePriority: 1", "rulePriority"),  # its bypass rules would take priority 0, the local table's
])
def test_bad_settings_give_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_node_name_comes_from_node_name_then_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DaemonSet passes NODE_NAME (spec.nodeName): a Node named unlike the host still finds itself."""
    path = tmp_path / "c.yaml"
    path.write_text("logLevel: info\n")
    monkeypatch.setenv("NODE_NAME", "aks-nodepool1-12345678-vmss000003")
    assert load_settings(path).node_name == "aks-nodepool1-12345678-vmss000003"
    path.write_text("nodeName: explicit\n")
    assert load_settings(path).node_name == "explicit"
    monkeypatch.delenv("NODE_NAME")
    path.write_text("logLevel: info\n")
    assert load_settings(path).node_name == socket.gethostname()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


def test_key_is_created_once_with_safe_modes_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "private.key"
    first = load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert load_or_create(path) == first
    assert load_existing(path).public_key == first.public_key
    assert len(base64.b64decode(first.public_key)) == 32
    private_text = path.read_text().strip()
    assert private_text not in repr(first) and private_text not in str(first)
    assert sorted(p.name for p in path.parent.iterdir()) == ["private.key", "private.key.published"]
    assert (path.parent / "private.key.published").read_text() == ""  # created: no API holds it yet


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "private.key"
    previous = os.umask(0)
    try:
        load_or_create(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_key_created_meanwhile_by_another_process_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "private.key"
    winner = load_or_create(tmp_path / "winner.key")
    generate = keys.PrivateKey.generate

    def generate_while_another_process_creates_the_key() -> keys.PrivateKey:
        path.write_bytes((tmp_path / "winner.key").read_bytes())
        return generate()

    monkeypatch.setattr(keys.PrivateKey, "generate", staticmethod(generate_while_another_process_creates_the_key))
    assert load_or_create(path) == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.key", "private.key.published", "winner.key",
                                                          "winner.key.published"]


def test_broken_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_text("not base64!!\n")
    with pytest.raises(KeyFileError, match="not a base64"):
        load_or_create(path)
    path.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(KeyFileError, match="32 bytes"):
        load_or_create(path)
    with pytest.raises(KeyFileError, match="no key yet"):
        load_existing(tmp_path / "none.key")
