"""Which objects a list or a watch sees: `fieldSelector=metadata.name=...` and equality label selectors."""

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


@dataclass
class Selection:
    """Which objects of a type a list or watch sees."""

    name: str | None = None
    labels: LabelSelector | None = None

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Selection:
        name = None
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            key, _, value = term.partition("=")
            value = value.lstrip("=")
            if key != "metadata.name" or not value:
                raise ApiError(400, "BadRequest", f'field label not supported: "{term}"')
            name = value
        labels = LabelSelector(query["labelSelector"]) if query.get("labelSelector") else None
        return cls(name=name, labels=labels)

    def matches(self, obj: JSON) -> bool:
        if self.name is not None and obj["metadata"]["name"] != self.name:
            return False
        return self.labels is None or self.labels.matches(obj)
