"""Userspace WireGuard backend: a supervised `wireguard-go -f <ifname>` configured through its UAPI socket.

`UapiClient` speaks the cross-platform text protocol that `wg` uses on `/var/run/wireguard/<ifname>.sock`
(`get=1` / `set=1`, key=value lines, keys in hex, a blank line ends a request, `errno=N` ends the answer).

`UserspaceWireGuard` implements `WireGuardBackend`:
- `ensure_device` starts `wireguard-go -f` when no process answers on the socket (one left running by a previous
  hook process is adopted: `close()` leaves it serving, so restarting the hook does not cut traffic), then sets key,
  port and fwmark over UAPI and MTU/up over netlink. A watcher thread reports the child's exit through `on_exit` so
  the daemon restarts it at once with the same key.
- `apply_peer_ops` sends all ops in ONE `set=1` transaction (wireguard-go applies it under the device lock).
  `RemoveAllowedIPs` gives the prefixes to a temporary all-zero-key peer and deletes that peer in the same
  transaction: the peer's other AllowedIPs are never touched and there is no window (wireguard-go accepts the
  zero key; checked against wireguard-go 0.0.20220316 in tests/netns/test_wg_uapi.py).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_ntop
from typing import Callable

from pyroute2 import IPRoute

from node_hook.apply.wireguard import (
    DeviceSpec,
    DeviceState,
    IPNetwork,
    PeerOp,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    UpsertPeer,
)
from node_hook.keys import public_key_of
from node_hook.model import packed_prefix, paused_gc, prefix_from_text

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
ZERO_KEY_HEX = "00" * 32


class UapiError(RuntimeError):
    """wireguard-go refused a request (errno != 0) or its socket did not answer."""


def key_to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def hex_to_key(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def prefix_text(prefix: IPNetwork) -> str:
    """`10.0.0.1/32` for UAPI. Formats the packed address in C: `str(prefix)` is Python code and was 45 % of the
    CPU time of programming 125 000 AllowedIPs (bench/p3b_uapi.py); this halves it."""
    address, prefixlen = packed_prefix(prefix)
    return f"{inet_ntop(AF_INET6 if len(address) == 16 else AF_INET, address)}/{prefixlen}"


def parse_prefix(text: str) -> IPNetwork:
    """The inverse of `prefix_text` for what wireguard-go prints (always the network address), built the model's
    way (`prefix_from_text`): 4x cheaper than `ipaddress.ip_network(text)`, which was 90 % of reading back a device
    with 75 000 AllowedIPs (bench/p3b_uapi.py)."""
    return prefix_from_text(text)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    address = ipaddress.ip_address(endpoint[0])
    return f"[{address}]:{endpoint[1]}" if address.version == 6 else f"{address}:{endpoint[1]}"


def parse_endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]"), int(port))


class UapiClient:
    """One request per connection, as `wg` does."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _exchange(self, request: str) -> list[str]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(self.timeout)
            connection.connect(str(self.socket_path))
            connection.sendall(request.encode())
            chunks: list[bytes] = []
            tail = b""
            while not tail.endswith(b"\n\n"):
                chunk = connection.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                tail = (tail + chunk)[-2:]
        lines = b"".join(chunks).decode().split("\n")
        lines = [line for line in lines if line]
        if not lines or not lines[-1].startswith("errno="):
            raise UapiError(f"{self.socket_path}: truncated answer")
        code = int(lines[-1].split("=", 1)[1])
        if code:
            raise UapiError(f"{self.socket_path}: wireguard-go answered errno={code} ({os.strerror(code)})")
        return lines[:-1]

    def alive(self) -> bool:
        try:
            self._exchange("get=1\n\n")
            return True
        except (OSError, UapiError):
            return False

    def get(self) -> tuple[dict[str, str], list[dict[str, object]]]:
        """(device fields, peers); each peer has its fields plus `allowed_ip`: list[str]."""
        device: dict[str, str] = {}
        peers: list[dict[str, object]] = []
        current: dict[str, object] | None = None
        for line in self._exchange("get=1\n\n"):
            key, _, value = line.partition("=")
            if key == "public_key":
                current = {"public_key": value, "allowed_ip": []}
                peers.append(current)
            elif current is None:
                device[key] = value
            elif key == "allowed_ip":
                current["allowed_ip"].append(value)  # type: ignore[union-attr]
            else:
                current[key] = value
        return device, peers

    def set(self, lines: list[str]) -> None:
        self._exchange("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")


def peer_op_lines(ops: list[PeerOp]) -> list[str]:
    """The UAPI `set` lines for `ops`, in order."""
    lines: list[str] = []
    for op in ops:
        if isinstance(op, UpsertPeer):
            lines.append(f"public_key={key_to_hex(op.public_key)}")
            if op.endpoint is not None:
                lines.append(f"endpoint={format_endpoint(op.endpoint)}")
            lines.append(f"persistent_keepalive_interval={op.persistent_keepalive}")
            if op.replace_allowed_ips:
                lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={prefix_text(prefix)}" for prefix in op.allowed_ips]
        elif isinstance(op, RemoveAllowedIPs):
            lines.append(f"public_key={ZERO_KEY_HEX}")
            lines += [f"allowed_ip={prefix_text(prefix)}" for prefix in op.allowed_ips]
            lines += [f"public_key={ZERO_KEY_HEX}", "remove=true"]
        elif isinstance(op, RemovePeer):
            lines += [f"public_key={key_to_hex(op.public_key)}", "remove=true"]
    return lines


class UserspaceWireGuard:
    """WireGuardBackend on wireguard-go, for the network namespace the hook runs in."""

    kind = "userspace"

    def __init__(
        self,
        ifname: str,
        wireguard_go: str = "wireguard-go",
        socket_dir: Path = SOCKET_DIR,
        on_exit: Callable[[int], None] | None = None,
        start_timeout: float = 5.0,
        log_file: Path | None = None,
    ) -> None:
        self.ifname = ifname
        self.log_file = log_file
        self.wireguard_go = wireguard_go
        self.client = UapiClient(Path(socket_dir) / f"{ifname}.sock")
        self.on_exit = on_exit
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ipr = IPRoute()
        self.restarts = 0

    # ---- process supervision ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _start(self) -> None:
        self._stop_child()
        stale = self._ipr.link_lookup(ifname=self.ifname)
        if stale:  # a TUN left by a dead wireguard-go: the new one cannot take the name
            self._ipr.link("del", index=stale[0])
        if self.client.socket_path.exists():  # left by a killed wireguard-go; nobody answers on it
            self.client.socket_path.unlink()
        environment = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1")
        # Its output goes to a file, not a pipe: wireguard-go outlives the hook (see close()), and a Go program
        # writing to a broken stdout pipe dies of SIGPIPE without removing its socket.
        output = open(self.log_file, "ab") if self.log_file is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [self.wireguard_go, "-f", self.ifname],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        except OSError as error:
            raise UapiError(f"cannot start {self.wireguard_go}: {error.strerror}") from None
        finally:
            if output is not subprocess.DEVNULL:
                output.close()  # type: ignore[union-attr]
        self._process = process
        threading.Thread(target=self._watch, args=(process,), name=f"wireguard-go-{self.ifname}",
                         daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UapiError(f"wireguard-go {self.ifname} exited with {process.returncode} at start")
            if self.client.alive() and self._ipr.link_lookup(ifname=self.ifname):
                self.restarts += 1
                return
            time.sleep(0.01)
        raise UapiError(f"wireguard-go {self.ifname}: no UAPI socket after {self.start_timeout:.0f}s")

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if process is self._process:
            log.warning("wireguard-go %s exited with %s", self.ifname, code)
            if self.on_exit is not None:
                self.on_exit(code)

    def _stop_child(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # ---- WireGuardBackend ------------------------------------------------------------------------------

    def read(self) -> DeviceState | None:
        with paused_gc():  # 1.25 M AllowedIPs (5 000 x 250): 13.4 -> 3.6 s CPU with GC paused (see model.paused_gc)
            return self._read()

    def _read(self) -> DeviceState | None:
        with self._lock:
            links = self._ipr.link_lookup(ifname=self.ifname)
            if not links:
                return None
            try:
                device, peers = self.client.get()
            except (OSError, UapiError):
                return None
            link = self._ipr.get_links(links[0])[0]
        private_hex = device.get("private_key", "")
        public_key = public_key_of(bytes.fromhex(private_hex)) if private_hex else ""
        return DeviceState(
            name=self.ifname,
            public_key=public_key,
            listen_port=int(device.get("listen_port", "0")),
            fwmark=int(device.get("fwmark", "0")),
            mtu=link.get("mtu"),
            up=bool(link["flags"] & 1),
            peers=self._peer_states(peers),
        )

    @staticmethod
    def _peer_states(peers: list[dict[str, object]]) -> dict[str, PeerState]:
        states: dict[str, PeerState] = {}
        for peer in peers:
            key = hex_to_key(str(peer["public_key"]))
            endpoint = str(peer.get("endpoint", "")) or None
            states[key] = PeerState(
                public_key=key,
                endpoint=parse_endpoint(endpoint) if endpoint else None,
                allowed_ips=frozenset(parse_prefix(p) for p in peer["allowed_ip"]),  # type: ignore[union-attr]
                persistent_keepalive=int(str(peer.get("persistent_keepalive_interval", "0"))),
                latest_handshake=int(str(peer.get("last_handshake_time_sec", "0")))
                + int(str(peer.get("last_handshake_time_nsec", "0"))) / 1e9,
                rx_bytes=int(str(peer.get("rx_bytes", "0"))),
                tx_bytes=int(str(peer.get("tx_bytes", "0"))),
            )
        return states

    def ensure_device(self, spec: DeviceSpec) -> None:
        with self._lock:
            if not (self.client.alive() and self._ipr.link_lookup(ifname=self.ifname)):
                self._start()
            self.client.set([
                f"private_key={spec.private_key.hex()}",
                f"listen_port={spec.listen_port}",
                f"fwmark={spec.fwmark}",
            ])
            index = self._ipr.link_lookup(ifname=self.ifname)[0]
            self._ipr.link("set", index=index, mtu=spec.mtu, state="up")

    def apply_peer_ops(self, ops: list[PeerOp]) -> None:
        if ops:
            with self._lock:
                self.client.set(peer_op_lines(ops))

    def delete_device(self) -> None:
        with self._lock:
            self._stop_child()
            links = self._ipr.link_lookup(ifname=self.ifname)
            if links:  # also ends an adopted wireguard-go: it exits when its TUN goes away
                self._ipr.link("del", index=links[0])
            deadline = time.monotonic() + 3
            while self.client.socket_path.exists() and self.client.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.client.socket_path.exists() and not self.client.alive():
                self.client.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the netlink socket and stop supervising. wireguard-go keeps serving the device, as a kernel
        device outlives the hook: a restarted hook adopts it, so a hook restart or upgrade does not cut traffic.
        `delete_device()` (wgcni-node cleanup) ends it."""
        with self._lock:
            self._process = None
            self._ipr.close()
