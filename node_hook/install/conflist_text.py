"""The conflist text edit: the wgcni entry spliced in right after azure-vnet, or cut out again (pure, no I/O).

Editing the conflist is a text edit, not a re-serialisation: the new entry is spliced in after azure-vnet's object in
the file's own indentation and separator style, so every other byte (key order, `"name": "azure"`, cniVersion, the
other plugins, whitespace) stays as it was, and removing the entry gives back the original bytes. The result is re-
parsed and compared with the intended document before it is returned. An existing wgcni entry is updated in place
(any duplicate or misplaced one is dropped); a text that is already as wanted comes back as it is.

Refusals (InstallError, so the caller changes nothing): the text is not valid JSON, has no azure-vnet entry (or more
than one), declares a cniVersion the plugin does not speak, or is a single-plugin `.conf`. A single-plugin file is
refused rather than converted: chaining needs a conflist, and converting means renaming a file that AKS node
provisioning owns (and whose `.conf` name would keep sorting before a new `.conflist`); every supported AKS
configuration ships `10-azure.conflist`, so an operator who sees a `.conf` is on a custom node and should decide.
"""

from __future__ import annotations

import json
import re
from _json import scanstring  # what json.decoder.scanstring is in CPython, and typed
from dataclasses import dataclass

from cni_plugin.cni import SUPPORTED_VERSIONS
from node_hook.install.errors import InstallError
from node_hook.install.settings import PLUGIN_TYPE

AZURE_TYPE = "azure-vnet"

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class _Span:
    """Where one JSON value sits in the text: [start, end)."""

    start: int
    end: int


def _skip_whitespace(text: str, index: int) -> int:
    return _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]


def _object_members(text: str, start: int) -> list[tuple[str, int, _Span]]:
    """Members of the JSON object whose `{` is at `start`: (key, index of the key's quote, value span).

    Only called on text that json.loads accepted, so the grammar is known to be right.
    """
    members: list[tuple[str, int, _Span]] = []
    index = _skip_whitespace(text, start + 1)
    if text[index] == "}":
        return members
    while True:
        key_at = index
        key, index = scanstring(text, index + 1)
        index = _skip_whitespace(text, _skip_whitespace(text, index) + 1)  # past ':'
        _, end = _DECODER.raw_decode(text, index)
        members.append((key, key_at, _Span(index, end)))
        index = _skip_whitespace(text, end)
        if text[index] == "}":
            return members
        index = _skip_whitespace(text, index + 1)  # past ','


def _array_elements(text: str, start: int) -> list[_Span]:
    """Spans of the elements of the JSON array whose `[` is at `start`."""
    elements: list[_Span] = []
    index = _skip_whitespace(text, start + 1)
    if text[index] == "]":
        return elements
    while True:
        _, end = _DECODER.raw_decode(text, index)
        elements.append(_Span(index, end))
        index = _skip_whitespace(text, end)
        if text[index] == "]":
            return elements
        index = _skip_whitespace(text, index + 1)


def _parse(text: str, name: str) -> dict:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InstallError(f"{name} is not valid JSON ({error}); fix or regenerate it, wgcni changed nothing") from None
    if not isinstance(document, dict):
        raise InstallError(f"{name} is not a JSON object; wgcni changed nothing")
    return document


def _plugins(document: dict, name: str) -> list:
    plugins = document.get("plugins")
    if plugins is None:
        if "type" in document:
            raise InstallError(
                f"{name} is a single-plugin config ({document.get('type')!r}); wgcni chains only into a conflist "
                f"(AKS ships 10-azure.conflist): convert it to a conflist, wgcni changed nothing"
            )
        raise InstallError(f"{name} has no \"plugins\" list; wgcni changed nothing")
    if not isinstance(plugins, list) or not all(isinstance(plugin, dict) for plugin in plugins):
        raise InstallError(f"{name}: \"plugins\" must be a list of objects; wgcni changed nothing")
    return plugins


def _plugins_array_start(text: str) -> int:
    """Index of the `[` of the top-level "plugins" value (the last one if the key repeats, as json.loads takes)."""
    spans = [span for key, _, span in _object_members(text, _skip_whitespace(text, 0)) if key == "plugins"]
    return spans[-1].start


def _is_wgcni(plugin: dict) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def strip_entries(text: str, name: str = "conflist") -> str:
    """The text with every wgcni entry cut out (exactly undoing `insert_entry`)."""
    while True:
        positions = [index for index, plugin in enumerate(_plugins(_parse(text, name), name)) if _is_wgcni(plugin)]
        if not positions:
            return text
        index = positions[-1]
        array_start = _plugins_array_start(text)
        elements = _array_elements(text, array_start)
        if index > 0:  # cut ", <entry>" from the end of the previous element
            text = text[: elements[index - 1].end] + text[elements[index].end :]
        elif len(elements) > 1:  # the first element: cut "<entry>, " up to the next element
            text = text[: elements[0].start] + text[elements[1].start :]
        else:  # the only element
            text = text[: array_start + 1] + text[elements[0].end :]


def _render_like(text: str, neighbour: _Span, entry: dict) -> str:
    """`entry` serialised in the style of the object at `neighbour`, preceded by the separator to follow it."""
    members = _object_members(text, neighbour.start)
    key_value_separator = ": "
    element_indent = text[text.rfind("\n", 0, neighbour.start) + 1 : neighbour.start]
    own_line = "\n" in text[: neighbour.start] and not element_indent.strip()
    newline = "\r\n" if "\r\n" in text else "\n"
    multiline = False
    if members:
        _, key_at, value = members[0]
        gap = text[scanstring(text, key_at + 1)[1] : value.start]  # e.g. ":", ": ", " : "
        key_value_separator = ":" + (" " if gap.split(":", 1)[1] else "")
        member_line_start = text.rfind("\n", 0, key_at) + 1
        member_indent = text[member_line_start:key_at]
        multiline = (
            own_line
            and member_line_start > neighbour.start
            and not member_indent.strip()
            and member_indent.startswith(element_indent)
            and len(member_indent) > len(element_indent)
        )
    if not multiline:  # one-line objects: one line for ours too, on its own line if the neighbour has one
        item_separator = ", " if key_value_separator == ": " else ","
        compact = json.dumps(entry, separators=(item_separator, key_value_separator))
        return ("," + newline + element_indent if own_line else item_separator) + compact
    unit = member_indent[len(element_indent) :]
    rendered = json.dumps(entry, indent=unit, separators=(",", key_value_separator))
    return "," + newline + element_indent + rendered.replace("\n", newline + element_indent)


def insert_entry(text: str, entry: dict, name: str = "conflist") -> str:
    """The conflist text with `entry` right after azure-vnet and no other wgcni entry; `text` itself if already so.

    Raises InstallError (the caller changes nothing) when the text is not a conflist wgcni can chain into.
    """
    document = _parse(text, name)
    plugins = _plugins(document, name)
    azure = [index for index, plugin in enumerate(plugins) if plugin.get("type") == AZURE_TYPE]
    if not azure:
        raise InstallError(
            f"{name} has no {AZURE_TYPE} plugin; wgcni chains only after Azure CNI, wgcni changed nothing"
        )
    if len(azure) > 1:
        raise InstallError(f"{name} has {len(azure)} {AZURE_TYPE} plugins; expected one, wgcni changed nothing")
    version = document.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:  # every pod ADD would fail
        raise InstallError(
            f"{name} declares cniVersion {version!r}; the wgcni plugin supports {', '.join(SUPPORTED_VERSIONS)}, "
            f"wgcni changed nothing"
        )
    others = [plugin for plugin in plugins if not _is_wgcni(plugin)]
    azure_position = next(index for index, plugin in enumerate(others) if plugin.get("type") == AZURE_TYPE)
    wanted_plugins = others[: azure_position + 1] + [entry] + others[azure_position + 1 :]
    if plugins == wanted_plugins:
        return text
    stripped = strip_entries(text, name)
    elements = _array_elements(stripped, _plugins_array_start(stripped))
    azure_span = elements[azure_position]
    result = stripped[: azure_span.end] + _render_like(stripped, azure_span, entry) + stripped[azure_span.end :]
    wanted = dict(document, plugins=wanted_plugins)
    if json.loads(result) != wanted or list(json.loads(result)) != list(document):
        raise InstallError(f"{name}: could not splice the wgcni entry without changing other content; wgcni changed "
                           f"nothing (please report this file)")
    return result


def has_entry(text: str) -> bool:
    """Whether a conflist text (valid or not) carries a wgcni plugin entry; for `wgcni check`."""
    try:
        plugins = json.loads(text).get("plugins")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(plugins, list) and any(isinstance(plugin, dict) and _is_wgcni(plugin) for plugin in plugins)
