"""The hook's logs: text or JSON lines on stderr at the configured level, and no secret in any of them.

`setup_logging(settings)` installs one stderr handler: `logFormat: text` (`<time> <LEVEL> <logger>: <message>`) or
`json` (one object per line: `time` RFC 3339 UTC with milliseconds, `level`, `logger`, `message`, and `exception`
when there is one), at `logLevel`.

`redact_everywhere(private_key)` masks this node's private key in every log record the process creates. The hook
never formats its private key into a message (`NodeKey.__repr__` hides it, errors of the appliers never echo
requests), and tests/observe/test_hook_run.py greps every log line of a full run for it. The masking is the second
line: whatever a future message, a third-party library or an exception text might carry, the key's standard and
URL-safe base64 and its hex form (the encodings of wg(8), the Kubernetes API and the UAPI) are replaced with
`[redacted]`. It happens where each record is made (the logging module's record factory), not in a handler or a
logger filter, so it also holds for handlers added later and for records of any logger, propagated or not: the
message is formatted with its arguments and masked, and the exception and stack texts are rendered and masked
(formatters write the record's `exc_text` rather than formatting `exc_info` again, as logging.Formatter and
JsonLinesFormatter do).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from typing import Any

MASK = "[redacted]"


def encodings(secret: bytes) -> list[str]:
    """The textual forms a 32-byte WireGuard key takes: base64 (with and without padding), URL-safe, hex."""
    standard = base64.b64encode(secret).decode()
    urlsafe = base64.urlsafe_b64encode(secret).decode()
    forms = {standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("="), secret.hex(), secret.hex().upper()}
    return sorted(forms, key=len, reverse=True)  # longest first: a padded form is masked whole


class SecretRedactor:
    """Masks one secret in a record's message (after %-formatting) and in its exception and stack texts."""

    def __init__(self, secret: bytes) -> None:
        self.forms = encodings(secret)

    def _mask(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def redact(self, record: logging.LogRecord) -> None:
        """Mask the secret in `record`, in place. The message is formatted here, once: the record keeps the masked
        text without arguments, so a formatter neither formats it again nor fails on arguments that do not fit."""
        try:
            message = record.getMessage()
        except Exception:  # any error of the arguments' formatting: say what they were instead of a traceback
            message = f"{record.msg} (arguments that do not fit the message: {record.args!r})"
        record.msg, record.args = self._mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self._mask(record.stack_info)


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line (log collectors parse it without a pattern)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text  # as masked by SecretRedactor
        return json.dumps(entry)


def setup_logging(settings: Any) -> None:
    """One stderr handler in the format and at the level of `settings` (node_hook.config.Settings)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def redact_everywhere(secret: bytes) -> None:
    """Mask `secret` in every log record created from now on, whichever logger makes it and whichever handler
    writes it (a record factory wrapping the current one)."""
    redactor = SecretRedactor(secret)
    make_record = logging.getLogRecordFactory()

    def make_redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        redactor.redact(record)
        return record

    logging.setLogRecordFactory(make_redacted_record)
