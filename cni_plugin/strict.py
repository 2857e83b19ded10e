"""Strict mode's guard on ADD (standard library only): no pod starts on a strict node before the strict table is in
the kernel. After a reboot the kernel has no nftables state and the hook may not run yet; the hook keeps the strict
table in `<stateDir>/strict.nft` while strict mode is on (node_hook/apply/firewall.py). When that file exists and the
table `inet wgcni-strict` does not, ADD loads the file (`nft -f`: its `create table` fails, changing nothing, when the
hook got there first) and fails with "try again later" if the table is still missing, so the runtime retries the
sandbox instead of running a pod whose packets could leave in plaintext. The common case costs one netlink request.
The file's first line also says how long ADD may wait for the hook to see the pod's IP in the API (`strictAddHold`):
its peers learn it from there, so the pod's containers start once they can reach it.
"""

import posix

from cni_plugin.cni import ERR_NOT_AVAILABLE, CniError
from cni_plugin.files import join

BOOT_FILE = "strict.nft"
ADD_HOLD_PREFIX = "# wgcni add-hold "  # the boot file's first line: seconds ADD waits for the hook's publication
TABLE = "wgcni-strict"
ADD_HOLD_MAX = 30.0  # seconds; strictAddHold and the hook's local API refuse more
NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")
NETLINK_NETFILTER = 12
NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE
NFT_MSG_NEWTABLE = (10 << 8) | 0
NLMSG_ERROR = 2
NLM_F_REQUEST_ACK = 0x1 | 0x4
NFPROTO_INET = 1
NFTA_TABLE_NAME = 1
ENOENT = 2


def table_present(name: str = TABLE) -> bool:
    """Whether nftables has the table `inet <name>` in this network namespace (one NFT_MSG_GETTABLE)."""
    import _socket  # only on strict nodes: importing struct and _socket costs every other ADD ~1 ms
    import struct

    payload = name.encode() + b"\0"
    attribute = struct.pack("=HH", 4 + len(payload), NFTA_TABLE_NAME) + payload
    attribute += b"\0" * (-len(attribute) % 4)
    body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attribute
    message = struct.pack("=IHHII", 16 + len(body), NFT_MSG_GETTABLE, NLM_F_REQUEST_ACK, 1, 0) + body
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(2.0)
        sock.send(message)
        found = False
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NFT_MSG_NEWTABLE:
                    found = True
                elif kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error == 0:
                        return found
                    if -error == ENOENT:
                        return False
                    raise OSError(-error, posix.strerror(-error))
                offset += max(length + (-length % 4), 16)
    finally:
        sock.close()


def _load(path: str) -> str:
    """`nft -f path`: '' when it ran (or the table exists already), else why not."""
    nft = next((candidate for candidate in NFT_PATHS if posix.access(candidate, posix.X_OK)), None)
    if nft is None:
        return "nft is not installed on the node"
    import subprocess  # only on the boot path: a pod's ADD before the hook has loaded the table

    result = subprocess.run([nft, "-f", path], capture_output=True, text=True, timeout=10)
    if result.returncode != 0 and "File exists" not in result.stderr:
        return f"nft -f {path}: {result.stderr.strip()}"
    return ""


def _add_hold(path: str) -> float:
    with open(path, encoding="utf-8") as file:
        first = file.readline()
    try:
        if not first.startswith(ADD_HOLD_PREFIX):
            return 0.0
        return max(0.0, min(ADD_HOLD_MAX, float(first[len(ADD_HOLD_PREFIX):])))
    except ValueError:
        return 0.0


def ensure_strict_table(state_dir: str) -> tuple[str, float]:
    """Raise CniError unless strict mode is off here or its table is loaded. Returns what was done ('' = nothing)
    and how long ADD may wait for the hook to publish the pod (0 without strict mode)."""
    path = join(state_dir, BOOT_FILE)
    try:
        hold = _add_hold(path)
    except (FileNotFoundError, NotADirectoryError):
        return "", 0.0  # strict mode is off (or the state dir is unusable: the record write says so)
    except OSError:
        hold = 0.0  # there but unreadable: strict mode is on, the table must be there all the same
    try:
        if table_present():
            return "", hold
        why = _load(path)
        if not why and table_present():
            return f"strict mode: loaded {path} (the table was missing: boot)", hold
    except OSError as error:
        why = f"nftables: {error.strerror or error}"
    raise CniError(ERR_NOT_AVAILABLE, f"strict mode: the nftables table inet {TABLE} is not loaded",
                   f"{why or 'it is still missing'}; wgcni-node loads it when it starts, then the pod can start "
                   "(until then it could send in plaintext)")
