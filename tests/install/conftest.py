"""Shared fixture of the installer's tests: a node's CNI directories and a plugin executable to install."""

from __future__ import annotations

import pytest


@pytest.fixture
def node(tmp_path):
    """A node's CNI dirs (conf, bin) and a plugin executable to install."""
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    plugin = tmp_path / "dist" / "wgcni"
    plugin.parent.mkdir()
    plugin.write_text("#!/bin/sh\necho wgcni-plugin-v1\n")
    plugin.chmod(0o700)
    return conf_dir, bin_dir, plugin
