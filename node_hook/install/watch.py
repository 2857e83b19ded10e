"""`install-cni --watch` and `--wait`: install again whenever the conf dir changes.

Azure CNS can rewrite or replace the conflist at any time, and containerd reloads it on its own inotify event, so
every moment the entry is missing is a window in which pods start without wgcni. An inotify watch on the conf dir
(ctypes; the stdlib has no binding) wakes the installer as soon as the writer closes the file, plus a full re-check
every `--resync` seconds in case an event was lost. When inotify is unavailable (fs.inotify.max_user_instances
exhausted) the watcher polls the directory every `--poll-interval` seconds (one scandir and a stat per entry).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from node_hook.install.errors import InstallError
from node_hook.install.installation import install
from node_hook.install.settings import PluginSettings

log = logging.getLogger(__name__)


_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_IGNORED = 0x00008000
_IN_WATCH_MASK = (
    _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
)
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class _DirectoryEvents:
    """Wakes up when a directory's entries are created, written, moved or removed.

    inotify through ctypes; when inotify cannot be set up (instance limit reached, not Linux) it degrades to comparing
    a listing of (name, inode, size, mtime) every `poll_interval` seconds. `wait` returns early on `wake()`.
    """

    def __init__(self, directory: Path, poll_interval: float) -> None:
        self.directory = directory
        self.poll_interval = poll_interval
        self._wake_read, self._wake_write = os.pipe()
        self._inotify_fd: int | None = None
        self._listing = self._snapshot()
        self._arm()

    def _arm(self) -> None:
        if self._inotify_fd is not None:
            os.close(self._inotify_fd)
            self._inotify_fd = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            if libc.inotify_add_watch(fd, os.fsencode(self.directory), _IN_WATCH_MASK) < 0:
                error = ctypes.get_errno()
                os.close(fd)
                raise OSError(error, os.strerror(error))
        except (OSError, AttributeError) as error:
            log.warning("inotify unavailable for %s (%s); polling every %.1fs", self.directory, error,
                        self.poll_interval)
            return
        self._inotify_fd = fd

    @property
    def uses_inotify(self) -> bool:
        return self._inotify_fd is not None

    def _snapshot(self) -> tuple:
        try:
            return tuple(sorted((entry.name, entry.inode(), entry.stat().st_size, entry.stat().st_mtime_ns)
                                for entry in os.scandir(self.directory)))
        except FileNotFoundError:
            return ()

    def wait(self, timeout: float) -> bool:
        """Block until the directory changes (True), `timeout` passes or `wake()` is called (False)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller = select.poll()
            poller.register(self._wake_read, select.POLLIN)
            if self._inotify_fd is not None:
                poller.register(self._inotify_fd, select.POLLIN)
                ready = poller.poll(remaining * 1000)
            else:
                ready = poller.poll(min(remaining, self.poll_interval) * 1000)
            if any(fd == self._wake_read for fd, _ in ready):
                os.read(self._wake_read, 64)
                return False
            if self._inotify_fd is not None:
                if ready:
                    self._drain()
                    return True
                continue
            listing = self._snapshot()
            if listing != self._listing:
                self._listing = listing
                return True

    def _drain(self) -> None:
        """Read all pending events; re-arm when the watched directory itself went away or was replaced."""
        rearm = False
        while True:
            try:
                data = os.read(self._inotify_fd, 65536)  # type: ignore[arg-type]
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _, mask, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
                offset += _INOTIFY_EVENT.size + length
                if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    rearm = True
        if rearm:
            self._arm()

    def wake(self) -> None:
        os.write(self._wake_write, b"x")

    def close(self) -> None:
        if self._inotify_fd is not None:
            os.close(self._inotify_fd)
            self._inotify_fd = None
        os.close(self._wake_read)
        os.close(self._wake_write)


class Watcher:
    """Keeps the wgcni entry in the active conflist whatever rewrites the conf dir (`install-cni --watch`)."""

    def __init__(self, conf_dir: Path, bin_dir: Path, plugin: Path, settings: PluginSettings,
                 resync_interval: float = 30.0, poll_interval: float = 1.0,
                 on_pass: Callable[[list[str]], None] | None = None) -> None:
        self.conf_dir = conf_dir
        self.bin_dir = bin_dir
        self.plugin = plugin
        self.settings = settings
        self.resync_interval = resync_interval
        self.on_pass = on_pass
        self._stopped = threading.Event()
        self._events = _DirectoryEvents(conf_dir, poll_interval)

    @property
    def uses_inotify(self) -> bool:
        return self._events.uses_inotify

    def run(self, until_installed: bool = False) -> bool:
        """Install now, then again after every change of the conf dir and every `resync_interval`, until `stop()`
        (or, with `until_installed`, until one pass succeeds). Returns whether the last pass succeeded."""
        last_error = None
        try:
            while not self._stopped.is_set():
                try:
                    changes = install(self.conf_dir, self.bin_dir, self.plugin, self.settings)
                except (InstallError, OSError) as error:  # e.g. CNS is half-way through writing: next event retries
                    if str(error) != last_error:  # one line per distinct problem, not one per event
                        log.warning("%s", error)
                    last_error = str(error)
                    changes = None
                else:
                    if last_error is not None:
                        log.info("resolved: %s", last_error)
                    last_error = None
                for change in changes or []:
                    log.info("%s", change)
                if self.on_pass is not None:
                    self.on_pass(changes or [])
                if until_installed and changes is not None:
                    return True
                self._events.wait(self.resync_interval)
            return last_error is None
        finally:
            self._events.close()

    def stop(self) -> None:
        self._stopped.set()
        self._events.wake()
