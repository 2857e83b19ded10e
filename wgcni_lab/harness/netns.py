"""Network-namespace building blocks shared by the hook's dataplane lab (wgcni_lab/harness/netns_lab.py), the
Kubernetes sync mesh (tests/sync/mesh.py), the real-runtime tests (tests/runtime) and the benchmarks: commands in
namespaces, a VNet bridge namespace with node namespaces plugged into it, a simulated node with its own
`wgcni-node run`, a namespace entered by the calling thread, and a teardown that leaves no namespace or process
behind.

Command and hook-stop timeouts are stretched by the tests' time scale (wgcni_lab/harness/polling.py), like every wait.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node_hook.local_api import request
from wgcni_lab.cleanup import kill_processes
from wgcni_lab.harness.polling import TIME_SCALE, wait_until

API_TIMEOUT = 10.0  # seconds for one answer of a hook's local API (the request's own default)

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def sh(*args: str, check: bool = True, timeout: float = 30,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; with `check`, a non-zero exit raises with its stderr."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout * TIME_SCALE, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def in_ns(namespace: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", namespace, *args, check=check, timeout=timeout)


class Namespaces:
    """The named network namespaces a test made, in creation order; `close()` (also on leaving a `with` block) ends
    every process still inside one (a process keeps a namespace alive after `ip netns del`) and deletes them, newest
    first. The one way the suites create and remove their namespaces."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.names.append(name)
        return name

    def add_unique(self, prefix: str) -> str:
        """A namespace named `prefix-<random hex>` (no clash with another run or suite on the machine), loopback
        up."""
        name = self.add(f"{prefix}-{secrets.token_hex(4)}")
        in_ns(name, "ip", "link", "set", "lo", "up")
        return name

    def delete(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)
        self.names.remove(name)

    def close(self) -> None:
        for name in reversed(self.names):
            kill_processes(int(pid) for pid in sh("ip", "netns", "pids", name, check=False).stdout.split())
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()


def new_bridge_namespace(namespaces: Namespaces, name: str, bridge: str, ipv4_only: bool = False) -> str:
    """The VNet: a namespace holding an up bridge (and loopback). `ipv4_only`: no link in it ever gets IPv6, so no
    link-local chatter (MLD reports of links just brought up) reaches a capture on the bridge."""
    namespaces.add(name)
    if ipv4_only:
        in_ns(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    in_ns(name, "ip", "link", "set", "lo", "up")
    in_ns(name, "ip", "link", "add", bridge, "type", "bridge")
    in_ns(name, "ip", "link", "set", bridge, "up")
    return name


def plug_into_bridge(vnet: str, bridge: str, uplink: str, netns: str, address: str, ipv4_only: bool = False) -> None:
    """Give `netns` an up `eth0` with `address` (CIDR) and loopback, its veth peer `uplink` a port of `bridge`.
    `ipv4_only`: IPv6 is off on that eth0 before it comes up (the node's other links keep theirs)."""
    in_ns(vnet, "ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", netns)
    in_ns(vnet, "ip", "link", "set", uplink, "master", bridge, "up")
    in_ns(netns, "ip", "link", "set", "lo", "up")
    if ipv4_only:
        in_ns(netns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1")
    in_ns(netns, "ip", "addr", "add", address, "dev", "eth0")
    in_ns(netns, "ip", "link", "set", "eth0", "up")


@dataclass
class HookNode:
    """A simulated node: its network namespace, its WireGuard interface name (unique per run: /var/run/wireguard is
    not per namespace), and a directory with its hook's config, state, socket and log."""

    name: str
    ip: str
    netns: str
    wg: str
    directory: Path
    hook: subprocess.Popen | None = None

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def socket(self) -> Path:
        return self.directory / "hook.sock"

    @property
    def config_file(self) -> Path:
        return self.directory / "config.json"

    @property
    def log_file(self) -> Path:
        return self.directory / "hook.log"

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return in_ns(self.netns, *args, check=check, timeout=timeout)

    def api(self, op: str, **fields: object) -> dict:
        """Ask the hook's local API (patience scaled like every other wait: an answer can wait for a pass)."""
        return request(self.socket, {"op": op, **fields}, timeout=API_TIMEOUT * TIME_SCALE)

    def start_hook(self, env: dict[str, str] | None = None, timeout: float = 20) -> None:
        """`wgcni-node run` on `config_file` in the node's namespace (from the sources, output to `log_file`);
        returns once its local API socket accepts (a killed hook leaves its socket file behind), fails the test with
        the log's tail if it exits first."""
        with open(self.log_file, "ab") as log:
            self.hook = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, PYTHON, "-m", "node_hook.cli", "run", "--config",
                 str(self.config_file)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        hook = self.hook
        wait_until(lambda: self.socket_accepts() or hook.poll() is not None, timeout, f"{self.name} hook socket")
        if hook.poll() is not None:
            raise AssertionError(f"hook {self.name} exited: {self.log_file.read_text()[-3000:]}")

    def stop_hook(self, timeout: float = 20) -> None:
        """SIGTERM the hook and wait for it (SIGKILL after `timeout`, scaled); nothing if it is not running."""
        if self.hook is None:
            return
        if self.hook.poll() is None:
            self.hook.send_signal(signal.SIGTERM)
            try:
                self.hook.wait(timeout=timeout * TIME_SCALE)
            except subprocess.TimeoutExpired:
                self.hook.kill()
                self.hook.wait()
        self.hook = None

    def socket_accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            try:
                connection.connect(str(self.socket))
            except OSError:
                return False
        return True

    def kill_hook(self) -> None:
        """SIGKILL the hook, as a killed container's process dies (no shutdown of its own), and reap it."""
        if self.hook is not None:
            self.hook.kill()
            self.hook.wait()
            self.hook = None

    def cleanup(self) -> subprocess.CompletedProcess[str]:
        """`wgcni-node cleanup` with the node's config: removes what the hook made in the namespace."""
        return self.exec(PYTHON, "-m", "node_hook.cli", "cleanup", "--config", str(self.config_file), check=False)


def namespaces_named(prefix: str) -> set[str]:
    """The network namespaces whose names start with `prefix` (what a benchmark made is named so)."""
    listing = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith(prefix)}


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextmanager
def entered_namespace(prefix: str = "h3t") -> Iterator[str]:
    """Create a namespace (loopback up), move this thread into it (subprocesses started here inherit it), then move
    back and remove it with every process still inside."""
    with Namespaces() as namespaces:
        name = namespaces.add_unique(prefix)
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield name
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)
