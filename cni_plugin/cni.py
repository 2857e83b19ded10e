"""CNI protocol layer: the dispatcher(env, stdin, stdout) that kubelet's runtime drives through the plugin binary.

It parses and validates the environment and the network configuration, hands one command to ``commands``,
prints the result in the input's cniVersion, and turns every failure into a CNI error object on stdout with a
spec code (1 version, 4 environment, 6 decode, 7 configuration, 50/51 STATUS, 100+ wgcni's own) and exit 1.
Nothing escapes as a traceback: unexpected exceptions become code 999 and their traceback goes to the log file.
Standard library only (and not even ``json``: see cni_plugin/cjson.py; nor ``os`` or ``__future__``: see
cni_plugin/main.py).
"""

from cni_plugin import cjson
from cni_plugin.filelog import LEVELS, FileLog

TYPE_CHECKING = False  # typing is not imported on the CNI path (start-up time); these names are the checker's
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import BinaryIO, TextIO

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]

# Error codes from the CNI specification.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
# wgcni's own codes (100+).
ERR_RECORD_MISMATCH = 100
ERR_NOT_PROGRAMMED = 101
ERR_HOOK_PROTOCOL = 102
ERR_INTERNAL = 999

DEFAULT_STATE_DIR = "/var/lib/wgcni"
DEFAULT_HOOK_SOCKET = "/run/wgcni/hook.sock"
DEFAULT_LOG_FILE = "/var/log/wgcni/wgcni.log"
DEFAULT_LOG_LEVEL = "info"

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
MAX_STDIN_BYTES = 16 * 1024 * 1024


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class Settings:
    """The plugin's own keys of its conflist entry, with their defaults."""

    __slots__ = ("state_dir", "hook_socket", "log_file", "log_level")

    def __init__(self, state_dir: str, hook_socket: str, log_file: str, log_level: str) -> None:
        self.state_dir = state_dir
        self.hook_socket = hook_socket
        self.log_file = log_file
        self.log_level = log_level

    @classmethod
    def from_conf(cls, conf: dict) -> "Settings":
        return cls(
            state_dir=_absolute_path(conf, "stateDir", DEFAULT_STATE_DIR),
            hook_socket=_absolute_path(conf, "hookSocket", DEFAULT_HOOK_SOCKET),
            log_file=_absolute_path(conf, "logFile", DEFAULT_LOG_FILE, allow_empty=True),
            log_level=_log_level(conf),
        )


class NetConf:
    """The network configuration on stdin: the plugin's conflist entry with ``name``/``cniVersion`` injected."""

    __slots__ = ("raw", "cni_version", "network", "settings", "prev_result")

    def __init__(self, raw: dict, cni_version: str, network: str, settings: Settings, prev_result: dict | None):
        self.raw = raw
        self.cni_version = cni_version
        self.network = network
        self.settings = settings
        self.prev_result = prev_result


class Invocation:
    """The CNI_* environment of one call."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args")

    def __init__(self, command: str, container_id: str, netns: str, ifname: str, args: dict):
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args


def dispatch(env: "Mapping[str, str]", stdin: "BinaryIO", stdout: "TextIO") -> int:
    """Run one CNI command; returns the process exit code. Never raises for bad input.

    ``stdin`` is a binary stream, ``stdout`` a text stream. Until the configuration names its log file, only
    internal errors are logged (to the default file): bad input is the runtime's to report, and it gets the error.
    """
    command = env.get("CNI_COMMAND", "")
    error_version = LATEST_VERSION
    log = FileLog("", DEFAULT_LOG_LEVEL)  # disabled until the configuration is known
    try:
        try:
            if command not in COMMANDS:
                raise CniError(
                    ERR_INVALID_ENVIRONMENT,
                    f"unknown CNI_COMMAND {command!r:.40}" if command else "CNI_COMMAND is not set",
                    f"supported commands: {', '.join(COMMANDS)}",
                )
            raw = _decode_stdin(stdin)
            if raw.get("cniVersion") in SUPPORTED_VERSIONS:
                error_version = raw["cniVersion"]
            if command == "VERSION":
                return _write(stdout, _version_answer(raw))
            conf = parse_netconf(raw)
            log = FileLog(conf.settings.log_file, conf.settings.log_level)
            invocation = parse_environment(env, command)
            from cni_plugin import commands  # after validation: VERSION and bad input stay cheap

            result = commands.run(conf, invocation, log)
            if result is not None:
                _write(stdout, result)
            return 0
        except CniError as error:
            log.warning(f"{command or '-'} {_identity(env)} failed: code {error.code}: {error.msg}"
                        + (f" ({error.details})" if error.details else ""))
            _write(stdout, error_object(error_version, error.code, error.msg, error.details))
            return 1
    except Exception as unexpected:  # the top-level guard: no traceback ever reaches the runtime
        import traceback

        if not log.path:
            log = FileLog(DEFAULT_LOG_FILE, DEFAULT_LOG_LEVEL)
        log.error(f"{command or '-'} {_identity(env)} internal error:\n{traceback.format_exc()}")
        _write(
            stdout,
            error_object(
                error_version,
                ERR_INTERNAL,
                f"internal error in wgcni: {type(unexpected).__name__}",
                f"traceback in {log.path or 'the wgcni log (logging is disabled)'}",
            ),
        )
        return 1
    finally:
        log.close()


def error_object(cni_version: str, code: int, msg: str, details: str = "") -> dict:
    return {"cniVersion": cni_version, "code": code, "msg": msg, "details": details}


def _write(stdout: "TextIO", obj: dict) -> int:
    stdout.write(cjson.dumps(obj) + "\n")
    stdout.flush()
    return 0


def _identity(env: "Mapping[str, str]") -> str:
    return f"container={env.get('CNI_CONTAINERID', '')!r:.80} ifname={env.get('CNI_IFNAME', '')!r:.20}"


def _decode_stdin(stdin: "BinaryIO") -> dict:
    data = stdin.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise CniError(ERR_DECODE, f"network configuration larger than {MAX_STDIN_BYTES} bytes")
    if not data.strip():
        raise CniError(ERR_DECODE, "no network configuration on stdin")
    try:
        raw = cjson.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CniError(ERR_DECODE, "network configuration on stdin is not valid JSON", str(error)[:200]) from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "network configuration on stdin is not a JSON object")
    return raw


def _check_version(raw: dict) -> str:
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no cniVersion string")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r:.40}",
            f"wgcni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def _version_answer(raw: dict) -> dict:
    # The runtime asks which versions we speak; answer in its version when we know it, else in our latest.
    version = raw.get("cniVersion")
    return {
        "cniVersion": version if version in SUPPORTED_VERSIONS else LATEST_VERSION,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def parse_netconf(raw: dict) -> NetConf:
    version = _check_version(raw)
    network = raw.get("name")
    if not isinstance(network, str) or not network:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no network name ('name')")
    from cni_plugin.records import valid_network

    if not valid_network(network):
        raise CniError(
            ERR_INVALID_CONFIG,
            f"network name {network!r:.80} cannot be used",
            "it must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}",
        )
    prev_result = raw.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult is not a JSON object")
    return NetConf(raw, version, network, Settings.from_conf(raw), prev_result)


def parse_environment(env: "Mapping[str, str]", command: str) -> Invocation:
    container_id = env.get("CNI_CONTAINERID", "")
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK"):
        required = ["CNI_CONTAINERID", "CNI_IFNAME"] + (["CNI_NETNS"] if command != "DEL" else [])
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise CniError(ERR_INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)} in the environment")
    return Invocation(command, container_id, netns, ifname, parse_cni_args(env.get("CNI_ARGS", "")))


def parse_cni_args(value: str) -> dict:
    """``K=V;K=V`` as the runtime passes it in CNI_ARGS."""
    args = {}
    for pair in value.split(";"):
        if not pair:
            continue
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENVIRONMENT, f"CNI_ARGS entry {pair!r:.80} is not KEY=VALUE")
        args[key] = val
    return args


def _absolute_path(conf: dict, key: str, default: str, allow_empty: bool = False) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str):
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be a string path")
    if allow_empty and value == "":
        return value
    if not value.startswith("/") or "\0" in value:
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be an absolute path, not {value!r:.80}")
    return value


def _log_level(conf: dict) -> str:
    value = conf.get("logLevel", DEFAULT_LOG_LEVEL)
    if not isinstance(value, str) or value.lower() not in LEVELS:
        raise CniError(ERR_INVALID_CONFIG, f"logLevel must be one of {', '.join(LEVELS)}, not {value!r:.40}")
    return value.lower()


def convert_result(result: dict, cni_version: str) -> dict:
    """``result`` re-expressed in ``cni_version``; keys the target version defines pass through untouched.

    0.3.x/0.4.0 results carry ``ips[].version`` ("4"/"6"), 1.x results do not; 1.1.0 added route
    ``mtu/advmss/priority/table/scope`` and interface ``mtu/socketPath/pciID``, which older versions lack.
    """
    converted = dict(result)
    converted["cniVersion"] = cni_version
    target = version_tuple(cni_version)
    if isinstance(result.get("ips"), list):
        ips = []
        for entry in result["ips"]:
            if isinstance(entry, dict):
                entry = dict(entry)
                if target >= (1, 0, 0):
                    entry.pop("version", None)
                elif "version" not in entry and isinstance(entry.get("address"), str):
                    entry["version"] = "6" if ":" in entry["address"] else "4"
            ips.append(entry)
        converted["ips"] = ips
    if target < (1, 1, 0):
        converted = _drop_keys(converted, "routes", ("mtu", "advmss", "priority", "table", "scope"))
        converted = _drop_keys(converted, "interfaces", ("mtu", "socketPath", "pciID"))
    return converted


def _drop_keys(result: dict, list_key: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(result.get(list_key), list):
        return result
    result[list_key] = [
        {k: v for k, v in item.items() if k not in keys} if isinstance(item, dict) else item
        for item in result[list_key]
    ]
    return result
