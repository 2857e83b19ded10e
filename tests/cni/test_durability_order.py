"""ADD and DEL overlap the record directory's fsync with the hook's handling of the notification, without giving
up durability: the record's file is fsynced before its rename, the notification goes out once the record is
visible, and the command answers only after the directory's fsync (and then reads the hook's answer)."""

from __future__ import annotations

import errno
import os

from cni_plugin import files, notify
from tests.cni.helpers import AZURE_CONFLIST, aks_prev_result, cni_env, invoke, plugin_stdin
from wgcni_lab.harness.fake_hook import FakeHook


def recorded(monkeypatch, events: list[str], fail_directory_sync: bool = False) -> None:
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink
    real_send, real_answer = notify.send, notify.Pending.answer

    def fsync(fd: int) -> None:
        kind = "directory" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        if kind == "directory" and fail_directory_sync:
            raise OSError(errno.EIO, "injected I/O error")
        real_fsync(fd)
        events.append(f"fsync {kind}")

    def replace(source, target) -> None:
        real_replace(source, target)
        events.append("rename")

    def unlink(path) -> None:
        real_unlink(path)
        if str(path).endswith(".json"):
            events.append("unlink")

    def send(*args, **kwargs):
        pending = real_send(*args, **kwargs)
        events.append("notification sent")
        return pending

    def answer(self):
        result = real_answer(self)
        events.append("answer read")
        return result

    monkeypatch.setattr(files.posix, "fsync", fsync)
    monkeypatch.setattr(files.posix, "replace", replace)
    monkeypatch.setattr(files.posix, "unlink", unlink)
    monkeypatch.setattr(notify, "send", send)
    monkeypatch.setattr(notify.Pending, "answer", answer)


def test_add_and_del_sync_the_directory_while_the_hook_handles_the_notification(settings, monkeypatch):
    stdin = plugin_stdin(AZURE_CONFLIST, "0.3.0", settings, aks_prev_result("0.3.0"))
    events: list[str] = []
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        recorded(monkeypatch, events)
        added = invoke(cni_env("ADD"), stdin)
        assert added.code == 0, added.raw
        assert events == ["fsync file", "rename", "notification sent", "fsync directory", "answer read"]
        events.clear()
        deleted = invoke(cni_env("DEL"), stdin)
        assert deleted.code == 0, deleted.raw
        assert events == ["unlink", "notification sent", "fsync directory", "answer read"]
        assert hook.ops() == ["pod-added", "pod-deleted"]


def test_a_failed_directory_sync_fails_the_add_even_though_the_hook_was_told(settings, monkeypatch):
    stdin = plugin_stdin(AZURE_CONFLIST, "0.3.0", settings, aks_prev_result("0.3.0"))
    events: list[str] = []
    with FakeHook(settings["hookSocket"], settings["stateDir"]):
        recorded(monkeypatch, events, fail_directory_sync=True)
        added = invoke(cni_env("ADD"), stdin)
    assert added.error_code() == 5  # ERR_IO: the runtime retries; the hook's rescan follows the record
    assert "answer read" not in events
