"""README.md stays true to the code: its settings table mirrors `SETTINGS_DOC`, every metric it names exists,
every `wgcni` / `wgcni-node` subcommand it lists is a real command (and every `wgcni-lab` one docs/lab.md lists),
and its relative links resolve.

Pure file and import checks: no network, no root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from cni_plugin.cli import cli as wgcni_cli
from node_hook import metrics
from node_hook.cli import main as wgcni_node_cli
from node_hook.config import SETTINGS_DOC, settings_from_mapping
from wgcni_lab.cli import cli as wgcni_lab_cli

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
LAB_DOC = (REPO / "docs" / "lab.md").read_text()


def section(title: str, text: str = README) -> str:
    """The text of the `## <title>` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{'README.md' if text is README else 'docs/lab.md'} has no '## {title}' section"
    return match.group(1)


def table_cells(line: str) -> list[str]:
    """The cells of one Markdown table row, with the `\\|`, `\\<`, `\\>` escapes undone."""
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [re.sub(r"\\([|<>])", r"\1", cell).strip() for cell in cells]


def code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def readme_settings() -> list[tuple[str, str, str]]:
    rows = [table_cells(line) for line in section("Settings").splitlines() if line.startswith("| `")]
    return [(code(key), code(default), meaning) for key, default, meaning in rows]


def parse_default(text: str, documented: object) -> object:
    """The README's default, read as the type of the documented one (fwmark may be written in hex)."""
    if isinstance(documented, bool):
        return {"true": True, "false": False}[text]
    if isinstance(documented, int):
        return int(text, 0)
    if isinstance(documented, float):
        return float(text)
    if isinstance(documented, list):
        return json.loads(text)
    return "" if text == '""' else text


def test_settings_table_lists_every_setting_in_order() -> None:
    assert [key for key, _, _ in readme_settings()] == [key for key, _, _ in SETTINGS_DOC]


@pytest.mark.parametrize("documented", SETTINGS_DOC, ids=[doc[0] for doc in SETTINGS_DOC])
def test_settings_table_row_matches_settings_doc(documented: tuple[str, object, str]) -> None:
    key, default, meaning = documented
    rows = {row[0]: row for row in readme_settings()}
    assert key in rows, f"README.md's settings table lacks {key}"
    _, readme_default, readme_meaning = rows[key]
    assert parse_default(readme_default, default) == default, f"{key}: README default {readme_default!r}"
    assert readme_meaning == meaning, f"{key}: README meaning differs from SETTINGS_DOC"


def test_settings_doc_defaults_are_what_the_loader_applies() -> None:
    """The table is only worth mirroring if SETTINGS_DOC's defaults are the real ones."""
    loaded = settings_from_mapping({})
    for key, default, _ in SETTINGS_DOC:
        if key == "nodeName":
            continue  # the host name, shown as <hostname>
        field = re.sub(r"(?<!^)(?<![A-Z])([A-Z])", r"_\1", key).lower()  # strictCIDRs -> strict_cidrs
        value = getattr(loaded, field)
        value = list(value) if isinstance(value, tuple) else value
        value = "" if value is None else str(value) if isinstance(value, Path) else value
        assert value == default, f"{key}: SETTINGS_DOC says {default!r}, the loader applies {value!r}"


def test_every_metric_named_in_the_readme_exists() -> None:
    source = Path(metrics.__file__).read_text()
    named = set(re.findall(r"`(wgcni_[a-z_]+)[`{ ]", README))
    assert named, "README.md names no metric"
    # prometheus-client appends _total to counters and _bucket to histograms itself
    missing = [name for name in sorted(named)
               if f'"{name}"' not in source and f'"{re.sub(r"_(total|bucket)$", "", name)}"' not in source]
    assert not missing, f"README.md names metrics node_hook/metrics.py does not define: {missing}"


def subcommands(group: click.Group) -> set[str]:
    return {name for name, command in group.commands.items() if not command.hidden}


@pytest.mark.parametrize("binary, group", [("wgcni", wgcni_cli), ("wgcni-node", wgcni_node_cli),
                                           ("wgcni-lab", wgcni_lab_cli)])
def test_cli_section_lists_every_subcommand_and_no_other(binary: str, group: click.Group) -> None:
    text = section("`wgcni-lab`", LAB_DOC) if binary == "wgcni-lab" else section("CLI")  # the lab's CLI: docs/lab.md
    named = set(re.findall(rf"`{re.escape(binary)} ([a-z][a-z-]*)", text))
    if binary == "wgcni-lab":  # listed in one row as `wgcni-lab up ...`, `status ...`, `pod-add NODE`, ...
        row = next(line for line in text.splitlines() if line.startswith("| `wgcni-lab up"))
        named |= {re.match(r"[a-z-]+", span).group(0) for span in re.findall(r"`([^`]+)`", table_cells(row)[0])}
        named.discard("wgcni-lab")
    assert named == subcommands(group), f"{binary}: README lists {sorted(named)}"


def test_relative_links_resolve() -> None:
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    assert targets
    missing = [target for target in targets if "://" not in target and not (REPO / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
