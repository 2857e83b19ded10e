"""The hook's log setup: text and JSON lines at the configured level, and the private key masked in every form it
could take, in messages, arguments and exception texts."""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Callable, Iterator

import pytest

from node_hook.config import Settings
from node_hook.logs import MASK, encodings, redact_everywhere, setup_logging

SECRET = os.urandom(32)


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What the handler setup_logging installs (on sys.stderr, captured) has written; root logger restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield lambda: capsys.readouterr().err
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def log_everything() -> None:
    log = logging.getLogger("wgcni-test")
    log.debug("debug line")
    log.info("plain %s", "argument")
    log.info("key as argument: %s", base64.b64encode(SECRET).decode())
    log.warning(f"key in the message: {SECRET.hex()} and {base64.urlsafe_b64encode(SECRET).decode().rstrip('=')}")
    try:
        raise RuntimeError(f"wireguard-go refused private_key={SECRET.hex()}")
    except RuntimeError:
        log.exception("applying the device failed")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_key_never_reaches_the_output(stderr: Callable[[], str], log_format: str) -> None:
    setup_logging(Settings(log_format=log_format, log_level="info"))
    redact_everywhere(SECRET)
    log_everything()
    output = stderr()
    for form in encodings(SECRET):
        assert form not in output
    assert output.count(MASK) == 4  # argument, two forms in one message, the exception text
    assert "debug line" not in output and "plain argument" in output
    if log_format == "json":
        entries = [json.loads(line) for line in output.splitlines()]
        assert [entry["level"] for entry in entries] == ["info", "info", "warning", "error"]
        assert set(entries[0]) == {"time", "level", "logger", "message"}
        assert entries[0]["time"].endswith("Z") and entries[0]["logger"] == "wgcni-test"
        assert "RuntimeError: wireguard-go refused private_key=[redacted]" in entries[3]["exception"]


def test_without_the_filter_the_same_lines_would_leak(stderr: Callable[[], str]) -> None:
    """Guard against a vacuous test: the lines above do carry the key."""
    setup_logging(Settings(log_format="json", log_level="debug"))
    log_everything()
    output = stderr()
    assert base64.b64encode(SECRET).decode() in output and SECRET.hex() in output
    assert "debug line" in output
