"""Patch semantics: JSON merge patch (RFC 7386), strategic merge patch for the lists the hook uses, JSON patch
(RFC 6902)."""

from __future__ import annotations

import copy
from typing import Any

from wgcni_lab.apiserver.errors import ApiError


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# Lists that a strategic merge patch merges by key instead of replacing (the ones the hook's objects carry).
STRATEGIC_MERGE_KEYS = {("metadata", "ownerReferences"): "uid", ("status", "conditions"): "type",
                        ("status", "addresses"): "type"}


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Strategic merge patch as the API server applies it to the fields listed in STRATEGIC_MERGE_KEYS; elsewhere
    it behaves as a JSON merge patch (which is what it does for lists without a merge key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if "$patch" in patch or any(key.startswith("$") for key in patch):
        raise ApiError(400, "BadRequest", "strategic merge patch directives are not supported by this server")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        child = path + (key,)
        if value is None:
            result.pop(key, None)
        elif child in STRATEGIC_MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            merge_key = STRATEGIC_MERGE_KEYS[child]
            merged = {item.get(merge_key): item for item in result[key]}
            order = [item.get(merge_key) for item in result[key]]
            for item in value:
                identity = item.get(merge_key)
                if identity not in merged:
                    order.append(identity)
                merged[identity] = strategic_merge_patch(merged.get(identity), item, child)
            result[key] = [merged[identity] for identity in order]
        else:
            result[key] = strategic_merge_patch(result.get(key), value, child)
    return result


def _pointer_parts(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {pointer!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _pointer_parent(document: Any, parts: list[str]) -> tuple[Any, str]:
    node = document
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None
    return node, parts[-1]


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902 (add, remove, replace, test, move, copy), applied to a copy; a failing op rejects the whole patch."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    result = copy.deepcopy(document)

    def get(parts: list[str]) -> Any:
        if not parts:
            return result
        parent, last = _pointer_parent(result, parts)
        try:
            return parent[int(last)] if isinstance(parent, list) else parent[last]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None

    def remove(parts: list[str]) -> Any:
        parent, last = _pointer_parent(result, parts)
        try:
            return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist") from None

    def add(parts: list[str], value: Any, replace: bool) -> None:
        nonlocal result
        if not parts:
            result = value
            return
        parent, last = _pointer_parent(result, parts)
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
            if not 0 <= index <= len(parent) - (1 if replace else 0):
                raise ApiError(422, "Invalid", f"JSON patch index {last!r} out of range")
            if replace:
                parent[index] = value
            else:
                parent.insert(index, value)
        elif isinstance(parent, dict):
            if replace and last not in parent:
                raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist")
            parent[last] = value
        else:
            raise ApiError(422, "Invalid", f"JSON patch path /{'/'.join(parts)} does not exist")

    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise ApiError(400, "BadRequest", f"malformed JSON patch operation {operation!r}")
        op, parts = operation["op"], _pointer_parts(operation["path"])
        if op == "add":
            add(parts, copy.deepcopy(operation.get("value")), replace=False)
        elif op == "replace":
            add(parts, copy.deepcopy(operation.get("value")), replace=True)
        elif op == "remove":
            remove(parts)
        elif op == "test":
            if get(parts) != operation.get("value"):
                raise ApiError(422, "Invalid", f"JSON patch test failed at {operation['path']}")
        elif op in ("move", "copy"):
            source = _pointer_parts(operation.get("from", ""))
            value = remove(source) if op == "move" else copy.deepcopy(get(source))
            add(parts, value, replace=False)
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch operation {op!r}")
    return result
