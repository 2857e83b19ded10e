"""Fixtures of the real-namespace tests: a private network namespace entered by the test's thread, and the
three-node lab; everything created is removed afterwards, also when the test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wgcni_lab.harness.netns import entered_namespace
from wgcni_lab.harness.tempdir import short_temp_dir


@pytest.fixture
def netns() -> Iterator[str]:
    with entered_namespace() as name:
        yield name


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with short_temp_dir("h3-") as path:
        yield path
