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


# Lists that a strategic merge patch merges by key instead of replacing, by field name (the patchMergeKey of the
# built-in types kubectl apply and the hook patch: Node, DaemonSet pod templates, ConfigMap metadata).
STRATEGIC_MERGE_KEYS = {"ownerReferences": "uid", "conditions": "type", "addresses": "type", "containers": "name",
                        "initContainers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath",
                        "ports": "containerPort", "taints": "key", "imagePullSecrets": "name"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch as the API server applies it: lists named in STRATEGIC_MERGE_KEYS merge by their key
    (`$patch: delete` in an item removes it), `$setElementOrder` and `$retainKeys` directives are honoured as far
    as ordering goes (the merged order is kept), every other list is replaced, maps merge, null deletes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {key: copy.deepcopy(value) for key, value in patch.items() if key != "$patch"}
    if "$patch" in patch:
        raise ApiError(400, "BadRequest", f"strategic merge patch directive $patch: {patch['$patch']!r} is not "
                                          "supported here")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif key in STRATEGIC_MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            merge_key = STRATEGIC_MERGE_KEYS[key]
            merged = {item.get(merge_key): item for item in result[key] if isinstance(item, dict)}
            order = list(merged)
            for item in value:
                identity = item.get(merge_key)
                if item.get("$patch") == "delete":
                    merged.pop(identity, None)
                    continue
                if identity not in merged:
                    order.append(identity)
                merged[identity] = strategic_merge_patch(merged.get(identity), item)
            result[key] = [merged[identity] for identity in order if identity in merged]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
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
