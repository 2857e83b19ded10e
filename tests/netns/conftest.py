"""Fixtures of the real-namespace tests: a private network namespace entered by the test's thread, and the
three-node lab; everything created is removed afterwards, also when the test fails."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.netns import Namespaces
from tests.support.tempdir import short_temp_dir

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextmanager
def entered_namespace(prefix: str = "h3t") -> Iterator[str]:
    """Create a namespace (loopback up), move this thread into it (subprocesses started here inherit it), then move
    back and remove it with every process still inside."""
    with Namespaces() as namespaces:
        name = namespaces.add_unique(prefix)
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield name
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)


@pytest.fixture
def netns() -> Iterator[str]:
    with entered_namespace() as name:
        yield name


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with short_temp_dir("h3-") as path:
        yield path
