"""Durable pod-record store shared by the plugin (the only writer) and the node hook (a lock-free reader).

Layout and format are fixed in docs/design.md ("Pod records"):
``<stateDir>/pods/<network>/<containerID>@<ifname>.json``, one JSON object per attachment, mode 0600, written
atomically (temp file in the same directory, fsync, rename, fsync of the directory) under an exclusive ``flock`` on
``<stateDir>/pods/.lock``. A crash at any instant leaves the old or the new record, never a torn one; readers skip
``.tmp*`` files and never need the lock. Temp files of writers that were killed are swept by a writer at most once
per ``TEMP_SWEEP_INTERVAL`` per network (the mtime of ``<stateDir>/pods/.temp-sweep.<network>`` says when it last
happened), so an ADD does not list a directory that holds every pod of the node; CNI GC sweeps every time.
Standard library only: this module is on the plugin's ADD/DEL path, where it avoids ``re`` and ``json`` (see
cni_plugin/cjson.py: names are checked against character sets) and ``os`` (see cni_plugin/main.py) for start-up
time.
"""

import fcntl
import posix
import time

from cni_plugin import cjson
from cni_plugin.files import directory_of, fsync_directory, join, open_creating_directory, write_atomically

RECORD_FORMAT = 1
RECORD_SUFFIX = ".json"
TEMP_PREFIX = ".tmp"
LOCK_NAME = ".lock"
TEMP_SWEEP_STAMP_PREFIX = ".temp-sweep."
TEMP_SWEEP_INTERVAL = 60.0  # seconds between two sweeps of one network's temp files by writers

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")

_REQUIRED_FIELDS = {
    "format": int,
    "network": str,
    "containerID": str,
    "ifname": str,
    "netns": str,
    "ips": list,
    "cniVersion": str,
    "prevResult": dict,
    "created": str,
    "updated": str,
}
_OPTIONAL_STR_FIELDS = ("podNamespace", "podName", "podUID")


class RecordError(ValueError):
    """A name or a record that does not satisfy the record contract."""


def _is_name(value: object, max_length: int, alnum_first: bool) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        and (not alnum_first or value[0] in _ALNUM)
        and _NAME_CHARS.issuperset(value)
    )


def valid_container_id(container_id: str) -> bool:
    """True when the container ID may appear in a record file name: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,254}``."""
    return _is_name(container_id, 255, alnum_first=True)


def valid_ifname(ifname: str) -> bool:
    """True when the interface name may appear in a record file name: ``[A-Za-z0-9_.-]{1,15}``, not . or .."""
    return _is_name(ifname, 15, alnum_first=False) and ifname not in (".", "..")


def valid_network(network: str) -> bool:
    """True when the network name may be used as a directory name: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``."""
    return _is_name(network, 128, alnum_first=True)


def _check_key(network: str, container_id: str, ifname: str) -> None:
    if not valid_network(network):
        raise RecordError(f"invalid network name {network!r:.80}")
    if not valid_container_id(container_id):
        raise RecordError(f"invalid container ID {container_id!r:.80}")
    if not valid_ifname(ifname):
        raise RecordError(f"invalid interface name {ifname!r:.80}")


def record_file_name(container_id: str, ifname: str) -> str:
    """The file name of one attachment's record (callers validate the parts first)."""
    return f"{container_id}@{ifname}{RECORD_SUFFIX}"


def utc_now_rfc3339() -> str:
    """The current time as an RFC 3339 UTC timestamp with second precision."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def validate_record(record: object) -> dict:
    """Return ``record`` when it satisfies the record contract, else raise RecordError naming the problem."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    for field, field_type in _REQUIRED_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, field_type) or isinstance(value, bool):
            raise RecordError(f"record field {field!r} missing or not a {field_type.__name__}")
    if record["format"] != RECORD_FORMAT:
        raise RecordError(f"unsupported record format {record['format']!r}")
    for field in _OPTIONAL_STR_FIELDS:
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"record field {field!r} is neither a string nor null")
    if not all(isinstance(ip, str) for ip in record["ips"]):
        raise RecordError("record field 'ips' holds a non-string")
    _check_key(record["network"], record["containerID"], record["ifname"])
    return record


class RecordStore:
    """The pod records below one state directory (``<stateDir>/pods``)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.pods_dir = join(state_dir, "pods")
        self.lock_path = join(self.pods_dir, LOCK_NAME)

    # -- paths ---------------------------------------------------------------------------------------------------

    def network_dir(self, network: str) -> str:
        if not valid_network(network):
            raise RecordError(f"invalid network name {network!r:.80}")
        return join(self.pods_dir, network)

    def record_path(self, network: str, container_id: str, ifname: str) -> str:
        _check_key(network, container_id, ifname)
        return join(self.network_dir(network), record_file_name(container_id, ifname))

    def temp_sweep_stamp(self, network: str) -> str:
        """The file whose mtime is the last sweep of `network`'s temp files (outside the network's directory, which
        holds records and temp files only; not a network name, so ``networks()`` never lists it)."""
        return join(self.pods_dir, TEMP_SWEEP_STAMP_PREFIX + network)

    # -- writer side (the plugin) --------------------------------------------------------------------------------

    def lock(self) -> "StoreLock":
        """The exclusive writer lock; use as a context manager around read-modify-write sequences."""
        return StoreLock(self)

    def write(self, record: dict, sync_directory: bool = True) -> str:
        """Atomically create or replace one record; returns its directory. The caller holds ``lock()``. With
        ``sync_directory=False`` the record is visible but durable only once the caller has run
        ``files.fsync_directory`` on that directory."""
        validate_record(record)
        directory = self.network_dir(record["network"])
        _remove_stale_temp_files_when_due(directory, self.temp_sweep_stamp(record["network"]))
        final_path = join(directory, record_file_name(record["containerID"], record["ifname"]))
        payload = cjson.dumps(record, sort_keys=True).encode() + b"\n"
        write_atomically(final_path, payload, 0o600, temporary_prefix=TEMP_PREFIX + ".", create_directory=True,
                         sync_directory=sync_directory)
        return directory

    def remove(self, network: str, container_id: str, ifname: str, sync_directory: bool = True) -> bool:
        """Remove one record; False when there was none. The caller holds ``lock()``. With
        ``sync_directory=False`` the removal is durable only once the caller has run ``files.fsync_directory`` on
        the record's directory."""
        path = self.record_path(network, container_id, ifname)
        if not _unlink_if_present(path):
            return False
        if sync_directory:
            fsync_directory(directory_of(path))
        return True

    def remove_all_except(self, network: str, keep: set[tuple[str, str]]) -> list[dict]:
        """Remove every record of ``network`` whose (containerID, ifname) is not in ``keep`` (CNI GC).

        Returns the removed records. Files that are not valid records are left alone (not ours to judge);
        stale temp files of killed writers are removed. The caller holds ``lock()``.
        """
        directory = self.network_dir(network)
        removed = []
        _remove_stale_temp_files(directory)
        for record in self.list(network):
            if (record["containerID"], record["ifname"]) in keep:
                continue
            path = join(directory, record_file_name(record["containerID"], record["ifname"]))
            if _unlink_if_present(path):
                removed.append(record)
        if removed:
            fsync_directory(directory)
        return removed

    # -- reader side (plugin and hook; no lock needed) ------------------------------------------------------------

    def read(self, network: str, container_id: str, ifname: str) -> dict | None:
        """One record, or None when there is none. Raises RecordError when the file is not a valid record."""
        return _load(self.record_path(network, container_id, ifname))

    def networks(self) -> list[str]:
        """Names of the networks that have a record directory, sorted."""
        try:
            names = posix.listdir(self.pods_dir)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if valid_network(name) and _is_directory(join(self.pods_dir, name)))

    def list(self, network: str | None = None, errors: list[str] | None = None) -> list[dict]:
        """Valid records of one network (or of all networks), sorted by (network, containerID, ifname).

        A file that is not a valid record is skipped; its path and the reason are appended to ``errors``
        when a list is given, so a caller can report it instead of silently ignoring it.
        """
        records = []
        for name in [network] if network is not None else self.networks():
            directory = self.network_dir(name)
            try:
                entries = posix.listdir(directory)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.startswith(TEMP_PREFIX) or not entry.endswith(RECORD_SUFFIX) or "@" not in entry:
                    continue
                path = join(directory, entry)
                try:
                    record = _load(path)
                except RecordError as error:
                    if errors is not None:
                        errors.append(f"{path}: {error}")
                    continue
                if record is None:
                    continue  # removed between listdir and open
                expected = record_file_name(record["containerID"], record["ifname"])
                if record["network"] != name or expected != entry:
                    if errors is not None:
                        errors.append(f"{path}: record names {record['network']}/{expected} instead")
                    continue
                records.append(record)
        records.sort(key=lambda r: (r["network"], r["containerID"], r["ifname"]))
        return records


class StoreLock:
    """Exclusive ``flock`` on ``<stateDir>/pods/.lock``, held by every writer for its whole update."""

    def __init__(self, store: RecordStore) -> None:
        self._store = store
        self._fd = -1

    def __enter__(self) -> "StoreLock":
        self._fd = open_creating_directory(self._store.lock_path, posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            posix.close(self._fd)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        posix.close(self._fd)  # closing the descriptor releases the lock
        self._fd = -1


def _load(path: str) -> dict | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError as error:
        raise RecordError(f"not a regular file: {error}") from None
    try:
        record = cjson.loads(data)
    except (ValueError, RecursionError) as error:
        raise RecordError(f"not valid JSON: {error}") from None
    return validate_record(record)


def _remove_stale_temp_files(directory: str) -> None:
    """Remove temp files left by writers that were killed; only safe while holding the store lock."""
    try:
        entries = posix.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(TEMP_PREFIX):
            _unlink_if_present(join(directory, entry))


def _remove_stale_temp_files_when_due(directory: str, stamp: str) -> None:
    """Sweep ``directory``'s temp files when the last sweep (the mtime of ``stamp``) is ``TEMP_SWEEP_INTERVAL`` or
    more ago, never happened, or lies in the future (the clock was set back); else one stat. Only safe while holding
    the store lock."""
    try:
        since_last = time.time() - posix.stat(stamp).st_mtime
    except FileNotFoundError:
        since_last = None
    if since_last is not None and 0 <= since_last < TEMP_SWEEP_INTERVAL:
        return
    _remove_stale_temp_files(directory)
    try:
        posix.utime(stamp)
    except FileNotFoundError:  # the first sweep of this network (pods/ exists: the caller holds its lock)
        posix.close(posix.open(stamp, posix.O_WRONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o600))


def _is_directory(path: str) -> bool:
    """``os.path.isdir``: whether ``path`` is a directory or a symlink to one."""
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o040000
    except (OSError, ValueError):
        return False


def _unlink_if_present(path: str) -> bool:
    try:
        posix.unlink(path)
    except FileNotFoundError:
        return False
    return True
