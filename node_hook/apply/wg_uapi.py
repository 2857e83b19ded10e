"""Userspace WireGuard backend: a supervised `wireguard-go -f <ifname>` configured through its UAPI socket.

`UapiClient` speaks the cross-platform text protocol that `wg` uses on `/var/run/wireguard/<ifname>.sock`
(`get=1` / `set=1`, key=value lines, keys in hex, a blank line ends a request, `errno=N` ends the answer).

`UserspaceWireGuard` implements `WireGuardBackend`:
- `ensure_device` starts `wireguard-go -f` when no process answers on the socket (one left running by a previous
  hook process is adopted: `close()` leaves it serving, so restarting the hook does not cut traffic), then sets key,
  port and fwmark over UAPI and MTU/up over netlink. A watcher thread reports the child's exit through `on_exit` so
  the daemon restarts it at once with the same key.
- With a `private_dir`, wireguard-go runs in a mount namespace of its own in which `/var/run/wireguard` is that
  directory: its UAPI socket is private to the hook, and `UapiProxy` serves the public path `wg` uses, forwarding
  both ways and reporting every `set` that goes through it (`on_change`), so a peer edited with `wg set` is
  repaired at once. wireguard-go sends no change notifications, and reading back 5 000 peers costs seconds of CPU,
  so the hook must see the writes; the proxy can be recreated by each hook process (wireguard-go exits when the
  socket file it created is replaced or deleted, hence not simply a proxy in front of its own socket file).
- `apply_peer_ops` sends all ops in ONE `set=1` transaction (wireguard-go applies it under the device lock).
  `greet` sends peers one keepalive by turning persistent keepalive off, on and back (wireguard-go sends a
  keepalive when it is turned on, as the kernel does); the reconciler greets every peer new on the device, so after a
  restart of the hook's container (which wireguard-go does not outlive) the remote peer drops its session with the
  dead device now, instead of sending into it until its own handshake timeout (15 s).
  `RemoveAllowedIPs` gives the prefixes to a temporary all-zero-key peer and deletes that peer in the same
  transaction: the peer's other AllowedIPs are never touched and there is no window (wireguard-go accepts the
  zero key; checked against wireguard-go 0.0.20220316 in tests/netns/test_wg_uapi.py).
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_ntop

from pyroute2 import IPRoute

from node_hook.addresses import IPNetwork, packed_prefix, prefix_from_text
from node_hook.contracts import (
    DeviceSpec,
    DeviceState,
    DeviceStream,
    PeerOp,
    PeerState,
    RemoveAllowedIPs,
    RemovePeer,
    UpsertPeer,
    WireGuardChange,
)
from node_hook.keys import public_key_of
from node_hook.model import paused_gc

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
    """`10.0.0.1/32` for UAPI. Formats the packed address in C: `str(prefix)` is Python code, and formatting is
    most of the CPU of programming many AllowedIPs (docs/benchmarks.md, P3b)."""
    address, prefixlen = packed_prefix(prefix)
    return f"{inet_ntop(AF_INET6 if len(address) == 16 else AF_INET, address)}/{prefixlen}"


def format_endpoint(endpoint: tuple[str, int]) -> str:
    address = ipaddress.ip_address(endpoint[0])
    return f"[{address}]:{endpoint[1]}" if address.version == 6 else f"{address}:{endpoint[1]}"


def parse_endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]"), int(port))


class UapiClient:
    """One request per connection, as `wg` does. Both directions stream: a request is written in chunks as its
    lines are made and an answer is parsed line by line as it arrives, so programming or reading 1.25 M AllowedIPs
    (5 000 x 250) never holds the whole text: not a `set`'s lines, their join and its encoding, nor a `get`'s
    bytes, text and line list on top of what was parsed."""

    SEND_CHUNK = 1 << 16

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _request(self, lines: Iterable[str]) -> Generator[str, None, None]:
        """Send the request made of `lines` and yield the answer's lines before its final `errno=`; UapiError for
        a non-zero errno or an answer cut short."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(self.timeout)
            connection.connect(str(self.socket_path))
            pending: list[str] = []
            size = 0
            for line in lines:
                pending.append(line)
                size += len(line) + 1
                if size >= self.SEND_CHUNK:
                    connection.sendall(("\n".join(pending) + "\n").encode())
                    pending.clear()
                    size = 0
            connection.sendall(("\n".join(pending) + "\n\n").encode() if pending else b"\n")
            with connection.makefile("rb") as answer:
                for raw in answer:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("errno="):
                        code = int(line[6:])
                        if code:
                            raise UapiError(f"{self.socket_path}: wireguard-go answered errno={code} "
                                            f"({os.strerror(code)})")
                        return
                    if line:
                        yield line
        raise UapiError(f"{self.socket_path}: truncated answer")

    def alive(self) -> bool:
        """Whether wireguard-go answers on the socket (the first line of a `get` is enough)."""
        try:
            answer = self._request(["get=1"])
            try:
                next(answer, None)
            finally:
                answer.close()
            return True
        except (OSError, UapiError):
            return False

    def get(self) -> Generator[str, None, None]:
        """The lines of a `get`, as they arrive: the device's fields, then each peer's, from its `public_key`."""
        return self._request(["get=1"])

    def set(self, lines: Iterable[str]) -> None:
        for _ in self._request(itertools.chain(["set=1"], lines)):
            pass


def peer_op_lines(ops: Iterable[PeerOp]) -> Iterator[str]:
    """The UAPI `set` lines for `ops`, in order, made as they are sent."""
    for op in ops:
        if isinstance(op, UpsertPeer):
            yield f"public_key={key_to_hex(op.public_key)}"
            if op.endpoint is not None:
                yield f"endpoint={format_endpoint(op.endpoint)}"
            yield f"persistent_keepalive_interval={op.persistent_keepalive}"
            if op.replace_allowed_ips:
                yield "replace_allowed_ips=true"
            for prefix in op.allowed_ips:
                yield f"allowed_ip={prefix_text(prefix)}"
        elif isinstance(op, RemoveAllowedIPs):
            yield f"public_key={ZERO_KEY_HEX}"
            for prefix in op.allowed_ips:
                yield f"allowed_ip={prefix_text(prefix)}"
            yield f"public_key={ZERO_KEY_HEX}"
            yield "remove=true"
        elif isinstance(op, RemovePeer):
            yield f"public_key={key_to_hex(op.public_key)}"
            yield "remove=true"


def change_of_request(lines: Iterable[str]) -> WireGuardChange | None:
    """What a UAPI request (its lines, without the blank line ending it) changes: None for a `get`."""
    iterator = iter(lines)
    if next(iterator, None) != "set=1":
        return None
    keys: set[str] = set()
    allowed: set[IPNetwork] = set()
    device = all_peers = False
    for line in iterator:
        key, _, value = line.partition("=")
        if key == "public_key":
            keys.add(hex_to_key(value))
        elif key == "allowed_ip":
            try:
                allowed.add(prefix_from_text(value))
            except ValueError:
                all_peers = True  # wireguard-go rejects it; whatever it applied before is read back
        elif key == "replace_peers":
            all_peers = True
        elif key in ("private_key", "listen_port", "fwmark"):
            device = True
    return WireGuardChange(frozenset(keys), frozenset(allowed), device, all_peers)


class UapiProxy:
    """The public UAPI socket (`<socket_dir>/<ifname>.sock`, where `wg` looks) in front of wireguard-go's private
    one: each connection is forwarded both ways as it streams, and the `set` requests it carried are reported to
    `on_change` once it ends (wg closes it after the answer, when wireguard-go has applied the request)."""

    CHUNK = 1 << 16

    def __init__(self, public: Path, private: Path, on_change: Callable[[WireGuardChange], None]) -> None:
        self.public = Path(public)
        self.private = Path(private)
        self.on_change = on_change
        self._listener: socket.socket | None = None

    @property
    def serving(self) -> bool:
        """Whether the public socket is served (between start() and close())."""
        return self._listener is not None

    def start(self) -> None:
        self.public.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.public.unlink(missing_ok=True)  # left by a hook process that ended; nobody serves it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.public))
        os.chmod(self.public, 0o600)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"uapi-proxy-{self.public.stem}",
                         daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread: close() alone leaves it blocked
            except OSError:
                pass
            listener.close()  # a new hook process serves the path again
            self.public.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(client,), name="uapi-proxy-connection", daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        changes: list[WireGuardChange] = []
        with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            try:
                server.connect(str(self.private))
            except OSError as error:
                log.warning("UAPI proxy %s: wireguard-go does not answer (%s)", self.public, error)
                return
            answers = threading.Thread(target=self._pump, args=(server, client), daemon=True)
            answers.start()
            request: list[str] = []
            pending = b""
            try:
                while data := client.recv(self.CHUNK):
                    server.sendall(data)
                    *complete, pending = (pending + data).split(b"\n")
                    for raw in complete:
                        if raw:
                            request.append(raw.decode(errors="replace"))
                            continue
                        change = change_of_request(request)  # a blank line ends a request
                        if change is not None:
                            changes.append(change)
                        request = []
                server.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answers.join()
        for change in changes:
            self.on_change(change)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        """wireguard-go's answers to the client; once wireguard-go ends the connection (or dies) the client's is
        ended too, so neither `wg` nor the request side waits for an answer that cannot come."""
        try:
            while data := source.recv(self.CHUNK):
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _peer_state(fields: dict[str, str], allowed: list[IPNetwork]) -> PeerState:
    endpoint = fields.get("endpoint", "")
    return PeerState(
        public_key=hex_to_key(fields["public_key"]),
        endpoint=parse_endpoint(endpoint) if endpoint else None,
        allowed_ips=frozenset(allowed),
        persistent_keepalive=int(fields.get("persistent_keepalive_interval", "0")),
        latest_handshake=int(fields.get("last_handshake_time_sec", "0"))
        + int(fields.get("last_handshake_time_nsec", "0")) / 1e9,
        rx_bytes=int(fields.get("rx_bytes", "0")),
        tx_bytes=int(fields.get("tx_bytes", "0")),
    )


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
        private_dir: Path | None = None,
        on_change: Callable[[WireGuardChange], None] | None = None,
    ) -> None:
        self.ifname = ifname
        self.log_file = log_file
        self.wireguard_go = wireguard_go
        self.public_client = UapiClient(Path(socket_dir) / f"{ifname}.sock")
        self.private_dir = Path(private_dir) if private_dir is not None else None
        self.proxy: UapiProxy | None = None
        if self.private_dir is None:
            self.client = self.public_client
        else:
            self.client = UapiClient(self.private_dir / f"{ifname}.sock")
            self.proxy = UapiProxy(self.public_client.socket_path, self.client.socket_path,
                                   on_change if on_change is not None else lambda change: None)
        self.on_exit = on_exit
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ipr = IPRoute()
        self.restarts = 0

    @property
    def intercepting(self) -> bool:
        """Whether writes by others to the device are seen (the proxy serves the public socket)."""
        return self.proxy is not None and self.proxy.serving

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
        command = [self.wireguard_go, "-f", self.ifname]
        if self.private_dir is not None:
            # its /var/run/wireguard is the private directory, in a mount namespace of its own (unshare execs the
            # shell, which execs wireguard-go: the child's pid stays wireguard-go's)
            self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            SOCKET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount --bind "$0" {SOCKET_DIR} && exec "$@"', str(self.private_dir), *command]
        # Its output goes to a file, not a pipe: wireguard-go outlives the hook (see close()), and a Go program
        # writing to a broken stdout pipe dies of SIGPIPE without removing its socket.
        output = open(self.log_file, "ab") if self.log_file is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                command,
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
        with paused_gc():  # a read-back builds 1.25 M AllowedIPs at 5 000 x 250 (see model.paused_gc)
            stream = self.read_stream()
            if stream is None:
                return None
            try:
                peers = {peer.public_key: peer for peer in stream.peers}
            except (OSError, UapiError):
                return None
            return replace(stream.device, peers=peers)

    def read_stream(self) -> DeviceStream | None:
        with self._lock:
            links = self._ipr.link_lookup(ifname=self.ifname)
            if not links:
                return None
            link = self._ipr.get_links(links[0])[0]
            lines = self.client.get()
            device: dict[str, str] = {}
            first_peer: str | None = None
            try:
                for line in lines:  # the device's fields come before the first peer's `public_key`
                    key, _, value = line.partition("=")
                    if key == "public_key":
                        first_peer = value
                        break
                    device[key] = value
            except (OSError, UapiError):
                lines.close()
                return None
            self._serve_proxy()  # an adopted wireguard-go needing nothing else is proxied from the first read
        private_hex = device.get("private_key", "")
        public_key = public_key_of(bytes.fromhex(private_hex)) if private_hex else ""
        state = DeviceState(
            name=self.ifname,
            public_key=public_key,
            listen_port=int(device.get("listen_port", "0")),
            fwmark=int(device.get("fwmark", "0")),
            mtu=link.get("mtu"),
            up=bool(link["flags"] & 1),
            peers={},
        )
        return DeviceStream(state, self._peers(first_peer, lines))

    @staticmethod
    def _peers(first_key: str | None, lines: Iterator[str]) -> Iterator[PeerState]:
        """The peers of a `get` answer from the line after the first `public_key` on, each AllowedIP parsed as its
        line arrives and each peer handed over once its last line is read."""
        if first_key is None:
            return
        fields: dict[str, str] = {"public_key": first_key}
        allowed: list[IPNetwork] = []
        for line in lines:
            key, _, value = line.partition("=")
            if key == "allowed_ip":
                allowed.append(prefix_from_text(value))  # as wireguard-go prints it: the network address
            elif key == "public_key":
                yield _peer_state(fields, allowed)
                fields, allowed = {"public_key": value}, []
            else:
                fields[key] = value
        yield _peer_state(fields, allowed)

    def ensure_device(self, spec: DeviceSpec) -> None:
        with self._lock:
            if not (self.client.alive() and self._ipr.link_lookup(ifname=self.ifname)):
                if self.proxy is not None and self.public_client.alive() and self._ipr.link_lookup(ifname=self.ifname):
                    # started by a hook without the private directory: adopted as it is (no cut in traffic)
                    log.warning("adopted wireguard-go %s serving the public UAPI socket: writes by others to its "
                                "peers are seen at the next resync only, until it restarts", self.ifname)
                    self.client, self.proxy = self.public_client, None
                else:
                    self._start()
            self._serve_proxy()
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

    def greet(self, peers: Mapping[str, int]) -> None:
        if not peers:
            return
        with self._lock:
            for keepalive in (0, 1, None):  # off, on (wireguard-go sends a keepalive), back to each peer's own
                self.client.set(line for key, own in peers.items() for line in (
                    f"public_key={key_to_hex(key)}", "update_only=true",
                    f"persistent_keepalive_interval={own if keepalive is None else keepalive}"))

    def delete_device(self) -> None:
        with self._lock:
            self._stop_child()
            links = self._ipr.link_lookup(ifname=self.ifname)
            if links:  # also ends an adopted wireguard-go: it exits when its TUN goes away
                self._ipr.link("del", index=links[0])
            deadline = time.monotonic() + 3
            while self.client.socket_path.exists() and self.client.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._close_proxy()
            for client in {self.client, self.public_client}:
                if client.socket_path.exists() and not client.alive():
                    client.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the netlink socket, stop supervising and proxying. wireguard-go keeps serving the device, as a kernel
        device outlives the hook: a restarted hook adopts it, so a hook restart or upgrade does not cut traffic.
        `delete_device()` (wgcni-node cleanup) ends it."""
        with self._lock:
            self._process = None
            self._close_proxy()
            self._ipr.close()

    def _serve_proxy(self) -> None:
        if self.proxy is not None and not self.proxy.serving:
            self.proxy.start()

    def _close_proxy(self) -> None:
        if self.proxy is not None:
            self.proxy.close()  # `wg` cannot reach the device until a hook serves the public socket again
