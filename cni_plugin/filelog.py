"""Size-bounded append-only log file for the plugin (never stdout: stdout carries the CNI result).

Deviation from the standard library, for start-up time: ``import logging`` and ``logging.handlers`` take a large
share of the start-up budget of a whole ADD (docs/benchmarks.md, P1). The plugin writes a handful of lines
per invocation from many short-lived processes at once, which RotatingFileHandler does not handle safely across
processes anyway. Each line is one ``write`` on an ``O_APPEND`` descriptor (whole lines, no interleaving);
rotation renames the file to ``<file>.1`` under an ``flock`` of the file being rotated. It calls ``posix``, not
``os``, for the same reason (cni_plugin/main.py).
"""

import fcntl
import posix
import time

from cni_plugin.files import open_creating_directory

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
DEFAULT_MAX_BYTES = 10 * 1024 * 1024


class FileLog:
    """Writes ``<time> <LEVEL> wgcni[<pid>] <message>`` lines to one file; drops lines it cannot write."""

    def __init__(self, path: str, level: str = "info", max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.threshold = LEVELS[level]
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._disabled = not path

    def info(self, message: str) -> None:
        self._emit(20, "INFO", message)

    def warning(self, message: str) -> None:
        self._emit(30, "WARNING", message)

    def error(self, message: str) -> None:
        self._emit(40, "ERROR", message)

    def close(self) -> None:
        if self._fd is not None:
            posix.close(self._fd)
            self._fd = None

    def _emit(self, level: int, level_name: str, message: str) -> None:
        if level < self.threshold or self._disabled:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = f"{stamp}Z {level_name} wgcni[{posix.getpid()}] {message}\n".encode(errors="backslashreplace")
        try:
            fd = self._open()
            posix.write(fd, line)
        except OSError:
            # A log that cannot be written (read-only or full disk) must never fail a pod's network set-up.
            self._disabled = True

    def _open(self) -> int:
        if self._fd is None:
            fd = open_creating_directory(self.path, posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC)
            if posix.fstat(fd).st_size >= self.max_bytes:
                fd = self._rotate(fd)
            self._fd = fd
        return self._fd

    def _rotate(self, fd: int) -> int:
        """Move the full file aside once (whoever holds its lock first), then append to a fresh file."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = posix.stat(self.path)
            mine = posix.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino) and mine.st_size >= self.max_bytes:
                posix.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            pass  # another process rotated it between our open and stat
        finally:
            posix.close(fd)
        return posix.open(self.path, posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
