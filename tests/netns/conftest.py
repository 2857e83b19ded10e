"""Fixtures of the real-namespace tests: a private network namespace entered by the test's thread, and the
three-node lab; everything created is removed afterwards, also when the test fails."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.tempdir import short_temp_dir

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def delete_namespace(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def entered_namespace(prefix: str = "h3t") -> Iterator[str]:
    """Create a namespace, move this thread into it (subprocesses started here inherit it), then move back and
    delete it."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield name
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)
        delete_namespace(name)


@pytest.fixture
def netns() -> Iterator[str]:
    with entered_namespace() as name:
        yield name


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with short_temp_dir("h3-") as path:
        yield path
