"""The hook's log setup: text and JSON lines at the configured level, and the private key masked in every form it
could take, in messages, arguments and exception texts."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator

import pytest

from node_hook.config import Settings
from node_hook.logs import MASK, encodings, redact_everywhere, setup_logging

SECRET = os.urandom(32)


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What the handler setup_logging installs (on sys.stderr, captured) has written; the root logger and the record
    factory (redact_everywhere wraps it) restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level, saved_factory = root.handlers[:], root.level, logging.getLogRecordFactory()
    try:
        yield lambda: capsys.readouterr().err
    finally:
        logging.setLogRecordFactory(saved_factory)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


class Collect(logging.Handler):
    """A handler added after set-up, as a library or an operator's debugging session might: keeps what it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # as logging's own handlers do: report on stderr, never raise into the caller
            self.handleError(record)


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


def test_handlers_added_after_set_up_see_no_key_on_the_root_or_a_child_logger(stderr: Callable[[], str]) -> None:
    setup_logging(Settings(log_format="text", log_level="info"))
    redact_everywhere(SECRET)
    on_root, on_child = Collect(), Collect()
    logging.getLogger().addHandler(on_root)
    child = logging.getLogger("wgcni-test")
    child.addHandler(on_child)
    try:
        log_everything()
        logging.getLogger("wgcni-test.grandchild").warning("propagated twice: %s", SECRET.hex().upper())
        logging.getLogger("wgcni-test").info("unformattable %d", base64.b64encode(SECRET).decode())
        logging.getLogger("wgcni-test").info("unformattable without a secret %d", "plain text")
    finally:
        logging.getLogger().removeHandler(on_root)
        child.removeHandler(on_child)
    written = {"stderr": stderr(), "root handler": "\n".join(on_root.lines), "child handler": "\n".join(on_child.lines)}
    for where, text in written.items():
        assert "key as argument: [redacted]" in text and "propagated twice: [redacted]" in text, where
        assert "RuntimeError: wireguard-go refused private_key=[redacted]" in text, where
        assert "unformattable %d (arguments that do not fit the message: ('[redacted]',))" in text, where
        assert "unformattable without a secret %d (arguments that do not fit the message: ('plain text',))" in text
        assert "--- Logging error ---" not in text, where  # what logging prints when a handler cannot format
        for form in encodings(SECRET):
            assert form not in text, f"{where} saw the key"
