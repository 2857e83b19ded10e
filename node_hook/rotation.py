"""Key rotation, make-before-break: the pure rules of when a node and its peers switch to a node's next key.

A rotating node publishes its next public key and a switch time (`keySwitchAt`, wall clock, SWITCH_LEAD ahead)
while it still uses the current key. Once the API holds that, the node switches its device to the next key at the
switch time, and every peer replaces the node's peer entry SWITCH_DELAY later, so the node is always first: setting
a private key ends every session at once and the node's own handshake attempt may go to a peer still on the old
key, but a peer's replaced entry is a fresh peer that may start a handshake at once (WireGuard spaces a peer's
handshake attempts 5 s apart), and every side greets the peers it changes, so the pair is back within a round trip
of the later switch. A peer that learns of the rotation late switches as soon as it does. A switch time more than
SWITCH_GRACE in the past is a rotation that did not happen (the node died before switching): peers keep the
current key, and the node, back, publishes a new switch time. docs/design.md "Key rotation" has the reasoning.
"""

from __future__ import annotations

from dataclasses import replace

from node_hook.model import Publication, RemoteNode

SWITCH_LEAD = 5.0  # seconds between publishing the next key and switching: every peer's watch has it by then
SWITCH_DELAY = 0.25  # peers switch this long after the node (more than the clock skew between nodes)
SWITCH_GRACE = 600.0  # a switch time older than this did not happen


def effective_key(node: RemoteNode, now: float) -> str:
    """The key a peer programs for `node` at wall time `now`."""
    if node.next_public_key and node.key_switch_at + SWITCH_DELAY <= now <= node.key_switch_at + SWITCH_GRACE:
        return node.next_public_key
    return node.public_key


def effective(node: RemoteNode, now: float) -> RemoteNode:
    """`node` as a peer programs it at `now`: its public key is the effective one."""
    key = effective_key(node, now)
    return node if key == node.public_key else replace(node, public_key=key)


def next_change(node: RemoteNode, now: float) -> float | None:
    """The wall time after `now` at which `effective_key(node)` changes, or None when it does not."""
    if not node.next_public_key:
        return None
    for moment in (node.key_switch_at + SWITCH_DELAY, node.key_switch_at + SWITCH_GRACE):
        if moment > now:
            return moment
    return None


def switch_time(publication: Publication, next_public_key: str, planned: float, now: float) -> float:
    """The switch time a rotating node keeps: the one the API already holds for this next key when it is still
    valid (a hook restarted in a rotation takes its own earlier announcement, which peers may have acted on), else
    the one it planned."""
    if publication.next_public_key == next_public_key and publication.key_switch_at > now - SWITCH_GRACE:
        return publication.key_switch_at
    return planned


def confirmed(publication: Publication, next_public_key: str, switch_at: float) -> bool:
    """Whether the API holds this node's next key with this switch time (peers can know it)."""
    return publication.next_public_key == next_public_key and abs(publication.key_switch_at - switch_at) < 1e-3
