"""Strict mode's boot guard in the plugin (cni_plugin/strict.py), in a namespace of its own as a rebooted node is:
without the boot file ADD does what it always did; with it, a missing strict table is loaded before the pod is
recorded, and when it cannot be loaded ADD fails with "try again later" (CNI code 50) and records nothing.
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from cni_plugin.strict import BOOT_FILE, table_present
from node_hook.apply.firewall import render_strict_boot
from node_hook.contracts import StrictSpec
from tests.cni.helpers import aks_prev_result, cni_env, invoke, plugin_stdin, record_files
from tests.cni.test_dispatch import AZURE

pytestmark = pytest.mark.netns

SPEC = StrictSpec("wgcni-strict", True, True, 0x100000, "wgcni0", ("azv",), 51820,
                  (ipaddress.ip_network("10.240.0.0/16"),), ())


@pytest.fixture
def settings(short_tmp: Path) -> dict:
    return {"stateDir": str(short_tmp / "state"), "hookSocket": str(short_tmp / "hook.sock"),
            "logFile": str(short_tmp / "wgcni.log"), "logLevel": "debug"}


def _add(settings: dict) -> object:
    stdin = plugin_stdin(AZURE, "1.0.0", settings, aks_prev_result("1.0.0"))
    return invoke(cni_env("ADD"), stdin)


def test_add_loads_the_strict_table_at_boot_or_refuses_the_pod(netns: str, settings: dict) -> None:
    state = Path(settings["stateDir"])
    state.mkdir(parents=True)
    assert not table_present()
    call = _add(settings)  # strict mode off (no boot file): nothing to load
    assert call.code == 0 and not table_present()  # type: ignore[attr-defined]

    state.joinpath(BOOT_FILE).write_text("this is not nftables\n")
    before = record_files(str(state))
    call = _add(settings)
    assert call.error_code() == 50  # type: ignore[attr-defined]
    assert "inet wgcni-strict is not loaded" in call.output["msg"]  # type: ignore[attr-defined]
    assert record_files(str(state)) == before, "a refused ADD records nothing"

    state.joinpath(BOOT_FILE).write_text(render_strict_boot(SPEC))
    call = _add(settings)
    assert call.code == 0 and table_present()  # type: ignore[attr-defined]
    listing = subprocess.run(["nft", "list", "table", "inet", "wgcni-strict"], capture_output=True, text=True,
                             check=True).stdout
    assert "10.240.0.0/16" in listing and "drop" in listing
    # The hook's live table differs from the boot file (here: one set more); an ADD must leave it as it is.
    subprocess.run(["nft", "add", "set", "inet", "wgcni-strict", "live-only", "{ type ipv4_addr; }"], check=True)
    call = _add(settings)
    assert call.code == 0  # type: ignore[attr-defined]
    assert "live-only" in subprocess.run(["nft", "list", "table", "inet", "wgcni-strict"], capture_output=True,
                                         text=True, check=True).stdout, "an ADD replaced the loaded table"
    subprocess.run(["nft", "delete", "table", "inet", "wgcni-strict"], check=True)
