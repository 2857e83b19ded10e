"""What the node offers (read-only): endpoint address, underlay interface and MTU, Azure or not, and the MTU to use.

Every decision carries a human-readable reason that the status API shows (`mtuReason`, `azureReason`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from node_hook.config import Settings

AZURE_VENDOR = "Microsoft Corporation"
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"  # chassis asset tag of every Azure VM
WIREGUARD_OVERHEAD = {4: 60, 6: 80}  # outer IP + UDP + WireGuard header + auth tag
AZURE_UNDERLAY_LOSS = 100  # Azure's underlay carries 1400 with DF on a 1500 NIC
PROBE_DESTINATION = {4: "192.0.2.1", 6: "2001:db8::1"}  # TEST-NET: only a route lookup, nothing is sent


class DetectError(RuntimeError):
    pass


@dataclass(frozen=True)
class Environment:
    endpoint: str
    node_ips: frozenset[str]
    underlay_interface: str
    underlay_mtu: int
    azure: bool
    azure_reason: str
    mtu: int
    mtu_reason: str
    subnets: frozenset[str] = frozenset()  # the networks of the underlay interface's addresses (strict mode's cluster)


def kernel_wireguard_available(sys_root: Path = Path("/sys/module"), modules_root: Path = Path("/lib/modules")) -> bool:
    """True when the kernel has WireGuard loaded, built in, or as a module it can load on first use."""
    if (sys_root / "wireguard").exists():
        return True
    release = os.uname().release
    for index in ("modules.builtin", "modules.dep"):
        try:
            if "/wireguard.ko" in (modules_root / release / index).read_text():
                return True
        except OSError:
            continue
    return False


def detect_azure(setting: str, dmi_dir: Path = Path("/sys/class/dmi/id")) -> tuple[bool, str]:
    if setting != "auto":
        return setting == "true", f"azure: {setting} in the settings"
    for name, expected in (("chassis_asset_tag", AZURE_ASSET_TAG), ("sys_vendor", AZURE_VENDOR)):
        try:
            value = (dmi_dir / name).read_text().strip()
        except OSError:
            continue
        if value == expected:
            return True, f"DMI {name} is {expected!r}"
    return False, f"no Azure DMI vendor or asset tag in {dmi_dir}"


def wireguard_mtu(underlay_mtu: int, endpoint_version: int, azure: bool, override: int) -> tuple[int, str]:
    if override:
        return override, f"mtu {override} from the settings"
    mtu = underlay_mtu - WIREGUARD_OVERHEAD[endpoint_version]
    reason = f"underlay {underlay_mtu} - {WIREGUARD_OVERHEAD[endpoint_version]} (WireGuard over IPv{endpoint_version})"
    if azure:
        mtu -= AZURE_UNDERLAY_LOSS
        reason += f" - {AZURE_UNDERLAY_LOSS} (Azure underlay)"
    return mtu, f"{reason} = {mtu}"


def _first_address(ipr: IPRoute, version: int) -> str | None:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        answer = ipr.route("get", dst=PROBE_DESTINATION[version], family=family)
    except Exception:  # noqa: BLE001 - no route of that family: try the other one
        return None
    return answer[0].get("prefsrc") if answer else None


def detect(settings: Settings) -> Environment:
    with IPRoute() as ipr:
        endpoint = settings.endpoint or _first_address(ipr, 4) or _first_address(ipr, 6)
        if not endpoint:
            raise DetectError("endpoint: no default route to take this node's address from; set 'endpoint'")
        version = ipaddress.ip_address(endpoint).version
        addresses = ipr.get_addr(address=endpoint)
        if not addresses:
            raise DetectError(f"endpoint: {endpoint} is not an address of this node")
        index = addresses[0]["index"]
        link = ipr.get_links(index)[0]
        messages = [message for message in ipr.get_addr(index=index)
                    if message["scope"] == 0 and message.get("address")]
        node_ips = frozenset(message.get("address") for message in messages)
        subnets = frozenset(str(ipaddress.ip_interface(f"{message.get('address')}/{message['prefixlen']}").network)
                            for message in messages)
    azure, azure_reason = detect_azure(settings.azure)
    mtu, mtu_reason = wireguard_mtu(link.get("mtu"), version, azure, settings.mtu)
    return Environment(endpoint, node_ips | {endpoint}, link.get("ifname"), link.get("mtu"), azure, azure_reason,
                       mtu, mtu_reason, subnets)
