"""Installer of the wgcni CNI plugin on a node: `wgcni-node install-cni` and `wgcni-node uninstall-cni`.

install-cni does two things, in this order, so a conflist never names a plugin that is not there yet:
1. copies the plugin into the CNI bin dir atomically (temp + rename; a PyInstaller one-directory bundle goes to
   `<bin>/wgcni.bundle/<sha256>/` and `<bin>/wgcni` becomes a symlink swapped atomically onto it);
2. inserts `{"type": "wgcni", ...settings}` right after `azure-vnet` in the config the runtime actually uses: the first
   file by name in the conf dir among *.conf, *.conflist, *.json (libcni's ConfFiles order, which containerd's CRI
   plugin and kubelet use).

Editing the conflist is a text edit, not a re-serialisation: the new entry is spliced in after azure-vnet's object in
the file's own indentation and separator style, so every other byte (key order, `"name": "azure"`, cniVersion, the
other plugins, whitespace) stays as it was, and removing the entry gives back the original bytes. The result is re-
parsed and compared with the intended document before anything is written. An existing wgcni entry is updated in place
(any duplicate or misplaced one is dropped); an already correct file is not touched at all.

Refusals (one line, nothing changed): the file is not valid JSON, has no azure-vnet entry (or more than one), is a
symlink, declares a cniVersion the plugin does not speak, or is a single-plugin `.conf`. A single-plugin file is refused
rather than converted: chaining needs a conflist, and converting means renaming a file that AKS node provisioning owns
(and whose `.conf` name would keep sorting before a new `.conflist`); every supported AKS configuration ships
`10-azure.conflist`, so an operator who sees a `.conf` is on a custom node and should decide.

The original of every file wgcni edits is kept beside it as `<file>.wgcni-backup` (an extension no CNI loader reads,
like Cilium's `.cilium_bak`), refreshed whenever the file's owner (Azure CNS) rewrites it. uninstall-cni writes the
backup's bytes back when the file is still what wgcni made of it, otherwise removes only the wgcni entry from the
current file; then it removes the plugin. containerd tears pods down with the *current* conflist, so pods created while
wgcni was installed do not need the binary for DEL after uninstall.

`--watch` keeps the insertion in place when Azure CNS rewrites or replaces the file: an inotify watch on the conf dir
(ctypes; the stdlib has no binding) wakes the installer within a millisecond of the writer closing the file, plus a full
re-check every `--resync` seconds in case an event was lost. Measured here (30 CNS-style rewrites of 10-azure.conflist):
the entry is back 2.0 ms (median; max 2.9 ms, mostly the two fsyncs) after the rewrite with inotify, against 950 ms
with 1 s polling: containerd reloads on its own inotify event, so every such second is a window in which pods would
start without wgcni. When inotify is unavailable (fs.inotify.max_user_instances exhausted) the watcher falls back to
polling the directory every `--poll-interval` seconds (one scandir + stat per entry: about 20 us here).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from cni_plugin.cni import (
    DEFAULT_HOOK_SOCKET,
    DEFAULT_LOG_FILE,
    DEFAULT_LOG_LEVEL,
    DEFAULT_STATE_DIR,
    SUPPORTED_VERSIONS,
)
from cni_plugin.filelog import LEVELS
from cni_plugin.files import fsync_directory, replace_symlink, write_atomically

DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIR = Path("/opt/cni/bin")
# Where the DaemonSet image keeps the plugin (packaging/Dockerfile copies dist/bin/wgcni here): a PyInstaller
# one-directory bundle (a directory holding the `wgcni` executable) or a single executable file.
BUNDLED_PLUGIN = Path("/opt/wgcni/wgcni")

PLUGIN_TYPE = "wgcni"
AZURE_TYPE = "azure-vnet"
CNI_CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")  # libcni ConfFiles, as used by containerd and kubelet
BACKUP_SUFFIX = ".wgcni-backup"
TEMPORARY_PREFIX = ".wgcni-tmp."  # of every file, symlink and staging directory wgcni writes in the CNI dirs
BUNDLE_DIR_NAME = PLUGIN_TYPE + ".bundle"
LOG_LEVELS = tuple(LEVELS)

log = logging.getLogger(__name__)


class InstallError(Exception):
    """install-cni or uninstall-cni cannot proceed; the message is one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class PluginSettings:
    """The settings written into the wgcni entry of the conflist (read by the plugin on every ADD/DEL)."""

    state_dir: str = DEFAULT_STATE_DIR
    hook_socket: str = DEFAULT_HOOK_SOCKET
    log_file: str = DEFAULT_LOG_FILE
    log_level: str = DEFAULT_LOG_LEVEL

    def entry(self) -> dict[str, str]:
        """The conflist entry, "type" first."""
        return {
            "type": PLUGIN_TYPE,
            "stateDir": self.state_dir,
            "hookSocket": self.hook_socket,
            "logFile": self.log_file,
            "logLevel": self.log_level,
        }


# --------------------------------------------------------------------------------------------------------------------
# Pure text editing of a conflist
# --------------------------------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class _Span:
    """Where one JSON value sits in the text: [start, end)."""

    start: int
    end: int


def _skip_whitespace(text: str, index: int) -> int:
    return _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]


def _object_members(text: str, start: int) -> list[tuple[str, int, _Span]]:
    """Members of the JSON object whose `{` is at `start`: (key, index of the key's quote, value span).

    Only called on text that json.loads accepted, so the grammar is known to be right.
    """
    members: list[tuple[str, int, _Span]] = []
    index = _skip_whitespace(text, start + 1)
    if text[index] == "}":
        return members
    while True:
        key_at = index
        key, index = json.decoder.scanstring(text, index + 1)
        index = _skip_whitespace(text, _skip_whitespace(text, index) + 1)  # past ':'
        _, end = _DECODER.raw_decode(text, index)
        members.append((key, key_at, _Span(index, end)))
        index = _skip_whitespace(text, end)
        if text[index] == "}":
            return members
        index = _skip_whitespace(text, index + 1)  # past ','


def _array_elements(text: str, start: int) -> list[_Span]:
    """Spans of the elements of the JSON array whose `[` is at `start`."""
    elements: list[_Span] = []
    index = _skip_whitespace(text, start + 1)
    if text[index] == "]":
        return elements
    while True:
        _, end = _DECODER.raw_decode(text, index)
        elements.append(_Span(index, end))
        index = _skip_whitespace(text, end)
        if text[index] == "]":
            return elements
        index = _skip_whitespace(text, index + 1)


def _parse(text: str, name: str) -> dict:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InstallError(f"{name} is not valid JSON ({error}); fix or regenerate it, wgcni changed nothing") from None
    if not isinstance(document, dict):
        raise InstallError(f"{name} is not a JSON object; wgcni changed nothing")
    return document


def _plugins(document: dict, name: str) -> list:
    plugins = document.get("plugins")
    if plugins is None:
        if "type" in document:
            raise InstallError(
                f"{name} is a single-plugin config ({document.get('type')!r}); wgcni chains only into a conflist "
                f"(AKS ships 10-azure.conflist): convert it to a conflist, wgcni changed nothing"
            )
        raise InstallError(f"{name} has no \"plugins\" list; wgcni changed nothing")
    if not isinstance(plugins, list) or not all(isinstance(plugin, dict) for plugin in plugins):
        raise InstallError(f"{name}: \"plugins\" must be a list of objects; wgcni changed nothing")
    return plugins


def _plugins_array_start(text: str) -> int:
    """Index of the `[` of the top-level "plugins" value (the last one if the key repeats, as json.loads takes)."""
    spans = [span for key, _, span in _object_members(text, _skip_whitespace(text, 0)) if key == "plugins"]
    return spans[-1].start


def _is_wgcni(plugin: dict) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def strip_entries(text: str, name: str = "conflist") -> str:
    """The text with every wgcni entry cut out (exactly undoing `insert_entry`)."""
    while True:
        positions = [index for index, plugin in enumerate(_plugins(_parse(text, name), name)) if _is_wgcni(plugin)]
        if not positions:
            return text
        index = positions[-1]
        array_start = _plugins_array_start(text)
        elements = _array_elements(text, array_start)
        if index > 0:  # cut ", <entry>" from the end of the previous element
            text = text[: elements[index - 1].end] + text[elements[index].end :]
        elif len(elements) > 1:  # the first element: cut "<entry>, " up to the next element
            text = text[: elements[0].start] + text[elements[1].start :]
        else:  # the only element
            text = text[: array_start + 1] + text[elements[0].end :]


def _render_like(text: str, neighbour: _Span, entry: dict) -> str:
    """`entry` serialised in the style of the object at `neighbour`, preceded by the separator to follow it."""
    members = _object_members(text, neighbour.start)
    key_value_separator = ": "
    element_indent = text[text.rfind("\n", 0, neighbour.start) + 1 : neighbour.start]
    own_line = "\n" in text[: neighbour.start] and not element_indent.strip()
    newline = "\r\n" if "\r\n" in text else "\n"
    multiline = False
    if members:
        _, key_at, value = members[0]
        gap = text[json.decoder.scanstring(text, key_at + 1)[1] : value.start]  # e.g. ":", ": ", " : "
        key_value_separator = ":" + (" " if gap.split(":", 1)[1] else "")
        member_line_start = text.rfind("\n", 0, key_at) + 1
        member_indent = text[member_line_start:key_at]
        multiline = (
            own_line
            and member_line_start > neighbour.start
            and not member_indent.strip()
            and member_indent.startswith(element_indent)
            and len(member_indent) > len(element_indent)
        )
    if not multiline:  # one-line objects: one line for ours too, on its own line if the neighbour has one
        item_separator = ", " if key_value_separator == ": " else ","
        compact = json.dumps(entry, separators=(item_separator, key_value_separator))
        return ("," + newline + element_indent if own_line else item_separator) + compact
    unit = member_indent[len(element_indent) :]
    rendered = json.dumps(entry, indent=unit, separators=(",", key_value_separator))
    return "," + newline + element_indent + rendered.replace("\n", newline + element_indent)


def insert_entry(text: str, entry: dict, name: str = "conflist") -> str:
    """The conflist text with `entry` right after azure-vnet and no other wgcni entry; `text` itself if already so.

    Raises InstallError (the caller changes nothing) when the text is not a conflist wgcni can chain into.
    """
    document = _parse(text, name)
    plugins = _plugins(document, name)
    azure = [index for index, plugin in enumerate(plugins) if plugin.get("type") == AZURE_TYPE]
    if not azure:
        raise InstallError(
            f"{name} has no {AZURE_TYPE} plugin; wgcni chains only after Azure CNI, wgcni changed nothing"
        )
    if len(azure) > 1:
        raise InstallError(f"{name} has {len(azure)} {AZURE_TYPE} plugins; expected one, wgcni changed nothing")
    version = document.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:  # every pod ADD would fail
        raise InstallError(
            f"{name} declares cniVersion {version!r}; the wgcni plugin supports {', '.join(SUPPORTED_VERSIONS)}, "
            f"wgcni changed nothing"
        )
    others = [plugin for plugin in plugins if not _is_wgcni(plugin)]
    azure_position = next(index for index, plugin in enumerate(others) if plugin.get("type") == AZURE_TYPE)
    wanted_plugins = others[: azure_position + 1] + [entry] + others[azure_position + 1 :]
    if plugins == wanted_plugins:
        return text
    stripped = strip_entries(text, name)
    elements = _array_elements(stripped, _plugins_array_start(stripped))
    azure_span = elements[azure_position]
    result = stripped[: azure_span.end] + _render_like(stripped, azure_span, entry) + stripped[azure_span.end :]
    wanted = dict(document, plugins=wanted_plugins)
    if json.loads(result) != wanted or list(json.loads(result)) != list(document):
        raise InstallError(f"{name}: could not splice the wgcni entry without changing other content; wgcni changed "
                           f"nothing (please report this file)")
    return result


def has_entry(text: str) -> bool:
    """Whether a conflist text (valid or not) carries a wgcni plugin entry; for `wgcni check`."""
    try:
        plugins = json.loads(text).get("plugins")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(plugins, list) and any(isinstance(plugin, dict) and _is_wgcni(plugin) for plugin in plugins)


# --------------------------------------------------------------------------------------------------------------------
# Files: which conflist is active, atomic writes, backups
# --------------------------------------------------------------------------------------------------------------------


def active_config(conf_dir: Path) -> Path | None:
    """The config file the runtime uses: the first by name among *.conf, *.conflist, *.json (directories skipped)."""
    try:
        entries = sorted(os.scandir(conf_dir), key=lambda entry: entry.name)
    except FileNotFoundError:
        return None
    for entry in entries:
        if os.path.splitext(entry.name)[1] in CNI_CONFIG_EXTENSIONS and not entry.is_dir():
            return Path(entry.path)
    return None


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise installers working on the same directory (init container vs watcher) without adding a file to it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_like(path: Path, data: bytes, like: os.stat_result) -> None:
    """Replace `path` with `data` atomically and durably, with the owner and mode of `like`."""
    write_atomically(path, data, stat.S_IMODE(like.st_mode), temporary_prefix=TEMPORARY_PREFIX,
                     owner=(like.st_uid, like.st_gid))


def _backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    with open(path, "rb") as handle:
        return handle.read(), os.fstat(handle.fileno())


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InstallError(f"{name} is not UTF-8 text; wgcni changed nothing") from None


@dataclass(frozen=True)
class ConflistPlan:
    """What install-cni will write into the active conflist (computed before anything is touched)."""

    path: Path
    original: bytes  # the file as read
    new_text: str | None  # None: already as wanted
    backup: bytes | None  # None: keep the existing backup
    stat: os.stat_result


def plan_conflist(conf_dir: Path, entry: dict) -> ConflistPlan:
    """Read the active conflist and compute the edit; raises InstallError with nothing changed."""
    path = active_config(conf_dir)
    if path is None:
        raise InstallError(f"no CNI config (*.conf, *.conflist, *.json) in {conf_dir}; is Azure CNI installed?")
    if path.is_symlink():
        raise InstallError(f"{path} is a symlink; wgcni edits only regular files, wgcni changed nothing")
    original, file_stat = _read(path)
    text = _decode(original, str(path))
    new_text = insert_entry(text, entry, str(path))
    backup_path = _backup_path(path)
    existing_backup = backup_path.read_bytes() if backup_path.is_file() else None
    if not has_entry(text):
        backup = original  # the owner's current version is the one to restore
    elif existing_backup is None:
        backup = strip_entries(text, str(path)).encode("utf-8")
    else:
        backup = None
    if backup == existing_backup:
        backup = None
    return ConflistPlan(path, original, None if new_text == text else new_text, backup, file_stat)


def apply_conflist(plan: ConflistPlan) -> bool:
    """Write the backup then the conflist; False when the file changed since it was read (caller re-plans).

    A writer that replaces the file in the microseconds between this re-read and our rename loses its version to
    ours: no lock can exclude Azure CNS, which does not take one. Its earlier versions are never lost.
    """
    current, _ = _read(plan.path)
    if current != plan.original:
        return False
    if plan.backup is not None:
        _write_like(_backup_path(plan.path), plan.backup, plan.stat)
    if plan.new_text is not None:
        _write_like(plan.path, plan.new_text.encode("utf-8"), plan.stat)
    return True


# --------------------------------------------------------------------------------------------------------------------
# The plugin binary
# --------------------------------------------------------------------------------------------------------------------


def _tree_files(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """Every file and symlink under `root` (or `root` itself when it is a file), sorted by relative path."""
    if not root.is_dir():
        return [("", root, root.lstat())]
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(directory, filename)
            files.append((path.relative_to(root).as_posix(), path, path.lstat()))
    return files


# Digests by (path, every file's relative path/inode/size/mtime/mode): the watcher re-checks the plugin on every pass;
# measured here on the 37 MB plugin bundle: hashing 51 ms, the cached check (a stat per file) 0.9 ms.
_digest_cache: dict[tuple, str] = {}


def _digest(root: Path) -> str:
    """sha256 over the relative paths, exec bits and contents of a file or a directory tree (symlinks by target)."""
    files = _tree_files(root)
    signature = (str(root), tuple((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode) for rel, _, st in files))
    if signature in _digest_cache:
        return _digest_cache[signature]
    digest = hashlib.sha256()
    for relative, path, file_stat in files:
        if stat.S_ISLNK(file_stat.st_mode):
            digest.update(f"L {relative} {os.readlink(path)}\n".encode())
            continue
        # A bundle's exec bits are part of it; a single file is always installed 0755, so only its bytes count.
        digest.update(f"F {relative} {file_stat.st_mode & 0o111 if relative else 0:o}\n".encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    _digest_cache[signature] = digest.hexdigest()
    return _digest_cache[signature]


def _fsync_tree(root: Path) -> None:
    for directory, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(directory, filename)
            if not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(directory)


def install_plugin(source: Path, bin_dir: Path) -> bool:
    """Install `source` (executable file or one-directory bundle) as `<bin_dir>/wgcni`; False when already current."""
    destination = bin_dir / PLUGIN_TYPE
    bundles = bin_dir / BUNDLE_DIR_NAME
    if source.is_dir():
        executable = source / PLUGIN_TYPE
        if not (executable.is_file() and os.access(executable, os.X_OK)):
            raise InstallError(f"plugin bundle {source} has no executable {PLUGIN_TYPE}; rebuild it (make build)")
        version = _digest(source)
        target = f"{BUNDLE_DIR_NAME}/{version}/{PLUGIN_TYPE}"
        if destination.is_symlink() and os.readlink(destination) == target and (bundles / version).is_dir():
            return False
        previous = os.readlink(destination) if destination.is_symlink() else None
        bundles.mkdir(mode=0o755, exist_ok=True)
        if not (bundles / version).is_dir():
            staging = Path(tempfile.mkdtemp(dir=bundles, prefix=TEMPORARY_PREFIX))
            try:
                shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
                os.chmod(staging, 0o755)
                _fsync_tree(staging)  # the symlink must never point at a bundle a power loss could leave truncated
                os.replace(staging, bundles / version)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        replace_symlink(destination, target, temporary_prefix=TEMPORARY_PREFIX)
        # Keep the bundle the previous symlink pointed at: a plugin started just before the swap may still load from it.
        keep = {version}
        if previous and previous.startswith(BUNDLE_DIR_NAME + "/"):
            keep.add(Path(previous).parts[1])
        for stale in bundles.iterdir():
            if stale.name not in keep:
                shutil.rmtree(stale, ignore_errors=True)
        return True
    if not source.is_file():
        raise InstallError(f"plugin {source} not found; pass --plugin FILE (the built dist/bin/wgcni)")
    if (destination.is_file() and not destination.is_symlink() and os.access(destination, os.X_OK)
            and _digest(destination) == _digest(source)):
        return False
    with open(source, "rb") as original:
        write_atomically(destination, iter(lambda: original.read(1 << 20), b""), 0o755,
                         temporary_prefix=TEMPORARY_PREFIX)
    shutil.rmtree(bundles, ignore_errors=True)
    return True


def remove_plugin(bin_dir: Path) -> bool:
    """Remove `<bin_dir>/wgcni` and its bundles; False when nothing was there."""
    destination = bin_dir / PLUGIN_TYPE
    removed = False
    if destination.is_symlink() or destination.exists():
        os.unlink(destination)
        removed = True
    if (bin_dir / BUNDLE_DIR_NAME).is_dir():
        shutil.rmtree(bin_dir / BUNDLE_DIR_NAME)
        removed = True
    return removed


# --------------------------------------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------------------------------------


_REPLAN_ATTEMPTS = 5


def install(conf_dir: Path, bin_dir: Path, plugin: Path, settings: PluginSettings) -> list[str]:
    """Install the plugin and the conflist entry; returns what changed (empty: all was in place)."""
    for directory in (conf_dir, bin_dir):
        if not directory.is_dir():
            raise InstallError(f"{directory} is not a directory; pass --conf-dir/--bin-dir or mount it")
    changes: list[str] = []
    entry = settings.entry()
    with _locked(conf_dir):
        plan = plan_conflist(conf_dir, entry)  # refuse before touching anything
        if install_plugin(plugin, bin_dir):
            changes.append(f"installed plugin {bin_dir / PLUGIN_TYPE}")
        for _ in range(_REPLAN_ATTEMPTS):
            if apply_conflist(plan):
                break
            plan = plan_conflist(conf_dir, entry)  # the owner rewrote the file between our read and write
        else:
            raise InstallError(f"{plan.path} kept changing while wgcni tried to edit it; try again")
        if plan.new_text is not None:
            changes.append(f"inserted wgcni after {AZURE_TYPE} in {plan.path}")
    return changes


def _restore(path: Path, backup: Path) -> str | None:
    """Undo wgcni's edit of `path` using `backup`; returns what was done, None when there was nothing to undo."""
    if not path.is_file() or path.is_symlink():
        return None
    current, file_stat = _read(path)
    text = _decode(current, str(path))
    if not has_entry(text):
        return None
    original = backup.read_bytes() if backup.is_file() else None
    stripped = strip_entries(text, str(path))
    if original is not None and json.loads(stripped) == json.loads(_decode(original, str(backup))):
        _write_like(path, original, file_stat)
        return f"restored {path} from {backup.name}"
    _write_like(path, stripped.encode("utf-8"), file_stat)
    return f"removed the wgcni entry from {path} (it changed since install; backup not used)"


def uninstall(conf_dir: Path, bin_dir: Path) -> list[str]:
    """Take wgcni out of every conflist it is in (restoring originals) and remove the plugin; returns what changed."""
    changes: list[str] = []
    if conf_dir.is_dir():
        with _locked(conf_dir):
            names = sorted(os.listdir(conf_dir))
            for name in names:
                path = conf_dir / name
                if os.path.splitext(name)[1] in CNI_CONFIG_EXTENSIONS:
                    done = _restore(path, _backup_path(path))
                    if done:
                        changes.append(done)
            for name in names:
                if name.endswith(BACKUP_SUFFIX):
                    os.unlink(conf_dir / name)
                    changes.append(f"removed {conf_dir / name}")
            fsync_directory(conf_dir)
    if bin_dir.is_dir() and remove_plugin(bin_dir):
        changes.append(f"removed plugin {bin_dir / PLUGIN_TYPE}")
    return changes


# --------------------------------------------------------------------------------------------------------------------
# --watch
# --------------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------------
# CLI (registered by node_hook/cli.py as `wgcni-node install-cni` / `wgcni-node uninstall-cni`)
# --------------------------------------------------------------------------------------------------------------------


def _directory_option(flag: str, default: Path, what: str) -> Callable:
    return click.option(flag, type=click.Path(path_type=Path), default=default, show_default=True, help=what)


def _fail(command: str, message: str) -> None:
    click.echo(f"wgcni-node {command}: error: {message}", err=True)
    sys.exit(1)


def _settings_from(config: Path | None, state_dir: str | None, hook_socket: str | None, log_file: str | None,
                   log_level: str | None) -> PluginSettings:
    """Plugin settings: explicit options win, then the hook's config file (so both agree), then the defaults."""
    defaults = PluginSettings()
    if config is not None:
        from node_hook.config import ConfigError, load_settings

        try:
            hook = load_settings(config)
        except ConfigError as error:
            raise InstallError(str(error)) from None
        defaults = PluginSettings(state_dir=str(hook.state_dir), hook_socket=str(hook.socket),
                                  log_file=defaults.log_file, log_level=hook.log_level)
    return PluginSettings(
        state_dir=state_dir or defaults.state_dir,
        hook_socket=hook_socket or defaults.hook_socket,
        log_file=log_file or defaults.log_file,
        log_level=log_level or defaults.log_level,
    )


@click.command("install-cni")
@_directory_option("--conf-dir", DEFAULT_CONF_DIR, "CNI config directory holding the Azure conflist")
@_directory_option("--bin-dir", DEFAULT_BIN_DIR, "CNI plugin directory")
@click.option("--plugin", type=click.Path(path_type=Path), default=BUNDLED_PLUGIN, show_default=True,
              help="the plugin to install: an executable or a PyInstaller one-directory bundle (the image's copy)")
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False),
              help="the hook's config file: stateDir, socket and logLevel are taken from it")
@click.option("--state-dir", help=f"plugin setting stateDir (pod records)  [default: {DEFAULT_STATE_DIR}]")
@click.option("--hook-socket", help=f"plugin setting hookSocket  [default: {DEFAULT_HOOK_SOCKET}]")
@click.option("--log-file", help=f"plugin setting logFile  [default: {DEFAULT_LOG_FILE}]")
@click.option("--log-level", type=click.Choice(LOG_LEVELS),
              help=f"plugin setting logLevel  [default: {DEFAULT_LOG_LEVEL}]")
@click.option("--watch", is_flag=True, help="keep running and re-insert the entry whenever the conf dir changes")
@click.option("--wait", is_flag=True,
              help="while the conflist is missing or not chainable yet (node boot, before Azure CNS wrote it), wait "
                   "for the conf dir to change and retry; exit once installed (the init container's mode)")
@click.option("--resync", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="with --watch: seconds between full re-checks besides change events")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="with --watch: polling period used only when inotify is unavailable")
def install_cni(conf_dir: Path, bin_dir: Path, plugin: Path, config: Path | None, state_dir: str | None,
                hook_socket: str | None, log_file: str | None, log_level: str | None, watch: bool, wait: bool,
                resync: float, poll_interval: float) -> None:
    """Install the wgcni plugin and chain it right after azure-vnet in the active conflist."""
    try:
        settings = _settings_from(config, state_dir, hook_socket, log_file, log_level)
        if not (watch or wait):
            for change in install(conf_dir, bin_dir, plugin, settings) or ["already installed; nothing changed"]:
                click.echo(change)
            return
        if not conf_dir.is_dir():
            raise InstallError(f"{conf_dir} is not a directory; pass --conf-dir or mount it")
    except (InstallError, OSError) as error:
        _fail("install-cni", str(error))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    watcher = Watcher(conf_dir, bin_dir, plugin, settings, resync_interval=resync, poll_interval=poll_interval)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    log.info("watching %s (%s)", conf_dir, "inotify" if watcher.uses_inotify else f"polling every {poll_interval}s")
    if not watcher.run(until_installed=not watch):
        sys.exit(1)  # stopped by a signal before the entry could be installed


@click.command("uninstall-cni")
@_directory_option("--conf-dir", DEFAULT_CONF_DIR, "CNI config directory holding the Azure conflist")
@_directory_option("--bin-dir", DEFAULT_BIN_DIR, "CNI plugin directory")
def uninstall_cni(conf_dir: Path, bin_dir: Path) -> None:
    """Restore the conflists wgcni edited and remove the plugin."""
    try:
        changes = uninstall(conf_dir, bin_dir)
    except (InstallError, OSError) as error:
        _fail("uninstall-cni", str(error))
    for change in changes or ["not installed; nothing changed"]:
        click.echo(change)
