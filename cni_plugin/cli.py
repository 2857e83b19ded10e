"""Operator CLI of the `wgcni` binary (run without CNI_COMMAND): `wgcni version`, `wgcni pods`, and more.

``cli`` is a click group: other modules add subcommands with ``@cli.command()``. ``run`` is the entry point;
it turns every usage error or I/O failure into one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cni_plugin import __version__
from cni_plugin.cli_hook import HOOK_COMMANDS, HookQueryError, Table, hook_local_pods, programmed_ips, socket_option
from cni_plugin.cni import DEFAULT_STATE_DIR, SUPPORTED_VERSIONS
from cni_plugin.records import RecordStore, valid_network

POD_FIELDS = ("network", "podNamespace", "podName", "podUID", "containerID", "ifname", "ips", "created", "updated")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """wgcni: WireGuard encryption for Azure CNI pods (chained CNI plugin and its debug commands)."""


@cli.command()
def version() -> None:
    """Print the wgcni version and the CNI versions it speaks."""
    click.echo(f"wgcni {__version__} (CNI {', '.join(SUPPORTED_VERSIONS)})")


@cli.command()
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, type=click.Path(file_okay=False),
              help="The plugin's stateDir.")
@click.option("--network", default=None, help="Only this CNI network.")
@click.option("--json", "as_json", is_flag=True, help="A stable JSON array of objects instead of a table.")
@socket_option
def pods(state_dir: str, network: str | None, as_json: bool, socket_path: str) -> None:
    """List this node's pods: the attachments the plugin has recorded and, when the hook answers, the pods it
    learned only from their host routes (no record: they predate wgcni), where each came from (`sources`) and
    whether the hook programmed it (`programmed`: true/false, null when the hook cannot be asked)."""
    if network is not None and not valid_network(network):
        raise click.BadParameter(f"{network!r} is not a valid network name", param_hint="--network")
    problems: list[str] = []
    records = RecordStore(state_dir).list(network, errors=problems)
    for problem in problems:
        click.echo(f"wgcni: skipped {problem}", err=True)
    rows: list[dict[str, Any]] = [{field: record.get(field) for field in POD_FIELDS} for record in records]
    hook_pods = hook_local_pods(socket_path)
    by_key = {pod["key"]: pod for pod in hook_pods or ()}
    for row in rows:
        known = by_key.get(f"{row['network']}/{row['containerID']}@{row['ifname']}") or {}
        row["sources"] = known.get("sources") or ["record"]
        row["hostInterface"] = known.get("hostInterface")
    if network is None:
        rows += [dict({field: None for field in POD_FIELDS}, ips=pod["ips"], sources=pod["sources"],
                      hostInterface=pod["hostInterface"])
                 for pod in hook_pods or () if pod["sources"] == ["route"]]
    ips = sorted({ip for row in rows for ip in row["ips"]})
    programmed = programmed_ips(socket_path, ips) if rows else None
    for row in rows:
        row["programmed"] = None if programmed is None else all(ip in programmed for ip in row["ips"])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(("NETWORK", "POD", "CONTAINER", "IFNAME", "IPS", "UPDATED")
                  + (("SOURCE",) if hook_pods is not None else ())
                  + (("PROGRAMMED",) if programmed is not None else ()))
    lines = []
    for row in rows:
        pod = f"{row['podNamespace']}/{row['podName']}" if row["podName"] else "-"
        source = "+".join(row["sources"]) if row["network"] else f"route only ({row['hostInterface']})"
        lines.append((row["network"] or "-", pod, (row["containerID"] or "-")[:13], row["ifname"] or "-",
                      ",".join(row["ips"]) or "-", row["updated"] or "-")
                     + ((source,) if hook_pods is not None else ())
                     + (("yes" if row["programmed"] else "NO",) if programmed is not None else ()))
    table.write(lines)
    unrecorded = sum(1 for row in rows if not row["network"])
    if unrecorded:
        click.echo(f"{unrecorded} pod(s) have no pod record: the hook learned their IPs from the node's routes and "
                   "encrypts them; recreate them to give them a record (see wgcni check)", err=True)


for command in HOOK_COMMANDS:
    cli.add_command(command)


def run(argv: list[str]) -> int:
    """Run the CLI on ``argv``; returns the exit code."""
    try:
        result = cli.main(args=argv, prog_name="wgcni", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("wgcni: aborted", err=True)
        return 1
    except click.exceptions.NoArgsIsHelpError as error:  # plain `wgcni`: the help, not an error line around it
        click.echo(error.format_message())
        return 0
    except HookQueryError as error:  # already says what to do; --help would not help
        click.echo(f"wgcni: {error.format_message()}", err=True)
        return error.exit_code
    except click.ClickException as error:
        click.echo(f"wgcni: {error.format_message()} (see 'wgcni --help')", err=True)
        return error.exit_code
    except OSError as error:
        click.echo(f"wgcni: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""), err=True)
        return 1
    return result if isinstance(result, int) else 0
