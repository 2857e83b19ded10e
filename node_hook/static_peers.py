"""The static `PeerSource` (docs/design.md): remote nodes from a JSON file, re-read whenever it changes.

For tests and for clusters without Kubernetes. File format:

    {"nodes": [{"name": "node-b", "publicKey": "<base64>", "endpoint": "10.240.0.35", "endpointPort": 51820,
                "nodeIPs": ["10.240.0.35"], "podIPs": ["10.240.0.70"], "podIPsChangedAt": 1732580000.0,
                "nextPublicKey": "<base64>", "keySwitchAt": 1732580100.0}]}

`publicKey` may be "" (a node without WireGuard: plaintext, reported); `nextPublicKey` and `keySwitchAt` (unix time)
announce a key rotation (node_hook.rotation), as the announcement does. Every successful read is a complete list.
A file that cannot be parsed is reported once per change and the last good list stays in force. `publish()` writes
this node's announcement to `announce_file` (atomically, JSON with the same field names) when one is configured.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from cni_plugin.files import write_atomically
from node_hook.addresses import address_texts, host_keys
from node_hook.model import LocalAnnouncement, Publication, RemoteNode
from node_hook.peers import PeerSink

log = logging.getLogger(__name__)


class PeersFileError(ValueError):
    pass


def parse_peers(text: str, where: str) -> dict[str, RemoteNode]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PeersFileError(f"{where}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise PeersFileError(f'{where}: expected {{"nodes": [...]}}')
    nodes: dict[str, RemoteNode] = {}
    for index, entry in enumerate(document["nodes"]):
        label = f"{where}: nodes[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise PeersFileError(f"{label}: needs a non-empty 'name'")
        try:
            node_ips = host_keys(entry.get("nodeIPs", []), f"{label} nodeIPs")
            pod_ips = host_keys(entry.get("podIPs", []), f"{label} podIPs")
            endpoint = entry.get("endpoint") or None
            if endpoint is not None:
                host_keys([endpoint], f"{label} endpoint")
            port = int(entry.get("endpointPort", 51820))
            changed_at = float(entry.get("podIPsChangedAt", 0.0))
            switch_at = float(entry.get("keySwitchAt", 0.0))
        except (TypeError, ValueError) as error:
            raise PeersFileError(str(error) if label in str(error) else f"{label}: {error}") from None
        key = entry.get("publicKey", "")
        next_key = entry.get("nextPublicKey", "")
        if not isinstance(key, str) or not isinstance(next_key, str):
            raise PeersFileError(f"{label}: publicKey and nextPublicKey must be strings")
        nodes[entry["name"]] = RemoteNode(entry["name"], key, endpoint, port, node_ips, pod_ips, changed_at,
                                          next_public_key=next_key, key_switch_at=switch_at)
    return nodes


def announcement_json(announcement: LocalAnnouncement) -> dict[str, object]:
    return {
        "name": announcement.name,
        "publicKey": announcement.public_key,
        "endpoint": announcement.endpoint_ip,
        "endpointPort": announcement.endpoint_port,
        "nodeIPs": sorted(announcement.node_ips),
        "podIPs": sorted(address_texts(announcement.pod_ips)),
        "mtu": announcement.mtu,
        "ready": announcement.ready,
        "message": announcement.message,
        **({"nextPublicKey": announcement.next_public_key, "keySwitchAt": announcement.key_switch_at}
           if announcement.next_public_key else {}),
    }


class StaticPeerSource:
    def __init__(self, peers_file: Path, announce_file: Path | None = None, poll_interval: float = 0.2) -> None:
        self.peers_file = Path(peers_file)
        self.announce_file = Path(announce_file) if announce_file else None
        self.poll_interval = poll_interval
        self.error: str | None = None
        self.complete = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: tuple[int, int, int] | None = None
        self._sink: PeerSink | None = None

    def start(self, sink: PeerSink) -> None:
        self._sink = sink
        self._poll(sink)
        self._thread = threading.Thread(target=self._run, args=(sink,), name="wgcni-static-peers", daemon=True)
        self._thread.start()

    def _run(self, sink: PeerSink) -> None:
        while not self._stopping.wait(self.poll_interval):
            self._poll(sink)

    def _poll(self, sink: PeerSink) -> None:
        try:
            info = self.peers_file.stat()
            signature = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            signature = None
        if signature == self._signature and self.complete:
            return
        self._signature = signature
        if signature is None:
            self._report(f"{self.peers_file}: no such file; waiting for it")
            return
        try:
            nodes = parse_peers(self.peers_file.read_text(), str(self.peers_file))
        except (OSError, PeersFileError) as error:
            self._report(str(error))
            return
        self.error = None
        self.complete = True
        sink.nodes_synced(nodes)

    def _report(self, message: str) -> None:
        if message != self.error:
            log.error("%s (keeping the last good peer list)", message)
        self.error = message

    def publish(self, announcement: LocalAnnouncement) -> None:
        """Write the announcement where the operator's tooling takes it (if configured); the peers file is
        written by that tooling, so what this node announces is taken as held (there is no API to ask)."""
        if self.announce_file is not None:
            self.announce_file.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(announcement_json(announcement), indent=1) + "\n"
            write_atomically(self.announce_file, text.encode(), 0o644,
                             temporary_prefix=f".{self.announce_file.name}.tmp.", durable=False)
        if self._sink is not None:
            self._sink.published(Publication("written", announcement.public_key,
                                             announcement.node_ips | frozenset(address_texts(announcement.pod_ips)),
                                             next_public_key=announcement.next_public_key,
                                             key_switch_at=announcement.key_switch_at))

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
