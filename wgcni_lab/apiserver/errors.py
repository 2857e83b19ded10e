"""Errors answered as Kubernetes Status objects, and the NotFound / Conflict / Gone ones the store raises."""

from __future__ import annotations

from wgcni_lab.apiserver.resources import JSON, ResourceType


class ApiError(Exception):
    """An error answered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified_name} "{name}" not found',
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409, "Conflict",
        f'Operation cannot be fulfilled on {rtype.qualified_name} "{name}": {why}',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def gone(resource_version: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {resource_version}")
