"""Environment detection (Azure, MTU arithmetic, kernel module) and the CLI's one-line errors."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from node_hook.cli import main
from node_hook.detect import AZURE_ASSET_TAG, detect_azure, kernel_wireguard_available, wireguard_mtu
from node_hook.keys import load_or_create


def test_azure_from_dmi_vendor_or_asset_tag(tmp_path: Path) -> None:
    assert detect_azure("auto", tmp_path) == (False, f"no Azure DMI vendor or asset tag in {tmp_path}")
    (tmp_path / "sys_vendor").write_text("Microsoft Corporation\n")
    assert detect_azure("auto", tmp_path)[0] is True
    (tmp_path / "sys_vendor").write_text("QEMU\n")
    (tmp_path / "chassis_asset_tag").write_text(AZURE_ASSET_TAG + "\n")
    azure, reason = detect_azure("auto", tmp_path)
    assert azure and "chassis_asset_tag" in reason
    assert detect_azure("false", tmp_path) == (False, "azure: false in the settings")


def test_mtu_arithmetic_and_override() -> None:
    assert wireguard_mtu(1500, 4, True, 0)[0] == 1340  # Calico's documented AKS value
    assert wireguard_mtu(1500, 6, True, 0)[0] == 1320
    assert wireguard_mtu(9000, 4, False, 0) == (8940, "underlay 9000 - 60 (WireGuard over IPv4) = 8940")
    assert wireguard_mtu(1500, 4, True, 1400) == (1400, "mtu 1400 from the settings")


def test_kernel_module_detection(tmp_path: Path) -> None:
    sys_root, modules = tmp_path / "sys", tmp_path / "lib"
    sys_root.mkdir()
    assert not kernel_wireguard_available(sys_root, modules)
    release = __import__("os").uname().release
    (modules / release).mkdir(parents=True)
    (modules / release / "modules.dep").write_text("kernel/drivers/net/wireguard/wireguard.ko: kernel/lib/x.ko\n")
    assert kernel_wireguard_available(sys_root, modules)


def test_show_key_prints_only_the_public_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"stateDir: {tmp_path / 'state'}\nnodeName: n\n")
    runner = CliRunner()
    missing = runner.invoke(main, ["show-key", "--config", str(config)])
    assert missing.exit_code == 1 and "no key yet" in missing.output and "Traceback" not in missing.output
    key = load_or_create(tmp_path / "state" / "private.key")
    result = runner.invoke(main, ["show-key", "--config", str(config)])
    assert result.exit_code == 0 and result.output == key.public_key + "\n"
    assert (tmp_path / "state" / "private.key").read_text().strip() not in result.output


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listenPort: 0\n")
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: listenPort: 0 is outside 1..65535"
