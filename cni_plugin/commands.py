"""The CNI commands of the chained plugin, one function each: ADD, DEL, CHECK, STATUS, GC.

ADD records the pod's IPs (from azure-vnet's prevResult) in the durable record store and nudges the node hook;
DEL removes the record; CHECK compares record, prevResult and the hook's view; STATUS and GC are the 1.1.0
additions. VERSION is answered by the dispatcher without loading this module. Standard library only.
"""

import _socket

from cni_plugin import notify
from cni_plugin.cni import (
    ERR_HOOK_PROTOCOL,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENVIRONMENT,
    ERR_IO,
    ERR_LIMITED_CONNECTIVITY,
    ERR_NOT_AVAILABLE,
    ERR_NOT_PROGRAMMED,
    ERR_RECORD_MISMATCH,
    ERR_UNKNOWN_CONTAINER,
    CniError,
    Invocation,
    NetConf,
    convert_result,
    version_tuple,
)
from cni_plugin.filelog import FileLog
from cni_plugin.files import fsync_directory
from cni_plugin.records import (
    RECORD_FORMAT,
    RecordError,
    RecordStore,
    utc_now_rfc3339,
    valid_container_id,
    valid_ifname,
)
from cni_plugin.strict import ensure_strict_table

NOT_CHAINED = "must be called as chained plugin"
NOT_CHAINED_DETAILS = "list wgcni after azure-vnet in the conflist's plugins so that it receives a prevResult"
HOOK_HELP = "start or repair the wgcni-node DaemonSet pod on this node; its log says why it is not ready"


def run(conf: NetConf, invocation: Invocation, log: FileLog) -> dict | None:
    """Run ``invocation.command``; returns the result object to print, or None when the command prints nothing."""
    handler = {"ADD": add, "DEL": delete, "CHECK": check, "STATUS": status, "GC": gc}[invocation.command]
    return handler(conf, invocation, log)


def add(conf: NetConf, invocation: Invocation, log: FileLog) -> dict:
    if conf.prev_result is None:
        raise CniError(ERR_INVALID_CONFIG, NOT_CHAINED, NOT_CHAINED_DETAILS)
    _require_valid_names(invocation)
    ips = pod_ips(conf.prev_result)
    loaded, hold = ensure_strict_table(conf.settings.state_dir)  # before the record: a refused ADD leaves nothing
    if loaded:
        log.warning(loaded)
    store = RecordStore(conf.settings.state_dir)
    now = utc_now_rfc3339()
    record = {
        "format": RECORD_FORMAT,
        "network": conf.network,
        "containerID": invocation.container_id,
        "ifname": invocation.ifname,
        "netns": invocation.netns,
        "podNamespace": invocation.args.get("K8S_POD_NAMESPACE"),
        "podName": invocation.args.get("K8S_POD_NAME"),
        "podUID": invocation.args.get("K8S_POD_UID"),
        "ips": ips,
        "cniVersion": conf.cni_version,
        "prevResult": conf.prev_result,
        "created": now,
        "updated": now,
    }
    pending = None
    try:
        with store.lock():
            try:
                previous = store.read(conf.network, invocation.container_id, invocation.ifname)
            except RecordError as error:
                log.warning(f"replacing unreadable record: {error}")
                previous = None
            if previous is not None:
                record["created"] = previous["created"]
            directory = store.write(record, sync_directory=False)
            log.info(
                f"ADD {conf.network}/{invocation.container_id}@{invocation.ifname} "
                f"pod={record['podNamespace']}/{record['podName']} ips={','.join(ips) or '-'}"
            )
            if not ips:
                log.warning(f"prevResult of {invocation.container_id} has no IPs: nothing for the hook to encrypt")
            # The record is visible: the hook reads it while its directory is synced; ADD succeeds only after both.
            pending = _notify(conf, invocation, "pod-added", log, hold)
            fsync_directory(directory)
    except OSError as error:
        _abandon(pending)
        raise CniError(ERR_IO, f"cannot write the pod record under {store.pods_dir}", _os_reason(error)) from None
    except RecordError as error:
        raise CniError(ERR_IO, f"cannot write the pod record under {store.pods_dir}", str(error)) from None
    _finish_notification(pending, "pod-added", log)
    return convert_result(conf.prev_result, conf.cni_version)


def delete(conf: NetConf, invocation: Invocation, log: FileLog) -> None:
    if not (valid_container_id(invocation.container_id) and valid_ifname(invocation.ifname)):
        # ADD refuses such names, so no record can exist: DEL must still succeed for the runtime to clean up.
        log.info(f"DEL of an attachment wgcni cannot have recorded ({invocation.container_id!r:.80}): nothing to do")
        return None
    store = RecordStore(conf.settings.state_dir)
    pending = None
    try:
        with store.lock():
            removed = store.remove(conf.network, invocation.container_id, invocation.ifname, sync_directory=False)
            log.info(f"DEL {conf.network}/{invocation.container_id}@{invocation.ifname} "
                     f"{'removed the record' if removed else 'found no record'}")
            if removed:  # as in ADD: the hook drops the pod while the removal is synced
                pending = _notify(conf, invocation, "pod-deleted", log)
                fsync_directory(store.network_dir(conf.network))
    except OSError as error:
        _abandon(pending)
        raise CniError(ERR_IO, f"cannot remove the pod record under {store.pods_dir}", _os_reason(error)) from None
    _finish_notification(pending, "pod-deleted", log)
    return None


def check(conf: NetConf, invocation: Invocation, log: FileLog) -> None:
    if version_tuple(conf.cni_version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {conf.cni_version}",
                       "CHECK exists from cniVersion 0.4.0 on")
    if conf.prev_result is None:
        raise CniError(ERR_INVALID_CONFIG, NOT_CHAINED, NOT_CHAINED_DETAILS)
    _require_valid_names(invocation)
    expected_ips = pod_ips(conf.prev_result)
    store = RecordStore(conf.settings.state_dir)
    try:
        record = store.read(conf.network, invocation.container_id, invocation.ifname)
    except RecordError as error:
        raise CniError(ERR_RECORD_MISMATCH, "the pod record is unreadable", str(error)) from None
    except OSError as error:
        raise CniError(ERR_IO, f"cannot read the pod record under {store.pods_dir}", _os_reason(error)) from None
    if record is None:
        raise CniError(
            ERR_UNKNOWN_CONTAINER,
            f"wgcni has no record of {invocation.container_id}@{invocation.ifname} in network {conf.network}",
            "ADD never completed for this attachment, or its record was removed",
        )
    if record["ips"] != expected_ips:
        raise CniError(
            ERR_RECORD_MISMATCH,
            f"pod IPs changed since ADD: recorded {','.join(record['ips']) or '-'}, "
            f"prevResult has {','.join(expected_ips) or '-'}",
        )
    try:
        answer = notify.request(conf.settings.hook_socket, {"op": "check", "ips": expected_ips},
                                notify.QUERY_TIMEOUT_SECONDS)
    except notify.HookUnavailable as error:
        log.info(f"CHECK {invocation.container_id}: record matches; hook not asked ({error})")
        return None
    except notify.HookProtocolError as error:
        raise CniError(ERR_HOOK_PROTOCOL, "wgcni-node gave an invalid answer to check", str(error)) from None
    if not answer["ok"]:
        raise CniError(ERR_NOT_PROGRAMMED, f"wgcni-node could not check the pod: {_hook_error(answer)}", HOOK_HELP)
    if answer.get("programmed") is not True:
        missing = answer.get("missing")
        missing_text = ",".join(str(ip) for ip in missing) if isinstance(missing, list) else "?"
        raise CniError(
            ERR_NOT_PROGRAMMED,
            f"pod IPs not programmed in the WireGuard dataplane (missing: {missing_text})",
            str(answer.get("message", "")),
        )
    return None


def status(conf: NetConf, invocation: Invocation, log: FileLog) -> None:
    _require_version(conf, "STATUS", (1, 1, 0))
    socket_path = conf.settings.hook_socket
    try:
        answer = notify.request(socket_path, {"op": "status"}, notify.QUERY_TIMEOUT_SECONDS)
    except notify.HookUnavailable as error:
        raise CniError(ERR_NOT_AVAILABLE, f"wgcni-node is not answering: {error}", HOOK_HELP) from None
    except notify.HookProtocolError as error:
        raise CniError(ERR_NOT_AVAILABLE, f"wgcni-node gave an invalid status answer: {error}", HOOK_HELP) from None
    if not answer["ok"]:
        raise CniError(ERR_NOT_AVAILABLE, f"wgcni-node reports an error: {_hook_error(answer)}", HOOK_HELP)
    if answer.get("ready") is not True or answer.get("dataplane_programmed") is not True:
        raise CniError(
            ERR_LIMITED_CONNECTIVITY,
            f"wgcni-node is not ready: {answer.get('message') or 'dataplane not programmed yet'}",
            "pods start, but their traffic to other nodes is not encrypted (or not routed) until it is; "
            + HOOK_HELP,
        )
    return None


def gc(conf: NetConf, invocation: Invocation, log: FileLog) -> None:
    _require_version(conf, "GC", (1, 1, 0))
    keep = valid_attachments(conf.raw)
    store = RecordStore(conf.settings.state_dir)
    try:
        with store.lock():
            removed = store.remove_all_except(conf.network, keep)
    except OSError as error:
        raise CniError(ERR_IO, f"cannot collect pod records under {store.pods_dir}", _os_reason(error)) from None
    log.info(f"GC {conf.network}: kept {len(keep)} attachments, removed {len(removed)} stale records")
    for record in removed:
        log.info(f"GC removed {conf.network}/{record['containerID']}@{record['ifname']} ips={','.join(record['ips'])}")
        message = {"op": "pod-deleted", "network": conf.network, "containerID": record["containerID"],
                   "ifname": record["ifname"]}
        pending = _send_notification(conf.settings.hook_socket, message, log)
        if pending is None:
            break  # the hook is away: its periodic rescan catches the rest, no need to wait once per record
        _finish_notification(pending, "pod-deleted", log)
    return None


def pod_ips(prev_result: dict) -> list[str]:
    """Host addresses of ``prevResult.ips`` (prefix dropped), deduplicated, IPv4 first, each family in order."""
    entries = prev_result.get("ips", [])
    if not isinstance(entries, list):
        raise CniError(ERR_INVALID_CONFIG, "prevResult.ips is not a list")
    addresses = set()
    for index, entry in enumerate(entries):
        address = entry.get("address") if isinstance(entry, dict) else None
        parsed = parse_cidr_host(address) if isinstance(address, str) else None
        if parsed is None:
            raise CniError(ERR_INVALID_CONFIG, f"prevResult.ips[{index}].address is not an IP address with prefix",
                           f"got {address!r:.60}")
        addresses.add(parsed)
    return [format_host(family, packed) for family, packed in sorted(addresses)]


def format_host(family: int, packed: bytes) -> str:
    """The address as ``ipaddress`` prints it (the form the hook and the API use). inet_ntop gives the same text
    except for IPv6 addresses it prints with a dotted IPv4 tail (``::0.1.0.0``, ``::ffff:1.2.3.4``); only those
    rare ones pay for importing ``ipaddress``."""
    text = _socket.inet_ntop(family, packed)
    if family == _socket.AF_INET6 and "." in text:
        import ipaddress

        text = str(ipaddress.IPv6Address(packed))
    return text


def parse_cidr_host(cidr: str) -> tuple[int, bytes] | None:
    """``"10.240.0.65/16"`` -> (family, packed host address); None when it is not an address with a valid prefix.

    The C resolver functions (inet_pton/inet_ntop) parse and print the canonical form instead of ``ipaddress``,
    whose import (it pulls in re and functools) would slow the plugin's start-up path. IPv4 families sort
    before IPv6 (AF_INET 2 < AF_INET6 10), addresses of one family in numeric order.
    """
    address, slash, prefix = cidr.partition("/")
    family = _socket.AF_INET6 if ":" in address else _socket.AF_INET
    max_prefix = 128 if family == _socket.AF_INET6 else 32
    if not slash or not prefix.isascii() or not prefix.isdigit() or len(prefix) > 3 or int(prefix) > max_prefix:
        return None
    try:
        return family, _socket.inet_pton(family, address)
    except OSError:
        return None


def valid_attachments(raw: dict) -> set[tuple[str, str]]:
    """The (containerID, ifname) pairs GC must keep.

    libcni sends the list as ``cni.dev/valid-attachments`` and, because of a naming slip in the 1.1.0 spec text,
    also as ``cni.dev/attachments``; either is accepted. A GC without the list is refused rather than read as
    "keep nothing", which would drop every record of the network.
    """
    key = "cni.dev/valid-attachments" if "cni.dev/valid-attachments" in raw else "cni.dev/attachments"
    attachments = raw.get(key)
    if not isinstance(attachments, list):
        raise CniError(ERR_INVALID_CONFIG, "GC needs the list of valid attachments (cni.dev/valid-attachments)")
    keep = set()
    for index, attachment in enumerate(attachments):
        if not (isinstance(attachment, dict) and isinstance(attachment.get("containerID"), str)
                and isinstance(attachment.get("ifname"), str)):
            raise CniError(ERR_INVALID_CONFIG, f"{key}[{index}] is not an object with containerID and ifname strings")
        keep.add((attachment["containerID"], attachment["ifname"]))
    return keep


def _require_valid_names(invocation: Invocation) -> None:
    if not valid_container_id(invocation.container_id):
        raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_CONTAINERID {invocation.container_id!r:.80} is not valid",
                       "it must match [A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
    if not valid_ifname(invocation.ifname):
        raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_IFNAME {invocation.ifname!r:.40} is not valid",
                       "it must match [A-Za-z0-9_.-]{1,15} and not be . or ..")


def _require_version(conf: NetConf, command: str, minimum: tuple[int, int, int]) -> None:
    if version_tuple(conf.cni_version) < minimum:
        wanted = ".".join(str(part) for part in minimum)
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"{command} is not defined for cniVersion {conf.cni_version}",
                       f"{command} exists from cniVersion {wanted} on")


def _notify(conf: NetConf, invocation: Invocation, op: str, log: FileLog, hold: float = 0.0) -> notify.Pending | None:
    """`hold` (strict mode, pod-added): the hook answers once the API holds the pod's IP, at most `hold` s later."""
    message: dict[str, object] = {"op": op, "network": conf.network, "containerID": invocation.container_id,
                                  "ifname": invocation.ifname}
    if hold > 0:
        message["hold"] = hold
    return _send_notification(conf.settings.hook_socket, message, log, notify.NOTIFY_TIMEOUT_SECONDS + hold)


def _send_notification(socket_path: str, message: dict, log: FileLog,
                       timeout: float = notify.NOTIFY_TIMEOUT_SECONDS) -> notify.Pending | None:
    """Best effort: the notification sent (its answer read by `_finish_notification`), or None when the hook could
    not be reached (logged; the hook picks the record up on its next rescan)."""
    try:
        return notify.send(socket_path, message, timeout)
    except notify.HookUnavailable as error:
        log.info(f"{message['op']} not delivered ({error}); the hook picks the record up on its next rescan")
        return None


def _finish_notification(pending: notify.Pending | None, op: str, log: FileLog) -> None:
    if pending is None:
        return
    try:
        answer = pending.answer()
    except notify.HookUnavailable as error:
        log.info(f"{op} not delivered ({error}); the hook picks the record up on its next rescan")
        return
    except notify.HookProtocolError as error:
        log.warning(f"{op}: invalid answer from the hook: {error}")
        return
    if not answer["ok"]:
        log.warning(f"{op}: the hook reports: {_hook_error(answer)}")


def _abandon(pending: notify.Pending | None) -> None:
    if pending is not None:
        pending.close()


def _hook_error(answer: dict) -> str:
    return str(answer.get("error") or "no reason given")


def _os_reason(error: OSError) -> str:
    return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
