"""Server-side printing: lists and objects as `meta.k8s.io/v1` Tables, which kubectl asks for (`Accept:
application/json;as=Table;v=v1;g=meta.k8s.io`) and prints. Nodes get kubectl's usual columns, custom resources the
CRD's additionalPrinterColumns (a JSONPath each), everything else Name and Age."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import JSON, NAMESPACES, NODES, ResourceType

NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}
AGE_COLUMN = {"name": "Age", "type": "string", "format": "", "priority": 0,
              "description": "CreationTimestamp is a timestamp representing the server time when this object was "
                             "created."}


def wants_table(accept: str) -> bool:
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration, as the AGE column shows it."""
    seconds = int(seconds)
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = hours // (24 * 365), (hours // 24) % 365
    return f"{years}y{days}d" if years < 8 and days else f"{years}y"


def _age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        created = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((now - created).total_seconds())


# --- JSONPath as additionalPrinterColumns use it: .a.b, .a[0], .a[?(@.key=="value")].b -------------------------
_STEP = re.compile(r"""\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*(?:"([^"]*)"|'([^']*)')\)\]""")


def json_path(obj: Any, path: str) -> list[Any]:
    """Every value `path` selects in `obj` (a filter may select several)."""
    position, values = 0, [obj]
    while position < len(path):
        match = _STEP.match(path, position)
        if match is None:
            raise ApiError(500, "InternalError", f"unsupported JSONPath {path!r}")
        position = match.end()
        field, index, filter_field, double, single = match.groups()
        selected: list[Any] = []
        for value in values:
            if field is not None and isinstance(value, dict) and field in value:
                selected.append(value[field])
            elif index is not None and isinstance(value, list) and int(index) < len(value):
                selected.append(value[int(index)])
            elif filter_field is not None and isinstance(value, list):
                wanted = double if double is not None else single
                for item in value:
                    found = json_path(item, "." + filter_field)
                    if found and str(found[0]) == wanted:
                        selected.append(item)
        values = selected
    return values


def _cell(column: JSON, obj: JSON, now: datetime) -> Any:
    values = json_path(obj, column["jsonPath"])
    if not values or values[0] is None:
        return None
    value = values[0]
    if column.get("type") == "date":
        return _age(value if isinstance(value, str) else None, now)
    if column.get("type") == "integer" and isinstance(value, int):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return value


# --- per type ---------------------------------------------------------------------------------------------------
def _node_cells(node: JSON, now: datetime) -> list[Any]:
    status, metadata = node.get("status") or {}, node["metadata"]
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    state = "Unknown" if ready is None else ("Ready" if ready.get("status") == "True" else "NotReady")
    if (node.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = metadata.get("labels") or {}
    roles = sorted(key.split("/", 1)[1] for key in labels if key.startswith("node-role.kubernetes.io/"))
    if "kubernetes.io/role" in labels:
        roles.append(labels["kubernetes.io/role"])
    addresses = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    info = status.get("nodeInfo") or {}
    return [metadata["name"], state, ",".join(roles) or "<none>", _age(metadata.get("creationTimestamp"), now),
            info.get("kubeletVersion", ""), addresses.get("InternalIP", "<none>"),
            addresses.get("ExternalIP", "<none>"), info.get("osImage", "<unknown>"),
            info.get("kernelVersion", "<unknown>"), info.get("containerRuntimeVersion", "<unknown>")]


def _string_column(name: str, priority: int = 0, description: str = "") -> JSON:
    return {"name": name, "type": "string", "format": "", "priority": priority, "description": description}


NODE_COLUMNS = [NAME_COLUMN, _string_column("Status", description="The status of the node"),
                _string_column("Roles", description="The roles of the node"), AGE_COLUMN,
                _string_column("Version", description="Kubelet Version reported by the node."),
                _string_column("Internal-IP", 1), _string_column("External-IP", 1), _string_column("OS-Image", 1),
                _string_column("Kernel-Version", 1), _string_column("Container-Runtime", 1)]


def _columns_and_cells(rtype: ResourceType) -> tuple[list[JSON], Any]:
    if rtype == NODES:
        return NODE_COLUMNS, _node_cells
    if rtype == NAMESPACES:
        return ([NAME_COLUMN, _string_column("Status"), AGE_COLUMN],
                lambda obj, now: [obj["metadata"]["name"], (obj.get("status") or {}).get("phase", ""),
                                  _age(obj["metadata"].get("creationTimestamp"), now)])
    if rtype.custom and rtype.printer_columns:
        columns = [NAME_COLUMN] + [{"name": column["name"], "type": column.get("type", "string"),
                                    "format": column.get("format", ""), "priority": column.get("priority", 0),
                                    "description": column.get("description", "")}
                                   for column in rtype.printer_columns]
        return columns, lambda obj, now: [obj["metadata"]["name"]] + [
            _cell(column, obj, now) for column in rtype.printer_columns]
    return [NAME_COLUMN, AGE_COLUMN], lambda obj, now: [obj["metadata"]["name"],
                                                        _age(obj["metadata"].get("creationTimestamp"), now)]


def _row_object(obj: JSON, include: str) -> JSON | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(rtype: ResourceType, items: list[JSON], list_metadata: JSON, include_object: str = "") -> JSON:
    """The Table of `items` (one object for a GET of one name), rows carrying what `includeObject` asks for
    (PartialObjectMetadata by default, as the real server)."""
    now = datetime.now(UTC)
    columns, cells = _columns_and_cells(rtype)
    rows = []
    for obj in items:
        row: JSON = {"cells": cells(obj, now)}
        included = _row_object(obj, include_object or "PartialObjectMetadata")
        if included is not None:
            row["object"] = included
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_metadata,
            "columnDefinitions": columns, "rows": rows}
