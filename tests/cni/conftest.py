"""Fixtures of the plugin tests: short private temp dirs and the plugin settings that point into them."""

from __future__ import annotations

import pytest

from wgcni_lab.harness.tempdir import short_temp_dir


@pytest.fixture
def short_tmp():
    """A short temporary directory (Unix socket paths are limited to 107 bytes); removed afterwards."""
    with short_temp_dir("wgcni-") as path:
        yield path


@pytest.fixture
def settings(short_tmp) -> dict:
    return {
        "stateDir": str(short_tmp / "state"),
        "hookSocket": str(short_tmp / "hook.sock"),
        "logFile": str(short_tmp / "log" / "wgcni.log"),
        "logLevel": "debug",
    }
