"""The UAPI proxy's lifecycle on a plain Unix socket (no wireguard-go needed): close() ends the accept thread and
frees the public path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from node_hook.apply.wg_uapi import UapiProxy


def accept_threads(public: Path) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"uapi-proxy-{public.stem}"]


def test_close_wakes_the_accept_thread_and_frees_the_path(tmp_path: Path) -> None:
    proxy = UapiProxy(tmp_path / "wgt0.sock", tmp_path / "private.sock", on_change=lambda change: None)
    proxy.start()
    assert proxy.serving and proxy.public.exists()
    (thread,) = accept_threads(proxy.public)
    time.sleep(0.05)  # the thread is blocked in accept()
    proxy.close()
    thread.join(timeout=2)
    assert not thread.is_alive(), "the accept thread stayed blocked after close()"
    assert not proxy.serving and not proxy.public.exists()
