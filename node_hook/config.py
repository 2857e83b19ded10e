"""Settings of `wgcni-node`: one dataclass, every setting documented with its default in `SETTINGS_DOC`.

`load_settings(path)` reads YAML or JSON (JSON is valid YAML), maps the camelCase keys of the file to the
fields, and validates everything with one-line `ConfigError` messages a person can act on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin.strict import ADD_HOLD_MAX

# The single place that documents each setting: (file key, default, meaning).
SETTINGS_DOC: tuple[tuple[str, object, str], ...] = (
    ("nodeName", "$NODE_NAME or <hostname>", "this node's name (the Kubernetes Node name; the DaemonSet passes it as "
                 "NODE_NAME from spec.nodeName); peers and status use it"),
    ("stateDir", "/var/lib/wgcni", "state directory: pod records in <stateDir>/pods, key in <stateDir>/private.key"),
    ("socket", "/run/wgcni/hook.sock", "Unix socket of the local API (plugin notifications, CLI questions)"),
    ("interface", "wgcni0", "WireGuard device name (at most 15 characters)"),
    ("listenPort", 51820, "UDP port WireGuard listens on"),
    ("fwmark", 0x100000, "firewall mark bit(s) M: WireGuard's own packets carry M, the rule skips the table for M/M"),
    ("routeTable", 51820, "routing table holding the dev <wg> and throw routes (1..2^32-1, not 253/254/255)"),
    ("rulePriority", 99, "priority of the rule 'not fwmark M/M lookup <routeTable>' (v4 and v6); the hook's "
                         "'from <IP> lookup main' rules for IPs not yet published take rulePriority - 1"),
    ("backend", "auto", "WireGuard backend: kernel | userspace | auto (kernel when the module is available)"),
    ("wireguardGo", "wireguard-go", "the wireguard-go binary used by the userspace backend"),
    ("mtu", 0, "WireGuard device MTU; 0 = auto (underlay MTU - 60 v4 / 80 v6, - 100 more on Azure)"),
    ("azure", "auto", "running on Azure: auto (DMI vendor / asset tag) | true | false; affects auto MTU"),
    ("hostEncryption", "auto", "encrypt node-to-node traffic too: auto (on when Azure) | true | false"),
    ("strictMode", False, "fail closed: a pod's (and, with host encryption, the host's) packet to an address of the "
                          "cluster that would leave the underlay unencrypted is dropped and counted; false = counted "
                          "only (docs/design.md, strict mode)"),
    ("strictCIDRs", [], "the cluster's address ranges for strict mode; empty = the subnets of the underlay "
                        "interface's addresses (on AKS the VNet subnet of nodes and pods)"),
    ("strictAllow", [], "addresses or CIDRs inside the cluster ranges that may be reached in plaintext in strict "
                        "mode (an API server or a VM in the VNet); Azure's 168.63.129.16 and 169.254.169.254 always"),
    ("strictAddHold", 1.0, "strict mode: seconds the plugin's ADD waits at most for the API to hold the new pod's IP "
                           "(its peers learn it from there), so its containers start once peers can reach it; 0 = "
                           "no wait"),
    ("persistentKeepalive", 0, "seconds between keepalives to each peer; 0 = off"),
    ("keyRotationInterval", 0, "rotate this node's WireGuard key when it is this many seconds old (at least 3600; "
                               "make-before-break, docs/design.md 'Key rotation'); 0 = only on `wgcni-node "
                               "rotate-key`"),
    ("endpoint", "", "this node's underlay address peers send to; empty = the source IP of the default route"),
    ("peersFile", "", "static peer source (JSON, re-read when it changes); empty = Kubernetes sync"),
    ("announceFile", "", "with peersFile: where to write this node's announcement (JSON); empty = none"),
    ("podInterfacePrefixes", ["azv"], "host-side pod veth name prefixes (azure-vnet names them azv<hash>)"),
    ("metricsAddress", "", "host:port serving Prometheus metrics and /healthz, /readyz; empty = off"),
    ("resyncInterval", 90.0, "seconds between full read-back-and-diff passes over every aspect"),
    ("recordRescanInterval", 10.0, "seconds between rescans of the pod records directory (safety net)"),
    ("logLevel", "info", "debug | info | warning | error"),
    ("logFormat", "text", "text | json (JSON lines)"),
)

MIN_KEY_ROTATION_INTERVAL = 3600  # a rotation costs every peer a handshake; more often is no use
MAX_KEY_ROTATION_INTERVAL = 10 * 365 * 86400
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_RESERVED_TABLES = {0, 253, 254, 255}


# The settings a running hook takes from a changed config file without a restart (the strict table is replaced in one
# transaction); any other change waits for the hook to restart.
LIVE_SETTINGS = ("strict_mode", "strict_cidrs", "strict_allow")


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the setting and the fix."""


@dataclass(frozen=True)
class Settings:
    """Validated settings; field names are the snake_case of the file keys in `SETTINGS_DOC`."""

    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    state_dir: Path = Path("/var/lib/wgcni")
    socket: Path = Path("/run/wgcni/hook.sock")
    interface: str = "wgcni0"
    listen_port: int = 51820
    fwmark: int = 0x100000
    route_table: int = 51820
    rule_priority: int = 99
    backend: str = "auto"
    wireguard_go: str = "wireguard-go"
    mtu: int = 0
    azure: str = "auto"
    host_encryption: str = "auto"
    strict_mode: bool = False
    strict_cidrs: tuple[str, ...] = ()
    strict_allow: tuple[str, ...] = ()
    strict_add_hold: float = 1.0
    persistent_keepalive: int = 0
    key_rotation_interval: float = 0.0
    endpoint: str = ""
    peers_file: Path | None = None
    announce_file: Path | None = None
    pod_interface_prefixes: tuple[str, ...] = ("azv",)
    metrics_address: str = ""
    resync_interval: float = 90.0
    record_rescan_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "text"

    @property
    def bypass_rule_priority(self) -> int:
        """The priority of the hook's `from <IP> lookup main` rules: just before the tunnel rule."""
        return self.rule_priority - 1

    @property
    def records_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "private.key"

    @property
    def sysctl_originals_file(self) -> Path:
        return self.state_dir / "sysctl-originals.json"


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?<![A-Z])([A-Z])", r"_\1", key).lower()  # strictCIDRs -> strict_cidrs


_FILE_KEYS = {doc[0]: _snake(doc[0]) for doc in SETTINGS_DOC}


def _tristate(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value in ("auto", "true", "false"):
        return str(value)
    raise ConfigError(f"{name}: must be auto, true or false, not {value!r}")


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is outside {low}..{high}")
    return value


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: must be true or false, not {value!r}")
    return value


def _networks(name: str, value: object) -> tuple[str, ...]:
    """A list of addresses or CIDRs, normalised to network text (host bits must be zero)."""
    if not isinstance(value, list):
        raise ConfigError(f"{name}: must be a list of addresses or CIDRs, not {value!r}")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(item)))
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {item!r} is not an address or a CIDR with zero host bits") from None
    return tuple(out)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name}: must be a positive number of seconds, not {value!r}")
    return float(value)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string, not {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def settings_from_mapping(raw: dict[str, Any]) -> Settings:
    """Validate a mapping with the file's camelCase keys; missing keys keep their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of settings")
    unknown = sorted(set(raw) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"config: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_FILE_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key == "nodeName":
            value = _text(key, value)
            if not value:
                raise ConfigError("nodeName: must not be empty")
        elif key in ("stateDir", "socket"):
            value = Path(_text(key, value))
            if not value.is_absolute():
                raise ConfigError(f"{key}: must be an absolute path, not {str(value)!r}")
        elif key in ("peersFile", "announceFile"):
            value = Path(_text(key, value)) if _text(key, value) else None
        elif key == "interface":
            value = _text(key, value)
            if not _IFNAME.match(value) or value in (".", ".."):
                raise ConfigError(f"interface: {value!r} is not a valid interface name (1-15 of A-Za-z0-9_.-)")
        elif key == "listenPort":
            value = _integer(key, value, 1, 65535)
        elif key == "fwmark":
            value = _integer(key, value, 1, 0xFFFFFFFF)
        elif key == "routeTable":
            value = _integer(key, value, 1, 0xFFFFFFFF)
            if value in _RESERVED_TABLES:
                raise ConfigError(f"routeTable: {value} is a kernel table (local/main/default); pick another")
        elif key == "rulePriority":
            value = _integer(key, value, 2, 32765)  # the bypass rules take rulePriority - 1; 0 is the local table
        elif key == "backend":
            value = _choice(key, value, ("auto", "kernel", "userspace"))
        elif key == "wireguardGo":
            value = _text(key, value)
        elif key == "mtu":
            value = _integer(key, value, 0, 65535)
            if 0 < value < 1280:
                raise ConfigError(f"mtu: {value} is below 1280 (the IPv6 minimum); use 0 for auto")
        elif key in ("azure", "hostEncryption"):
            value = _tristate(key, value)
        elif key == "strictMode":
            value = _boolean(key, value)
        elif key in ("strictCIDRs", "strictAllow"):
            value = _networks(key, value)
        elif key == "strictAddHold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= ADD_HOLD_MAX:
                raise ConfigError(f"strictAddHold: must be 0..{ADD_HOLD_MAX:g} seconds, not {value!r}")
            value = float(value)
        elif key == "persistentKeepalive":
            value = _integer(key, value, 0, 65535)
        elif key == "keyRotationInterval":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value == 0 or MIN_KEY_ROTATION_INTERVAL <= value <= MAX_KEY_ROTATION_INTERVAL):
                raise ConfigError(f"keyRotationInterval: must be 0 (off) or {MIN_KEY_ROTATION_INTERVAL}.."
                                  f"{MAX_KEY_ROTATION_INTERVAL} seconds, not {value!r}")
            value = float(value)
        elif key == "endpoint":
            value = _text(key, value)
            if value:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise ConfigError(f"endpoint: {value!r} is not an IP address") from None
        elif key == "podInterfacePrefixes":
            if not isinstance(value, list) or not all(isinstance(p, str) and _IFNAME.match(p) for p in value):
                raise ConfigError("podInterfacePrefixes: must be a list of interface name prefixes")
            value = tuple(value)
        elif key == "metricsAddress":
            value = _text(key, value)
            if value and ":" not in value:
                raise ConfigError(f"metricsAddress: {value!r} must be host:port")
        elif key in ("resyncInterval", "recordRescanInterval"):
            value = _seconds(key, value)
        elif key == "logLevel":
            value = _choice(key, value, ("debug", "info", "warning", "error"))
        elif key == "logFormat":
            value = _choice(key, value, ("text", "json"))
        values[_FILE_KEYS[key]] = value
    if values.get("strict_mode") and values.get("host_encryption") == "false":
        raise ConfigError("strictMode: needs host encryption (hostEncryption auto or true): without it every pod "
                          "packet to another node's IP would be dropped")
    return Settings(**values)


def with_live_settings(running: Settings, new: Settings) -> Settings:
    """`running` with the LIVE_SETTINGS of `new`."""
    return dataclasses.replace(running, **{name: getattr(new, name) for name in LIVE_SETTINGS})


def load_settings(path: Path) -> Settings:
    """Read and validate a YAML or JSON settings file."""
    import yaml  # only the daemon/CLI loads config; keep it out of import-time of anything else

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"config: cannot read {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path} is not valid YAML/JSON{where}") from None
    return settings_from_mapping(raw or {})


def settings_as_mapping(settings: Settings) -> dict[str, Any]:
    """The settings with the file's keys (for status output and for writing test configs)."""
    by_field = {snake: key for key, snake in _FILE_KEYS.items()}
    out: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif value is None:
            value = ""
        out[by_field[item.name]] = value
    return out
