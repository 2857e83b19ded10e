"""Fixtures of the lab tests: the `wgcni-lab` CLI run against a lab dir of its own, `wgcni-lab capture` around a
block of commands, and a footprint of a lab (its namespaces, processes, mounts, cgroups) to prove that `down`
leaves nothing behind.

Other engineers' tests run on the same machine at the same time, so the footprint only counts what belongs to this
lab: namespaces with its id, processes whose network namespace is one of the lab's (nodes, fabric, client, pods) or
whose command line names its lab dir, mounts naming its dir or id, its cgroups, and root-namespace links with lab
names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wgcni_lab import lab
from wgcni_lab.cleanup import netns_inode, process_table
from wgcni_lab.harness.tempdir import short_temp_dir

LAB_LINK_NAMES = ("fabric0", "node-", "client", "wgcni", "eth0")


class Cli:
    """Runs `wgcni-lab --lab-dir DIR ...` as a person would."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "wgcni_lab.cli", "--lab-dir", str(self.lab_dir), *args]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"wgcni-lab {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout)

    def state(self) -> lab.LabState:
        state = lab.load_state(self.lab_dir)
        assert state is not None
        return state


@contextmanager
def captured(cli: Cli, seconds: float = 120) -> Iterator[list[dict[str, Any]]]:
    """`wgcni-lab capture --json` around the block: the list is filled with the packets when the block ends."""
    packets: list[dict[str, Any]] = []
    capture = subprocess.Popen(cli.argv("capture", "--seconds", str(seconds), "--json"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stderr is not None and "capturing on" in capture.stderr.readline()  # tcpdump listens
        yield packets
        capture.terminate()  # the capture ends early on SIGTERM and prints what it saw
        output, errors = capture.communicate(timeout=30)
        assert capture.returncode == 0, errors
        packets += [json.loads(line) for line in output.splitlines()]
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()


def address_of(endpoint: dict[str, Any], family: int) -> str:
    """A pod's or node's address of that IP family (from its `ips`, as `wgcni-lab status --json` lists them)."""
    return next(ip for ip in endpoint["ips"] if ipaddress.ip_address(ip).version == family)


def ping_ring(cli: Cli, pods: list[dict[str, Any]], count: int, family: int = 4) -> None:
    """The first pod of each node pings the first pod of the next node (`count` echoes each, to its address of that
    IP family); every ping must pass."""
    first: dict[str, dict[str, Any]] = {}
    for pod in pods:
        first.setdefault(pod["node"], pod)
    ring = list(first.values())
    for index, source in enumerate(ring):
        target = ring[(index + 1) % len(ring)]
        address = address_of(target, family)
        ping = cli.run("exec", source["name"], "--", "ping", "-c", str(count), "-i", "0.2", "-W", "2", address,
                       check=False)
        assert ping.returncode == 0, f"{source['name']} -> {address}: {ping.stdout}{ping.stderr}"


def peer_prefixes(cli: Cli, node: str) -> dict[str, list[str]]:
    """endpoint address -> its peer's AllowedIPs prefixes, as wireguard-go on `node` has them (`wg show dump`)."""
    lines = cli.run("exec", node, "--", "wg", "show", lab.WG_INTERFACE, "dump").stdout.splitlines()[1:]
    return {line.split("\t")[2].rsplit(":", 1)[0]: line.split("\t")[3].split(",") for line in lines}


def tunnelled(cli: Cli, node: str) -> set[str]:
    """The addresses `node` routes into the WireGuard device, both families of the hook's table."""
    routes = [route for family in ("-4", "-6") for route in json.loads(cli.run(
        "exec", node, "--", "ip", "-j", family, "route", "show", "table", str(lab.HOOK_DEFAULTS.route_table)).stdout)]
    return lab.covered(route["dst"] if "/" in route["dst"] else
                       f"{route['dst']}/{ipaddress.ip_address(route['dst']).max_prefixlen}"
                       for route in routes
                       if route.get("dev") == lab.WG_INTERFACE and route.get("type", "unicast") == "unicast")


@dataclass
class Footprint:
    namespaces: set[str]
    processes: dict[int, str]
    mounts: list[str]
    cgroups: list[str]
    links: set[str]


def root_links() -> set[str]:
    return {link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                                 text=True, check=True).stdout)}


def in_another_lab(pid: int, lab_id: str) -> bool:
    """`pid` runs in a cgroup of a lab other than `lab_id`: the kernel reuses the inode number of a destroyed
    network namespace, so a pod of a lab running beside this one can sit in a namespace with a number seen here."""
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return "/wgcni-lab-" in cgroups and f"/wgcni-lab-{lab_id}-" not in cgroups


def footprint(lab_id: str, lab_dir: Path, netns_inodes: set[int]) -> Footprint:
    """Everything of the lab `lab_id` that exists right now. A process in a namespace whose inode number was one of
    the lab's counts unless that number now belongs to another lab: a node namespace another lab has named, or a
    pod in another lab's cgroup (`in_another_lab`)."""
    listed = [line.split()[0] for line in
              subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()]
    namespaces = {name for name in listed if name.startswith(f"wgl-{lab_id}-")}
    others = {netns_inode(f"/run/netns/{name}") for name in listed
              if name.startswith("wgl-") and name not in namespaces}

    def ours(pid: int) -> bool:
        inode = netns_inode(f"/proc/{pid}/ns/net")
        return inode in netns_inodes and inode not in others and not in_another_lab(pid, lab_id)

    processes = {info.pid: info.command_line for info in process_table().values()
                 if info.live and (str(lab_dir) in info.command_line or ours(info.pid))}
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(lab_dir) in line or f"wgl-{lab_id}" in line]
    cgroups = [str(path) for hierarchy in Path("/sys/fs/cgroup").iterdir() if hierarchy.is_dir()
               for path in hierarchy.glob(f"wgcni-lab-{lab_id}-*")]
    links = {name for name in root_links() if name.startswith(LAB_LINK_NAMES)}
    return Footprint(namespaces, processes, mounts, cgroups, links)


def lab_netns_inodes(cli: Cli) -> set[int]:
    """The network namespaces of a running lab: VNet, nodes, pods."""
    state = cli.state()
    paths = [f"/run/netns/{name}" for name in (state.vnet_netns, state.client_netns)]
    paths += [f"/run/netns/{node.netns}" for node in state.nodes]
    paths += [pod["netns"] for pod in lab.all_pods(state)] if state.phase == "up" else []
    return {inode for inode in map(netns_inode, paths) if inode is not None}


@pytest.fixture(scope="module")
def lab_parent() -> Iterator[Path]:
    """A short private directory the lab dirs of a module live in."""
    with short_temp_dir("wgl-test-") as path:
        yield path


@pytest.fixture(scope="session")
def built() -> None:
    """The lab installs the built plugin and runs the built hook, as a DaemonSet would: fail (never skip) without."""
    for path in (lab.DEFAULT_PLUGIN / "wgcni", lab.DEFAULT_HOOK):
        if not (path.exists() and os.access(path, os.X_OK)):
            pytest.fail(f"{path} is missing: run `make build` first")


def force_down(cli: Cli) -> None:
    """Remove a lab whatever state a failed test left it in."""
    if cli.lab_dir.exists():
        subprocess.run(cli.argv("down"), capture_output=True, timeout=180)


@contextmanager
def lab_up(lab_dir: Path, *up_args: str) -> Iterator[Cli]:
    """`wgcni-lab up` with these arguments in `lab_dir`, yielded as its Cli, and removed afterwards whatever happens
    (the module-scoped lab fixtures)."""
    cli = Cli(lab_dir)
    try:
        cli.run("up", *up_args, timeout=300)
        yield cli
    finally:
        force_down(cli)


def down_removes_a_crashed_lab(cli: Cli, lab_id: str, inodes: set[int]) -> None:
    """`down` after the lab daemon crashed removes everything of the lab all the same."""
    result = cli.run("down", timeout=180)

    assert f"lab {lab_id} removed" in result.stdout
    after = footprint(lab_id, cli.lab_dir, inodes)
    assert (after.namespaces, after.processes, after.mounts, after.cgroups) == (set(), {}, [], [])
    assert not cli.lab_dir.exists()


def down_leaves_nothing(cli: Cli, inodes: set[int], namespaces: int) -> None:
    """`down` removes every namespace, process, mount and cgroup of the lab (which had `namespaces` named network
    namespaces before) and leaves no link in the root namespace it did not find there."""
    state = cli.state()
    before = footprint(state.id, cli.lab_dir, inodes)
    assert len(before.namespaces) == namespaces and before.processes and before.cgroups, "the footprint sees the lab"

    cli.run("down", timeout=180)

    after = footprint(state.id, cli.lab_dir, inodes)
    assert (after.namespaces, after.processes, after.mounts, after.cgroups) == (set(), {}, [], [])
    assert after.links <= cli.links_before  # type: ignore[attr-defined]
    assert not cli.lab_dir.exists()
