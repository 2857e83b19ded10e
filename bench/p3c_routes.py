"""P3c: programming the hook's routing table at P3's scale through the routing applier (`PyrouteRouting`: batched
rtnetlink), beside `ip` doing the same to the same table in the same run.

In a network namespace created for the run and removed afterwards, with a veth pair (both ends up) as the
WireGuard device, for a node of an N-node cluster x 250 scattered pod IPs (P3's synthetic cluster: every remote pod
IP and node IP a `dev` route, the node's own pods `throw`, ~N x 250 routes):
- apply all: the planner's `route_sets` for an empty table (a `RouteSets`, as the reconciler hands it when a hook
  starts) applied by `apply()`, versus `ip -batch` of a file replacing exactly the same routes (written before the
  clock starts); the table is checked after each by counting `ip route show` lines;
- one route added / removed on the loaded table: `apply([SetRoute])` / `apply([DeleteRoute])` versus
  `ip route replace` / `ip route del` (one process each: what a per-event script pays);
- read back the whole table (the resync): `read()` (decoded into the model's prefixes, checked equal to the model's
  routes) versus `ip route show table` (text only);
- flush (the hook removing itself): `flush()` versus `ip route flush table`;
- the kernel memory the loaded table takes (Slab + VmallocUsed of /proc/meminfo before and after the first
  apply-all; the machine is shared, so this is approximate).
Medians of CPU time (user + system) of this process plus its waited-for children (`ip`): the kernel's work on the
routes is system time of whoever sends them. The baseline of each row and the ratio are in the note, with the wall
time ratio. Run: `python -m bench.p3c_routes` (as root) or `python -m bench.run --only P3c`.

Duration: the three sizes took 81 s of wall time (83 s CPU) on the 2-core machine at load ~1, the 5 000-node size
(1.25 M routes) 65 s of it - mostly `ip -batch`, the `ip route show` checks and building the synthetic cluster, not
the applier; on a busy machine it takes longer. Other sizes: `python -m bench.p3c_routes --nodes 50 500 2000`.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from bench import Clock, comparison_rows, row
from bench.p3_scale import SPARE_BASE, synthetic_cluster
from node_hook.addresses import prefix_of_packed
from node_hook.apply.routes import PyrouteRouting
from node_hook.contracts import DeleteRoute, SetRoute
from node_hook.model import NodeModel, RouteKind
from node_hook.planner import RouteSets, plan_routes
from wgcni_lab.harness.netns import (
    entered_namespace,  # the namespace helper the netns tests use
    sh,
)

TITLE = "routing table at scale: batched rtnetlink applier vs ip -batch"
SIZES = (50, 500, 5000)
PODS_PER_NODE = 250
FULL_REPEATS = {50: 5, 500: 3}  # larger sizes: once
EVENT_REPEATS = 15
QUICK_SIZES = (2, 4)
QUICK_PODS = 50
TARGET_RATIO = 1.0  # applying all routes costs no more CPU than `ip -batch` of the same routes
TABLE = 51820
DEVICE = "p3c0"


def planned_routes(nodes: int, pods: int) -> tuple[RouteSets, dict[RouteKind, int]]:
    """The `route_sets` of a full plan against an empty table for node 0 of the synthetic cluster, and the number
    of routes of each kind."""
    local, remote = synthetic_cluster(nodes, pods, "scattered")
    model = NodeModel("node-00000")
    model.replace_remote_nodes(remote)
    model.replace_local_pods(local)
    deletes, sets = plan_routes(model.routes, {}, model.routes)
    assert not deletes
    return sets, model.route_counts()


def batch_file(sets: RouteSets, path: Path) -> None:
    """`ip -batch` commands that replace exactly the routes of `sets`."""
    with path.open("w") as batch:
        for op in sets:
            if op.kind is RouteKind.THROW:
                batch.write(f"route replace throw {op.prefix} table {TABLE}\n")
            else:
                batch.write(f"route replace {op.prefix} dev {DEVICE} table {TABLE}\n")


def ip_route_table(command: str) -> str:
    """`ip -4|-6 route <command> table TABLE` for both families, their output joined (a table that never held a
    route of a family does not exist: not an error)."""
    text = ""
    for family in ("-4", "-6"):
        done = sh("ip", family, "route", command, "table", str(TABLE), check=False, timeout=900)
        if done.returncode and "does not exist" not in done.stderr:
            raise RuntimeError(f"ip {family} route {command} table {TABLE}: exit {done.returncode}: "
                               f"{done.stderr.strip()}")
        text += done.stdout
    return text


def shown_routes() -> str:
    """`ip route show` of the table, both families."""
    return ip_route_table("show")


def table_counts() -> dict[RouteKind, int]:
    """Routes of each kind in the table, counted on `ip route show` (independent of the applier)."""
    lines = shown_routes().splitlines()
    throw = sum(1 for line in lines if line.startswith("throw "))
    device = sum(1 for line in lines if f" dev {DEVICE} " in f"{line} " and not line.startswith("throw "))
    assert throw + device == len(lines), "the table holds routes that are neither ours nor throw"
    return {RouteKind.WIREGUARD: device, RouteKind.THROW: throw}


def kernel_memory_kib() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) for name in ("Slab", "VmallocUsed"))


def measure_size(routing: PyrouteRouting, nodes: int, pods: int, full_repeats: int, event_repeats: int,
                 work: Path) -> dict:
    sets, counts = planned_routes(nodes, pods)
    expected = {kind: counts.get(kind, 0) for kind in RouteKind}
    batch = work / f"routes-{nodes}.batch"
    batch_file(sets, batch)
    clock = Clock(scale=1000)
    kernel_kib = 0
    for repeat in range(full_repeats):
        assert table_counts() == dict.fromkeys(RouteKind, 0)
        memory_before = kernel_memory_kib()
        clock.measure("apply all", lambda: routing.apply(sets))
        if repeat == 0:
            kernel_kib = kernel_memory_kib() - memory_before
        assert table_counts() == expected, "apply() did not program every route"
        state = clock.measure("read()", routing.read)
        assert len(state.routes) == len(sets) and all(
            state.routes[op.prefix] == op.kind.value for op in sets), "read() differs from what was applied"
        del state
        clock.measure("ip route show", shown_routes)
        if repeat == 0:
            for attempt in range(event_repeats):
                extra = prefix_of_packed((SPARE_BASE + attempt).to_bytes(4, "big"), 32)
                clock.measure("apply add", functools.partial(routing.apply, [SetRoute(extra, RouteKind.WIREGUARD)]))
                clock.measure("apply remove", functools.partial(routing.apply, [DeleteRoute(extra)]))
                clock.measure("ip route replace", functools.partial(sh, "ip", "route", "replace", str(extra), "dev",
                                                                    DEVICE, "table", str(TABLE)))
                clock.measure("ip route del", functools.partial(sh, "ip", "route", "del", str(extra), "table",
                                                                str(TABLE)))
            assert table_counts() == expected, "events left the table changed"
        clock.measure("flush()", routing.flush)
        assert table_counts() == dict.fromkeys(RouteKind, 0), "flush() left routes"
        clock.measure("ip -batch", lambda: sh("ip", "-batch", str(batch), timeout=900))
        assert table_counts() == expected, "ip -batch did not program every route"
        clock.measure("ip route flush", lambda: ip_route_table("flush"))
    return {"nodes": nodes, "pods": pods, "routes": len(sets), "kernel_kib": kernel_kib,
            "cpu_ms": {name: clock.cpu(name) for name in clock.samples},
            "wall_ms": {name: clock.wall(name) for name in clock.samples}}


COMPARISONS = (  # (title, ours, baseline, baseline's description, per route, targeted)
    ("apply all routes", "apply all", "ip -batch", "ip -batch of the same routes", True, True),
    ("one route added", "apply add", "ip route replace", "ip route replace (one process)", False, False),
    ("one route removed", "apply remove", "ip route del", "ip route del (one process)", False, False),
    ("read back the whole table", "read()", "ip route show", "ip route show table (text)", True, False),
    ("flush the table", "flush()", "ip route flush", "ip route flush table", True, False),
)


def run(quick: bool, sizes: tuple[int, ...] | None = None) -> list[dict]:
    """The rows for `sizes` (node counts; default QUICK_SIZES or SIZES)."""
    if shutil.which("ip") is None:
        raise RuntimeError("P3c needs ip (iproute2) on PATH")
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    pods = QUICK_PODS if quick else PODS_PER_NODE
    results = []
    work = Path(tempfile.mkdtemp(prefix="wgcni-p3c-"))
    try:
        with entered_namespace("p3c"):
            sh("ip", "link", "add", DEVICE, "type", "veth", "peer", "name", "p3c1")
            for name in (DEVICE, "p3c1"):
                sh("ip", "link", "set", name, "up")
            routing = PyrouteRouting(TABLE, DEVICE, 98)
            try:
                for nodes in sizes:
                    results.append(measure_size(routing, nodes, pods, 1 if quick else FULL_REPEATS.get(nodes, 1),
                                                2 if quick else EVENT_REPEATS, work))
            finally:
                routing.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for result in results:
        label = f"{result['nodes']} nodes x {result['pods']} ({result['routes']} routes)"
        rows += comparison_rows(label, "applier", result["cpu_ms"], result["wall_ms"], COMPARISONS,
                                None if quick else TARGET_RATIO, (result["routes"], "route"))
        rows.append(row(f"{label}: kernel memory of the loaded table", [result["kernel_kib"] / 1024], unit="MB",
                        note=f"Slab + VmallocUsed delta, {1024 * result['kernel_kib'] / result['routes']:.0f} bytes "
                             f"per route (shared machine: approximate)"))
    rows[0]["raw"] = results
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.p3c_routes", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="correctness pass with a few hundred routes")
    parser.add_argument("--nodes", type=int, nargs="+", help="cluster sizes to measure (default: SIZES)")
    options = parser.parse_args()
    print(json.dumps(run(options.quick, tuple(options.nodes or ())), indent=2))
