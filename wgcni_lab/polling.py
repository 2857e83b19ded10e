"""Waiting for a condition with a deadline: the one polling loop of the lab (wgcni_lab) and of the test suites
(through wgcni_lab/harness/polling.py, which adds their time scale and assertion errors)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.05,
               error: Callable[[str], Exception] = TimeoutError, detail: Callable[[], object] | None = None) -> Any:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that. It is asked
    at least once and once more after the deadline; then `error` is raised with a message naming `what` and the
    last answer (or, given `detail`, what `detail()` says about the state at that moment)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    if detail is not None:
        context = f": {detail()}"
    else:
        context = "" if value is None or value is False else f" (last: {value!r})"
    raise error(f"timed out after {timeout:g}s waiting for {what}{context}")
