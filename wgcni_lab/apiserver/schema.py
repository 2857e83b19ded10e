"""A custom resource's structural schema (the CRD version's openAPIV3Schema) as the real server applies it to every
create and update: unknown fields are pruned (or refused with `fieldValidation=Strict`, which kubectl sends), then
the object is validated (types, enum, pattern, lengths, bounds, item counts, required, date-time formats) by the
`jsonschema` library, and list-type=map keys must be unique. Errors are 422s worded as the real server words them:
`WireguardNode.wgcni.io "node-a" is invalid: status.endpoint.port: Invalid value: 70000: ...`."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

import jsonschema

from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import JSON, ResourceType

# Fields of every object that a CRD schema neither prunes nor validates beyond their own type (the real server
# validates metadata as ObjectMeta).
_ROOT_KEPT = ("apiVersion", "kind", "metadata")
_KUBERNETES_KEYWORDS = ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-preserve-unknown-fields",
                        "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource", "nullable")


def prune(value: Any, schema: JSON, path: str = "", pruned: list[str] | None = None, root: bool = True) -> Any:
    """`value` without the fields `schema` does not specify; their paths are appended to `pruned`."""
    pruned = [] if pruned is None else pruned
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and schema.get("type") in ("object", None):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if root and key in _ROOT_KEPT:
                result[key] = item
            elif properties is not None and key in properties:
                result[key] = prune(item, properties[key], child, pruned, False)
            elif isinstance(additional, dict):
                result[key] = prune(item, additional, child, pruned, False)
            elif properties is None and additional is None and not root:
                pruned.append(child)  # an object without properties keeps nothing (structural schemas)
            else:
                pruned.append(child)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], f"{path}[{index}]", pruned, False) for index, item in enumerate(value)]
    return value


def _json_schema(schema: JSON) -> JSON:
    """The OpenAPI v3 schema as JSON Schema: Kubernetes' own keywords dropped (checked separately)."""
    converted = {key: value for key, value in schema.items() if key not in _KUBERNETES_KEYWORDS}
    for key in ("properties", "patternProperties"):
        if key in converted:
            converted[key] = {name: _json_schema(child) for name, child in converted[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(converted.get(key), dict):
            converted[key] = _json_schema(converted[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in converted:
            converted[key] = [_json_schema(child) for child in converted[key]]
    if schema.get("nullable") and "type" in converted:
        converted["type"] = [converted["type"], "null"]
    return converted


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """RFC 3339 date-time, as the real server's strfmt checks it (jsonschema's needs an extra package)."""
    if not isinstance(value, str):
        return True
    if "T" not in value.upper() or not (value.upper().endswith("Z") or value[-6] in "+-"):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


def _path(error: jsonschema.ValidationError) -> str:
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _list_map_errors(value: Any, schema: JSON, path: str, errors: list[str]) -> None:
    if isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = set()
            for index, item in enumerate(value):
                identity = tuple((item or {}).get(key) for key in keys) if isinstance(item, dict) else (item,)
                if identity in seen:
                    errors.append(f"{path}[{index}]: Duplicate value: {dict(zip(keys, identity, strict=True))}")
                seen.add(identity)
        for index, item in enumerate(value):
            if isinstance(schema.get("items"), dict):
                _list_map_errors(item, schema["items"], f"{path}[{index}]", errors)
    elif isinstance(value, dict):
        for key, item in value.items():
            child = (schema.get("properties") or {}).get(key)
            if child is not None:
                _list_map_errors(item, child, f"{path}.{key}" if path else key, errors)


class CustomResourceSchema:
    """One served version's schema, compiled once."""

    def __init__(self, schema: JSON):
        self.schema = schema
        body = {key: value for key, value in schema.items() if key != "properties"}
        body["properties"] = {key: value for key, value in (schema.get("properties") or {}).items()
                              if key not in _ROOT_KEPT}
        converted = _json_schema(body)
        validator_class = jsonschema.validators.validator_for(converted, default=jsonschema.Draft7Validator)
        self.validator = validator_class(converted, format_checker=_FORMATS)

    def admit(self, rtype: ResourceType, obj: JSON, field_validation: str) -> JSON:
        """The object pruned; raises 422 for an invalid one, or for unknown fields under Strict."""
        pruned: list[str] = []
        result = prune(copy.deepcopy(obj), self.schema, pruned=pruned)
        name = (obj.get("metadata") or {}).get("name", "")
        if pruned and field_validation == "Strict":
            raise ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(
                f'unknown field "{path}"' for path in pruned))
        errors = []
        for error in sorted(self.validator.iter_errors(result), key=lambda error: list(error.absolute_path)):
            path = _path(error) or "<root>"
            errors.append(f"{path}: Invalid value: {error.instance!r}: {path} in body {error.message}")
        _list_map_errors(result, self.schema, "", errors)
        if errors:
            raise ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + ", ".join(errors),
                           {"name": name, "group": rtype.group, "kind": rtype.kind,
                            "causes": [{"reason": "FieldValueInvalid", "message": text} for text in errors]})
        return result
