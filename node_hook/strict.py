"""Strict mode's desired state (pure): the strict table the firewall applier keeps (contracts.StrictSpec) from the
settings, the node's environment, the model's remote nodes and this node's publication. docs/design.md "Strict
mode" says what is matched and why it fails closed.

- "The cluster" is `strictCIDRs`, or else the subnets of the underlay interface's addresses (on AKS the VNet subnet
  of the nodes and of the pods Azure CNI takes from it), plus every address a node with a key publishes outside
  them (`NodeModel.strict_addresses`).
- Always reachable in plaintext: `strictAllow`, Azure's platform addresses (PLATFORM_ADDRESSES; they are outside the
  VNet anyway), the addresses of nodes without a key (opted out), WireGuard's own UDP.
- The rules drop (`enforce`) only with `strictMode` on a node that is not opted out itself (an opted-out node sends
  everything in plaintext by design); otherwise they count what strict mode would drop.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cni_plugin.strict import BOOT_FILE  # in stateDir: the table the plugin and install-cni load at boot
from cni_plugin.strict import TABLE as STRICT_TABLE
from node_hook.addresses import IPNetwork
from node_hook.config import Settings
from node_hook.contracts import StrictSpec
from node_hook.detect import Environment
from node_hook.model import NodeModel, Publication

PLATFORM_ADDRESSES = ("168.63.129.16/32", "169.254.169.254/32")  # Azure's wireserver (DNS, health probes) and IMDS


def networks(texts: tuple[str, ...] | frozenset[str]) -> tuple[IPNetwork, ...]:
    """Sorted, deduplicated networks of `texts` (addresses or CIDRs; host bits are dropped)."""
    found = {ipaddress.ip_network(text, strict=False) for text in texts}
    return tuple(sorted(found, key=lambda network: (network.version, network)))


def cluster_ranges(settings: Settings, environment: Environment) -> tuple[IPNetwork, ...]:
    """`strictCIDRs`, or the subnets of the node's underlay addresses (its addresses alone when it has none)."""
    return networks(settings.strict_cidrs or environment.subnets or environment.node_ips)


def boot_file(settings: Settings) -> Path:
    return settings.state_dir / BOOT_FILE


def enforcing(settings: Settings, publication: Publication) -> bool:
    """Whether the strict table drops (strictMode, and this node is not opted out) or only counts."""
    return settings.strict_mode and publication.state != "opted-out"


def desired_strict(settings: Settings, environment: Environment, host_encryption: bool, model: NodeModel,
                   publication: Publication) -> StrictSpec:
    cluster = cluster_ranges(settings, environment)
    exempt, published = model.strict_addresses(cluster)
    return StrictSpec(
        table=STRICT_TABLE,
        enforce=enforcing(settings, publication),
        host=host_encryption,
        fwmark=settings.fwmark,
        wireguard_interface=settings.interface,
        pod_interface_prefixes=settings.pod_interface_prefixes,
        listen_port=settings.listen_port,
        cluster=cluster,
        allow=networks(settings.strict_allow + PLATFORM_ADDRESSES),
        exempt=exempt,
        published=published,
        boot_file=str(boot_file(settings)),
        add_hold=settings.strict_add_hold,
    )
