"""Which objects a list or a watch sees: the namespace, field selectors (`metadata.name=...`, `spec.nodeName!=...`)
and equality label selectors."""

from __future__ import annotations

import re
from dataclasses import dataclass

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import JSON


class LabelSelector:
    """Equality-based label selector: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated (all must hold)."""

    _term = re.compile(r"^(!?)([A-Za-z0-9./_-]+)(?:(==|=|!=)([A-Za-z0-9._-]*))?$")

    def __init__(self, text: str):
        self.terms: list[tuple[str, str, str | None]] = []
        for raw in filter(None, (part.strip() for part in text.split(","))):
            match = self._term.match(raw)
            if not match or (match.group(1) and match.group(3)):
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {raw!r}")
            negated, key, operator, value = match.groups()
            if operator is None:
                self.terms.append(("absent" if negated else "exists", key, None))
            else:
                self.terms.append(("ne" if operator == "!=" else "eq", key, value))

    def matches(self, obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for kind, key, value in self.terms:
            if kind == "exists" and key not in labels:
                return False
            if kind == "absent" and key in labels:
                return False
            if kind == "eq" and labels.get(key) != value:
                return False
            if kind == "ne" and labels.get(key) == value:
                return False
        return True


_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9.]*)(==|=|!=)(.*)$")


def _field_value(obj: JSON, path: str) -> str:
    """The value of a dotted field path as a field selector compares it ("" when absent)."""
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Selection:
    """Which objects of a type a list or watch sees."""

    name: str | None = None
    labels: LabelSelector | None = None
    namespace: str | None = None  # None: every namespace (and cluster-scoped objects)
    fields: tuple[tuple[str, bool, str], ...] = ()  # (path, equal, value) besides metadata.name

    @classmethod
    def from_query(cls, query: dict[str, str], namespace: str | None = None) -> Selection:
        name = None
        fields = []
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            match = _FIELD.match(term.strip())
            if not match:
                raise ApiError(400, "BadRequest", f'invalid field selector: "{term}"')
            path, operator, value = match.groups()
            if path == "metadata.name" and operator != "!=":
                if not value:
                    raise ApiError(400, "BadRequest", f'field label not supported: "{term}"')
                name = value
            else:
                fields.append((path, operator != "!=", value))
        labels = LabelSelector(query["labelSelector"]) if query.get("labelSelector") else None
        return cls(name=name, labels=labels, namespace=namespace, fields=tuple(fields))

    def matches(self, obj: JSON) -> bool:
        metadata = obj["metadata"]
        if self.name is not None and metadata["name"] != self.name:
            return False
        if self.namespace is not None and metadata.get("namespace", "") != self.namespace:
            return False
        if any((_field_value(obj, path) == value) != equal for path, equal, value in self.fields):
            return False
        return self.labels is None or self.labels.matches(obj)
