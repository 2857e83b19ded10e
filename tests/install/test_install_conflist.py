"""The conflist text edit of install-cni: insertion right after azure-vnet, exact undo, refusals, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_plugin.cni import SUPPORTED_VERSIONS
from node_hook.install.conflist_text import has_entry, insert_entry, strip_entries
from node_hook.install.errors import InstallError
from node_hook.install.settings import PluginSettings

DATA = Path(__file__).parents[1] / "cni" / "data"  # the AKS conflists, shared with the plugin's tests
AKS_CONFLISTS = sorted(DATA.glob("*.conflist"))
ENTRY = PluginSettings().entry()


def test_reference_conflists_are_present():
    assert len(AKS_CONFLISTS) >= 6


@pytest.mark.parametrize("path", AKS_CONFLISTS, ids=lambda path: path.name)
def test_inserts_right_after_azure_vnet_and_keeps_everything_else(path):
    original = path.read_text()
    before = json.loads(original)
    result = insert_entry(original, ENTRY, path.name)
    after = json.loads(result)
    assert list(after) == list(before)  # top-level key order
    assert after["name"] == "azure" and after["cniVersion"] == before["cniVersion"]
    types = [plugin["type"] for plugin in after["plugins"]]
    azure = types.index("azure-vnet")
    assert types[azure + 1] == "wgcni"
    assert after["plugins"][azure + 1] == ENTRY
    assert [plugin for plugin in after["plugins"] if plugin["type"] != "wgcni"] == before["plugins"]
    kept_plugins = [p for p in after["plugins"] if p["type"] != "wgcni"]
    for kept, original_plugin in zip(kept_plugins, before["plugins"], strict=True):
        assert list(kept) == list(original_plugin)  # key order inside every plugin


def _inserted(original: str, result: str) -> str:
    """The text `result` adds to `original` as one contiguous insertion that starts with the "," before the entry."""
    added = len(result) - len(original)
    prefix = next((i for i, (a, b) in enumerate(zip(original, result, strict=False)) if a != b), len(original))
    for start in range(prefix, -1, -1):  # the insertion point is ambiguous where the entry repeats its surroundings
        if result[:start] + result[start + added :] == original and result[start] == ",":
            return result[start : start + added]
    raise AssertionError("the edit is not one contiguous insertion")


@pytest.mark.parametrize("path", AKS_CONFLISTS, ids=lambda path: path.name)
def test_only_the_new_entry_is_added_to_the_text(path):
    original = path.read_text()
    result = insert_entry(original, ENTRY, path.name)
    assert json.loads(_inserted(original, result).lstrip(",")) == ENTRY
    assert strip_entries(result) == original


@pytest.mark.parametrize("path", AKS_CONFLISTS, ids=lambda path: path.name)
def test_inserted_entry_follows_the_style_of_azure_vnet(path):
    original = path.read_text()
    inserted = _inserted(original, insert_entry(original, ENTRY, path.name))
    azure_line = next(line for line in original.splitlines() if '"azure-vnet"' in line)
    member_indent = azure_line[: len(azure_line) - len(azure_line.lstrip())]
    assert f"\n{member_indent}\"type\"" in inserted  # same indentation as azure-vnet's members
    assert ('"type": "wgcni"' in inserted) == ('"type": "azure-vnet"' in original)


@pytest.mark.parametrize("path", AKS_CONFLISTS, ids=lambda path: path.name)
def test_already_installed_is_left_untouched(path):
    once = insert_entry(path.read_text(), ENTRY, path.name)
    assert insert_entry(once, ENTRY, path.name) == once
    assert has_entry(once) and not has_entry(path.read_text())


@pytest.mark.parametrize("path", AKS_CONFLISTS, ids=lambda path: path.name)
def test_existing_entry_is_updated_in_place_never_duplicated(path):
    original = path.read_text()
    once = insert_entry(original, ENTRY, path.name)
    changed = PluginSettings(state_dir="/var/lib/other", log_level="debug").entry()
    twice = insert_entry(once, changed, path.name)
    plugins = json.loads(twice)["plugins"]
    assert [p["type"] for p in plugins].count("wgcni") == 1
    assert plugins[[p["type"] for p in plugins].index("azure-vnet") + 1] == changed
    assert strip_entries(twice) == original


def test_misplaced_and_duplicate_entries_are_moved_after_azure_vnet():
    plugins = [{"type": "wgcni", "stateDir": "/old"}, {"type": "azure-vnet"}, {"type": "portmap"}, {"type": "wgcni"}]
    text = json.dumps({"cniVersion": "0.3.0", "name": "azure", "plugins": plugins}, indent=2)
    result = json.loads(insert_entry(text, ENTRY))
    assert [p["type"] for p in result["plugins"]] == ["azure-vnet", "wgcni", "portmap"]
    assert result["plugins"][1] == ENTRY


def test_strip_removes_an_entry_that_is_first_or_alone():
    first = '{"cniVersion": "0.3.0", "plugins": [ {"type": "wgcni"} , {"type": "azure-vnet"}]}'
    assert json.loads(strip_entries(first))["plugins"] == [{"type": "azure-vnet"}]
    alone = '{"cniVersion": "0.3.0", "plugins": [\n  {"type": "wgcni"}\n]}'
    assert json.loads(strip_entries(alone))["plugins"] == []


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": [{"type": "azure-vnet"},]}', "not valid JSON"),
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": [{"type": "azure-vnet"}', "not valid JSON"),
        ("", "not valid JSON"),
        ('["azure-vnet"]', "not a JSON object"),
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}',
         "no azure-vnet plugin"),
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": []}', "no azure-vnet plugin"),
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": [{"type": "azure-vnet"}, {"type": "azure-vnet"}]}',
         "2 azure-vnet plugins"),
        ('{"cniVersion": "0.3.0", "name": "azure", "type": "azure-vnet", "mode": "transparent"}',
         "single-plugin config"),
        ('{"cniVersion": "0.3.0", "name": "azure"}', 'no "plugins" list'),
        ('{"cniVersion": "0.3.0", "name": "azure", "plugins": {"type": "azure-vnet"}}', "must be a list of objects"),
        ('{"cniVersion": "0.2.0", "name": "azure", "plugins": [{"type": "azure-vnet"}]}', "cniVersion '0.2.0'"),
        ('{"name": "azure", "plugins": [{"type": "azure-vnet"}]}', "cniVersion None"),
    ],
    ids=["trailing-comma", "truncated", "empty", "array", "no-azure", "no-plugins", "two-azure", "single-conf",
         "no-plugins-key", "plugins-object", "old-version", "no-version"],
)
def test_refusals_are_one_line_and_name_the_file(text, message):
    with pytest.raises(InstallError) as raised:
        insert_entry(text, ENTRY, "10-azure.conflist")
    assert message in str(raised.value)
    assert "10-azure.conflist" in str(raised.value) and "\n" not in str(raised.value)


# Any conflist that has exactly one azure-vnet, serialised in any of the styles json can produce.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
_plugin = st.dictionaries(st.text(max_size=6).filter(lambda key: key != "type"), _values, max_size=3)


@st.composite
def _conflists(draw):
    others = draw(st.lists(_plugin.map(lambda p: {"type": draw(st.sampled_from(["portmap", "bandwidth", "x"])), **p}),
                           max_size=3))
    azure = {"type": "azure-vnet", **draw(_plugin)}
    position = draw(st.integers(0, len(others)))
    document = {"cniVersion": draw(st.sampled_from(SUPPORTED_VERSIONS)), "name": "azure",
                "plugins": others[:position] + [azure] + others[position:]}
    for key, value in draw(st.dictionaries(st.text(max_size=5), _values, max_size=2)).items():
        document.setdefault(key, value)
    indent = draw(st.sampled_from([None, 0, 1, 2, 3, "\t"]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]))
    return document, json.dumps(document, indent=indent, separators=separators,
                                ensure_ascii=draw(st.booleans())) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=300, deadline=None)
@given(_conflists())
def test_any_conflist_round_trips_exactly(case):
    document, text = case
    result = insert_entry(text, ENTRY)
    plugins = json.loads(result)["plugins"]
    azure = [p["type"] for p in plugins].index("azure-vnet")
    assert plugins[azure + 1] == ENTRY
    assert [p for p in plugins if p != ENTRY] == document["plugins"]
    assert strip_entries(result) == text
    assert insert_entry(result, ENTRY) == result
