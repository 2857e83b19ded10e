"""Fixtures of the real-runtime tests: the built plugin, temp dirs, network namespaces, the libcni driver.

Everything a test creates lives in a short temp dir or a uniquely named network namespace and is removed in
`finally` blocks, also when the test fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.helpers import BUILT_PLUGIN, build_libcni_driver
from wgcni_lab.harness.netns import Namespaces
from wgcni_lab.harness.tempdir import short_temp_dir


@pytest.fixture(scope="session")
def plugin_binary() -> Path:
    """The packaged plugin under test; the runtime tests fail (never skip) without it."""
    if not (BUILT_PLUGIN.exists() and os.access(BUILT_PLUGIN, os.X_OK)):
        pytest.fail(f"{BUILT_PLUGIN} is missing: run `make build` first (the runtime tests use the built plugin)")
    return BUILT_PLUGIN


@pytest.fixture(scope="module")
def module_tmp() -> Iterator[Path]:
    """A short temp dir for the module (Unix socket paths must stay under 108 bytes)."""
    with short_temp_dir("wgcni-rt-") as path:
        yield path


@pytest.fixture
def netns_factory() -> Iterator:
    """Create uniquely named network namespaces (loopback up); all are removed after the test, with any process
    left inside."""
    with Namespaces() as namespaces:
        yield lambda prefix="wgcni-rt": namespaces.add_unique(prefix)


@pytest.fixture(scope="session")
def libcni_driver() -> Path:
    """The libcni driver binary (built once per machine and source version)."""
    return build_libcni_driver()
