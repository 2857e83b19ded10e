"""Operator commands that ask the node hook (`wgcni-node`) over its local API: status, peers, routes, check.

Registered into the `wgcni` click group by cni_plugin/cli.py. They use the plugin's own standard-library client
(cni_plugin/notify.py), so the plugin bundle needs nothing of node_hook. Every command has `--json` with a stable
shape; human output is aligned `key: value` blocks in the manner of `wg show`, or tables.

Sizes. On a node with 5 000 peers the hook renders only the page asked for (`--limit`, default 50; `--offset` for
peers, the keyset cursor `--after NODE` for routes) and sends a summary of all, so `wgcni peers` and `wgcni routes`
stay fast and readable; `--all` fetches every page in turn, each far below the client's answer size limit.

`wgcni check` exit codes (for scripts): 0 nothing wrong, 1 problems found (errors or warnings; `info` findings do
not count), 2 the check could not run (hook not reachable, or its answer unusable).
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import time
from collections.abc import Callable
from typing import Any

import click

from cni_plugin.cni import DEFAULT_HOOK_SOCKET
from cni_plugin.notify import HookProtocolError, HookUnavailable, request

SOCKET_ENV = "WGCNI_HOOK_SOCKET"
QUERY_TIMEOUT = 15.0  # the hook answers from its worker thread; a long pass on a big node may delay it
DEFAULT_LIMIT = 50
PEERS_PAGE = 100  # with --all: peers per request (100 x 250 pod IPs stays far below the client's 4 MiB answer limit)
ROUTES_PAGE = 5000  # with --all: routes per request (~350 KiB of JSON)
EXIT_OK, EXIT_PROBLEMS, EXIT_UNCHECKED = 0, 1, 2
HOOK_DOWN_FIX = ("is wgcni-node running on this node? On AKS: kubectl -n kube-system get pods -o wide "
                 "-l app.kubernetes.io/name=wgcni, then kubectl -n kube-system logs <that pod> -c wgcni-node; "
                 "elsewhere start 'wgcni-node run'")
LOGS_FIX = "see kubectl -n kube-system logs <the wgcni-node pod of this node> -c wgcni-node"

socket_option = click.option("--socket", "socket_path", envvar=SOCKET_ENV, default=DEFAULT_HOOK_SOCKET,
                             show_default=True, type=click.Path(dir_okay=False),
                             help=f"The hook's local API socket (or ${SOCKET_ENV}).")
json_option = click.option("--json", "as_json", is_flag=True, help="Stable JSON instead of text.")


class HookQueryError(click.ClickException):
    """The hook could not be asked (exit 1 for status/peers/routes; check turns it into exit 2). The message is the
    problem and what to do; `problem` and `fix` are the two halves."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def ask(socket_path: str, message: dict[str, Any]) -> dict[str, Any]:
    """The hook's answer to `message`, or a HookQueryError with one line a person can act on."""
    try:
        answer = request(socket_path, message, QUERY_TIMEOUT)
    except HookUnavailable as error:
        raise HookQueryError(f"the hook is not answering: {error}", HOOK_DOWN_FIX) from None
    except HookProtocolError as error:
        raise HookQueryError(f"the hook answered something unusable: {error}", LOGS_FIX) from None
    if not answer["ok"]:
        raise HookQueryError(f"the hook refused {message['op']}: {answer.get('error', 'no reason given')}",
                             LOGS_FIX)
    return answer


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _block(title: str, pairs: list[tuple[str, str]]) -> None:
    """`title` then indented, aligned `label: value` lines, like `wg show`."""
    click.echo(title)
    width = max((len(label) for label, _ in pairs), default=0)
    for label, value in pairs:
        click.echo(f"  {(label + ':').ljust(width + 1)} {value}")


class Table:
    """Aligned columns, written page by page: widths come from the header and the first page and only grow (one
    write of all rows is a plain aligned table, as `wgcni pods` prints)."""

    def __init__(self, header: tuple[str, ...]) -> None:
        self.header = header
        self.widths: list[int] | None = None

    def write(self, rows: list[tuple[str, ...]]) -> None:
        if self.widths is None:
            rows = [self.header, *rows]
            self.widths = [max(len(line[column]) for line in rows) for column in range(len(self.header))]
        for line in rows:
            self.widths = [max(width, len(cell)) for width, cell in zip(self.widths, line, strict=True)]
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, self.widths, strict=True)).rstrip())


def _limit_option(function: Any) -> Any:
    return click.option("--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(min=1),
                        help="Show about this many (a page).")(function)


def _all_option(function: Any) -> Any:
    return click.option("--all", "show_all", is_flag=True, help="Everything, fetched page by page.")(function)


# ---- formatting helpers -------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """`1 hour, 2 minutes, 3 seconds`, as `wg show` prints handshake ages."""
    seconds = int(max(0, seconds))
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count != 1 else ''}")
    return ", ".join(parts) if parts else "0 seconds"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def handshake_text(latest: float, now: float) -> str:
    return "never" if not latest else f"{human_duration(now - latest)} ago"


def annotate_allowed_ips(prefixes: list[str], pod_ips: list[str], node_ips: list[str]) -> list[dict[str, Any]]:
    """Each AllowedIPs prefix with how many of the peer's pod IPs and which of its node IPs it covers, so nobody
    maps addresses by hand. Prefixes of one peer are disjoint: each address is placed by bisection."""
    networks = sorted((ipaddress.ip_network(prefix) for prefix in prefixes),
                      key=lambda network: (network.version, int(network.network_address)))
    starts = [(network.version, int(network.network_address)) for network in networks]
    out = [{"prefix": str(network), "pods": 0, "nodeIPs": []} for network in networks]

    def place(address_text: str) -> dict[str, Any] | None:
        address = ipaddress.ip_address(address_text)
        index = bisect.bisect_right(starts, (address.version, int(address))) - 1
        if index >= 0 and address in networks[index]:
            return out[index]
        return None

    for address in pod_ips:
        entry = place(address)
        if entry is not None:
            entry["pods"] += 1
    for address in node_ips:
        entry = place(address)
        if entry is not None:
            entry["nodeIPs"].append(address)
    return out


def _allowed_text(entry: dict[str, Any]) -> str:
    what = []
    if entry["pods"]:
        what.append(plural(entry["pods"], "pod"))
    if entry["nodeIPs"]:
        what.append("node IP")
    return f"{entry['prefix']} ({', '.join(what) or 'neither pod nor node IP'})"


# ---- commands -----------------------------------------------------------------------------------------------


@click.command()
@socket_option
@json_option
def status(socket_path: str, as_json: bool) -> None:
    """This node's wgcni state: key, backend, device, MTU and why, routing, encryption, sync, counts."""
    answer = ask(socket_path, {"op": "status"})
    answer.pop("ok")
    if as_json:
        _emit_json(answer)
        return
    sync = answer.get("sync") or {}
    counts = answer["counts"]
    if answer["peersComplete"]:
        sync_text = "peers synced"
    else:
        sync_text = "waiting for the first complete peer list"
    if sync:
        sync_text += (f"; own state {'published' if sync.get('published') else 'not published yet'}; "
                      f"{sync.get('writes', 0)} writes, {sync.get('write_errors', 0)} write errors, "
                      f"{sync.get('watch_errors', 0)} watch errors")
        if sync.get("opted_out"):
            sync_text += "; this node is opted out (wgcni.io/wireguard=disabled)"
    if answer.get("peerSourceError"):
        sync_text += f"; source error: {answer['peerSourceError']}"
    out_of_sync = sorted(aspect for aspect, ok in answer["inSync"].items() if not ok)
    pairs = [
        ("state", ("ready" if answer["ready"] else "NOT READY") + f" ({answer['message']})"),
        ("public key", f"{answer['publicKey']} (fingerprint {answer['keyFingerprint']})"),
        ("backend", answer["backend"]),
        ("device", f"{answer['interface']}, listening on {answer['endpoint']}:{answer['listenPort']}"),
        ("mtu", f"{answer['mtu']} ({answer['mtuReason']})"),
        ("underlay", f"{answer['underlayInterface']}; azure: {'yes' if answer['azure'] else 'no'} "
                     f"({answer['azureReason']})"),
        ("routing", f"rule {answer['rulePriority']}: not fwmark {answer['fwmark']}/{answer['fwmark']} lookup "
                    f"{answer['routeTable']}"),
        ("host encryption", "on" if answer["hostEncryption"] else "off"),
        ("strict mode", _strict_text(answer.get("strict") or {})),
        ("dataplane", "in sync" if not out_of_sync else f"out of sync: {', '.join(out_of_sync)}"),
        ("sync", sync_text),
        ("publication", f"{answer['publication']['state']}: {answer['publication']['message']}"),
        ("counts", f"{plural(counts['peers'], 'peer')}, {plural(counts['remoteNodes'], 'remote node')}, "
                   f"{plural(counts['localPods'], 'local pod')}"
                   + (f" ({counts['podsWithoutRecord']} without a pod record)" if counts.get("podsWithoutRecord")
                      else "")
                   + f", {plural(counts['routes'], 'route')}"),
        ("passes", f"{answer['passes']} ({answer['errors']} failed)"),
    ]
    if answer["lastError"]:
        pairs.append(("last error", answer["lastError"]))
    for problem in answer["problems"][:5]:
        pairs.append(("problem", problem["message"]))
    if len(answer["problems"]) > 5:
        pairs.append(("problem", f"... and {len(answer['problems']) - 5} more: wgcni check"))
    for error in answer["recordErrors"][:5]:
        pairs.append(("bad record", error))
    _block(f"node: {answer['node']}", pairs)


def _strict_text(strict: dict[str, Any]) -> str:
    """`strict mode` of `wgcni status`: on (dropping) or off (counting), the cluster ranges and the counters."""
    mode = strict.get("mode", "off")
    text = {"strict": "ON: plaintext between WireGuard nodes is dropped",
            "permissive": "off: plaintext between WireGuard nodes is counted, not dropped",
            "opted-out": "off: this node is opted out (strictMode is set)"}.get(mode, "off")
    if strict.get("cluster"):
        text += f"; cluster {', '.join(strict['cluster'])}"
    if strict.get("tablePresent") is False:
        text += f"; TABLE MISSING ({strict.get('table')})"
    elif "dropped" in strict:
        kind = "dropped" if mode == "strict" else "counted"
        text += f"; {kind} out {strict[kind]['out']}, in {strict[kind]['in']} packets"
    return text


Rows = list[dict[str, Any]]


def _show_pages(socket_path: str, message: dict[str, Any], show_all: bool, as_json: bool,
                advance: Callable[[dict[str, Any], dict[str, Any]], bool], rows_of: Callable[[dict[str, Any]], Rows],
                print_summary: Callable[[dict[str, Any]], None],
                print_rows: Callable[[Rows], None]) -> tuple[dict[str, Any], dict[str, Any], Rows]:
    """Ask the hook for the page of `message`, or with `show_all` for every page in turn (`advance` moves `message`
    past each answer, also the last one, whose position the caller prints as the place to go on from, and says
    whether another page follows). In text the first answer's summary and each page's rows are printed as they
    come; with `as_json` the rows are collected. Returns the first answer, the last one and the collected rows."""
    first: dict[str, Any] | None = None
    collected: Rows = []
    while True:
        answer = ask(socket_path, message)
        rows = rows_of(answer)
        if first is None:
            first = answer
            if not as_json:
                print_summary(answer)
        if as_json:
            collected += rows
        else:
            print_rows(rows)
        if not advance(message, answer) or not show_all:
            return first, answer, collected


def _next_offset(message: dict[str, Any], answer: dict[str, Any]) -> bool:
    message["offset"] += len(answer["peers"])
    return bool(answer["peers"]) and message["offset"] < answer["total"]


def _next_cursor(message: dict[str, Any], answer: dict[str, Any]) -> bool:
    if answer["next"] is None:
        return False
    message["after"] = answer["next"]
    return True


def _peer_rows(answer: dict[str, Any]) -> Rows:
    rows = []
    for peer in answer["peers"]:
        row = {field: peer.get(field) for field in ("node", "publicKey", "endpoint", "programmed", "latestHandshake",
                                                    "rxBytes", "txBytes", "persistentKeepalive")}
        row["allowedIPs"] = annotate_allowed_ips(peer["allowedIPs"], peer.get("podIPs", []), peer.get("nodeIPs", []))
        rows.append(row)
    return rows


def _print_peer(row: dict[str, Any], now: float) -> None:
    pairs = [
        ("public key", row["publicKey"]),
        ("endpoint", row["endpoint"]),
        ("allowed ips", ", ".join(_allowed_text(entry) for entry in row["allowedIPs"]) or "(none)"),
        ("latest handshake", handshake_text(row["latestHandshake"], now)),
        ("transfer", f"{human_bytes(row['rxBytes'])} received, {human_bytes(row['txBytes'])} sent"),
        ("state", "programmed" if row["programmed"] else "NOT programmed (device differs; see wgcni check)"),
    ]
    if row["persistentKeepalive"]:
        pairs.append(("persistent keepalive", f"every {row['persistentKeepalive']} seconds"))
    click.echo()
    _block(f"peer: {row['node']}", pairs)


@click.command()
@socket_option
@json_option
@_limit_option
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0), help="Skip this many first.")
@_all_option
@click.option("--node", default=None, help="Only the peer of this node.")
def peers(socket_path: str, as_json: bool, limit: int, offset: int, show_all: bool, node: str | None) -> None:
    """WireGuard peers: node, endpoint, latest handshake, transfer, AllowedIPs and what they are."""
    message: dict[str, Any] = {"op": "peers", "offset": offset, "limit": PEERS_PAGE if show_all else limit}
    if node is not None:
        message["node"] = node

    def print_summary(answer: dict[str, Any]) -> None:
        summary = answer["summary"]
        click.echo(f"{plural(summary['peers'], 'peer')}: {summary['programmed']} programmed, "
                   f"{summary['handshakeRecent']} with a handshake in the last 3 minutes, "
                   f"{summary['handshakeNever']} never"
                   + (f"; {answer['total']} match --node" if node is not None else ""))

    def print_peers(rows: Rows) -> None:
        now = time.time()
        for row in rows:
            _print_peer(row, now)

    first, answer, collected = _show_pages(socket_path, message, show_all, as_json, _next_offset, _peer_rows,
                                           print_summary, print_peers)
    if as_json:
        _emit_json({"peers": collected, "total": first["total"], "offset": offset, "summary": first["summary"]})
        return
    rest = answer["total"] - message["offset"]
    if rest > 0:
        click.echo(f"... {plural(rest, 'more peer')}: --offset {message['offset']}, or --all")


@click.command()
@socket_option
@json_option
@_limit_option
@click.option("--after", default=None, metavar="OWNER", help="Start after this owner's routes (the cursor the "
              "previous page printed).")
@_all_option
@click.option("--owner", default=None, help="Only routes of this node, or 'local' for this node's pods.")
def routes(socket_path: str, as_json: bool, limit: int, after: str | None, show_all: bool, owner: str | None) -> None:
    """Routes in the hook's table: prefix, dev (into WireGuard) or throw (main table), and whose it is.

    Grouped by owner: this node's pods first, then each node by name; a page holds whole groups."""
    message: dict[str, Any] = {"op": "routes", "limit": ROUTES_PAGE if show_all else limit}
    for field, value in (("owner", owner), ("after", after)):
        if value is not None:
            message[field] = value
    table = Table(("PREFIX", "KIND", "OWNER", "POD"))

    def route_rows(answer: dict[str, Any]) -> Rows:
        return [{"prefix": route["prefix"], "kind": route["kind"], "owner": route["owner"], "pod": route.get("pod")}
                for route in answer["routes"]]

    def print_summary(answer: dict[str, Any]) -> None:
        by_kind = answer["byKind"]
        click.echo(f"{plural(sum(by_kind.values()), 'route')}: {by_kind.get('dev', 0)} into WireGuard (dev), "
                   f"{by_kind.get('throw', 0)} leave the table (throw)"
                   + (f"; {answer['total']} owned by {owner}" if owner is not None else ""))

    def print_routes(rows: Rows) -> None:
        table.write([(row["prefix"], row["kind"], row["owner"], row["pod"] or "-") for row in rows])

    first, answer, collected = _show_pages(socket_path, message, show_all, as_json, _next_cursor, route_rows,
                                           print_summary, print_routes)
    if as_json:  # with --all the last page's next is None
        _emit_json({"routes": collected, "total": first["total"], "next": answer["next"], "byKind": first["byKind"]})
        return
    if answer["next"] is not None:  # with --all the pages went on until there was none
        click.echo(f"... more routes: --after {answer['next']}, or --all")


@click.command()
@socket_option
@json_option
@click.pass_context
def check(ctx: click.Context, socket_path: str, as_json: bool) -> None:
    """Diagnose the known failure modes, one line each: what is wrong and what to do.

    Exit code: 0 nothing wrong, 1 problems found, 2 could not check (hook not reachable)."""
    try:
        answer = ask(socket_path, {"op": "diagnose"})
    except HookQueryError as error:
        findings = [{"check": "hook", "severity": "error", "message": error.problem, "fix": error.fix}]
        _report(findings, [], EXIT_UNCHECKED, as_json)
        ctx.exit(EXIT_UNCHECKED)
    findings = answer["findings"]
    code = EXIT_PROBLEMS if any(f["severity"] in ("error", "warning") for f in findings) else EXIT_OK
    _report(findings, answer["checks"], code, as_json)
    ctx.exit(code)


_MARK = {"error": "FAIL", "warning": "WARN", "info": "info"}


def _report(findings: list[dict[str, str]], checks: list[str], code: int, as_json: bool) -> None:
    if as_json:
        _emit_json({"exitCode": code, "ok": code == EXIT_OK, "checks": checks, "findings": findings})
        return
    for finding in findings:
        click.echo(f"{_MARK.get(finding['severity'], finding['severity'])} {finding['check']}: "
                   f"{finding['message']} -> {finding['fix']}")
    if code == EXIT_OK:
        click.echo(f"ok: {len(checks)} checks passed ({', '.join(checks)})")


def programmed_ips(socket_path: str, ips: list[str]) -> set[str] | None:
    """Which of `ips` the hook has programmed as local pods; None when the hook cannot be asked (for `wgcni pods`)."""
    if not os.path.exists(socket_path):
        return None
    try:
        answer = ask(socket_path, {"op": "check", "ips": ips})
    except HookQueryError:
        return None
    return set(ips) - set(answer.get("missing", ips))


def hook_local_pods(socket_path: str) -> list[dict[str, Any]] | None:
    """The hook's local pods with their sources (records and host routes); None when the hook cannot be asked."""
    if not os.path.exists(socket_path):
        return None
    try:
        return list(ask(socket_path, {"op": "pods"})["pods"])
    except (HookQueryError, KeyError, TypeError):
        return None


HOOK_COMMANDS = (status, peers, routes, check)
