"""Validating admission: every ValidatingAdmissionPolicy the store holds, through its bindings, evaluated with a real
CEL engine (the `common-expression-language` package, `cel`) as the real server's admission plugin evaluates it:
matchConstraints (resourceRules: groups, versions, resources with subresources, operations, resourceNames;
excludeResourceRules), the binding's matchResources, matchConditions, variables (`variables.<name>`), validations
with message / messageExpression and reason, failurePolicy (an expression that fails to compile or evaluate denies
under Fail, is skipped under Ignore) and validationActions (Deny refuses; Warn and Audit let the write through).

The CEL variables are the real ones: `object`, `oldObject` (null on CREATE; `object` is null on DELETE), `request`
(kind, resource, subResource, name, namespace, operation, userInfo with extra, dryRun), `params` (null: no policy
here has a paramKind) and `namespaceObject`. Not available: the Kubernetes CEL library (`authorizer`, `quantity()`,
`ip()`, `cidr()`, `url()`, `isSorted()`), the cel-go extensions Kubernetes enables (strings: `join`, `split`,
`lowerAscii`, `substring`, `replace`, `format`; `sets.*`; `math.*`; list `sort`), the optional syntax `a.?b` (the
`cel` parser rejects it; `optional.of()` exists) and namespaceSelector / objectSelector. conf/rbac.yaml's policy
uses none of them (standard CEL: `has`, `in`, `all`, `exists`, ternaries, map and list equality). A policy using
one of them fails to compile, which under failurePolicy Fail denies every matching request with the compile error:
loud, never silently allowed.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from typing import Any

import cel

from wgcni_lab.apiserver.auth import UserInfo
from wgcni_lab.apiserver.errors import ApiError
from wgcni_lab.apiserver.resources import JSON, ResourceType
from wgcni_lab.apiserver.store import Store

log = logging.getLogger(__name__)

ADMISSION_GROUP = "admissionregistration.k8s.io"
_VARIABLE_REFERENCE = re.compile(r"\bvariables\.([A-Za-z_][A-Za-z0-9_]*)")
REASON_CODES = {"Unauthorized": 401, "Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413}


class _Programs:
    """Compiled CEL programs by expression (compiling is the expensive part)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._programs: dict[str, Any] = {}

    def evaluate(self, expression: str, context: JSON) -> Any:
        with self._lock:
            program = self._programs.get(expression)
            if program is None:
                program = self._programs[expression] = cel.compile(expression)
        return program.execute(context)


def _rule_matches(rule: JSON, rtype: ResourceType, subresource: str | None, operation: str, name: str) -> bool:
    def listed(values: list[str] | None, value: str) -> bool:
        return values is not None and ("*" in values or value in values)

    resource = f"{rtype.plural}/{subresource}" if subresource else rtype.plural
    resources = rule.get("resources") or []
    resource_listed = ("*" in resources or resource in resources
                       or (subresource is not None and (f"*/{subresource}" in resources
                                                        or f"{rtype.plural}/*" in resources)))
    names = rule.get("resourceNames") or []
    return (listed(rule.get("apiGroups"), rtype.group) and listed(rule.get("apiVersions"), rtype.version)
            and resource_listed and listed(rule.get("operations"), operation)
            and (not names or name in names))


def _matches(constraints: JSON | None, rtype: ResourceType, subresource: str | None, operation: str,
             name: str) -> bool:
    if not constraints:
        return True
    if any(_rule_matches(rule, rtype, subresource, operation, name)
           for rule in constraints.get("excludeResourceRules") or []):
        return False
    return any(_rule_matches(rule, rtype, subresource, operation, name)
               for rule in constraints.get("resourceRules") or [])


class Admission:
    """The ValidatingAdmissionPolicies of one store; `admit(...)` is the store's Admit for one request."""

    def __init__(self, store: Store):
        self.store = store
        self.programs = _Programs()
        self.denials = 0  # requests refused by a policy, for tests and the server's report

    def context(self, user: UserInfo, rtype: ResourceType, subresource: str | None, operation: str,
                old: JSON | None, new: JSON | None, dry_run: bool) -> JSON:
        metadata = (new or old or {}).get("metadata") or {}
        namespace = metadata.get("namespace", "")
        namespace_object = None
        if namespace:
            found = self.store.find(self.store.type_of("namespaces"), namespace)
            namespace_object = copy.deepcopy(found) if found else None
        return {
            "object": new if operation != "DELETE" else None,
            "oldObject": old if operation != "CREATE" else None,
            "params": None,
            "namespaceObject": namespace_object,
            "request": {
                "uid": "", "operation": operation, "name": metadata.get("name", ""), "namespace": namespace,
                "kind": {"group": rtype.group, "version": rtype.version, "kind": rtype.kind},
                "resource": {"group": rtype.group, "version": rtype.version, "resource": rtype.plural},
                "subResource": subresource or "", "userInfo": user.as_cel(), "dryRun": dry_run,
            },
        }

    def admit(self, user: UserInfo, operation: str, rtype: ResourceType, old: JSON | None, new: JSON,
              subresource: str | None, dry_run: bool = False) -> None:
        """Must hold the store lock. Raise the real server's error when a binding's policy denies the request."""
        name = ((new or old or {}).get("metadata") or {}).get("name", "")
        policies = {obj["metadata"]["name"]: obj for obj in self.store.items_of(
            f"validatingadmissionpolicies.{ADMISSION_GROUP}")}
        bindings = sorted(self.store.items_of(f"validatingadmissionpolicybindings.{ADMISSION_GROUP}"),
                          key=lambda obj: obj["metadata"]["name"])
        context: JSON | None = None
        for binding in bindings:
            spec = binding.get("spec") or {}
            policy = policies.get(spec.get("policyName", ""))
            if policy is None:
                continue
            policy_spec = policy.get("spec") or {}
            if not _matches(policy_spec.get("matchConstraints"), rtype, subresource, operation, name):
                continue
            if spec.get("matchResources") and not _matches(spec["matchResources"], rtype, subresource, operation,
                                                           name):
                continue
            if context is None:
                context = self.context(user, rtype, subresource, operation, copy.deepcopy(old), copy.deepcopy(new),
                                       dry_run)
            failure = self._evaluate(policy, context)
            if failure is None:
                continue
            reason, message = failure
            actions = spec.get("validationActions") or []
            text = (f"ValidatingAdmissionPolicy '{policy['metadata']['name']}' with binding "
                    f"'{binding['metadata']['name']}' denied request: {message}")
            if "Deny" not in actions:
                log.info("admission (%s, not denied): %s", ",".join(actions) or "no action", text)
                continue
            self.denials += 1
            raise ApiError(REASON_CODES.get(reason, 422), reason, text)

    def _evaluate(self, policy: JSON, context: JSON) -> tuple[str, str] | None:
        """None when the request passes the policy, else (reason, message)."""
        spec = policy.get("spec") or {}
        fail_closed = spec.get("failurePolicy", "Fail") == "Fail"
        try:
            for condition in spec.get("matchConditions") or []:
                if self.programs.evaluate(condition["expression"], context) is not True:
                    return None
            definitions = {variable["name"]: variable["expression"] for variable in spec.get("variables") or []}
            values: JSON = {}
            context = {**context, "variables": values}

            def resolve(expression: str, resolving: tuple[str, ...] = ()) -> None:
                """Variables are evaluated lazily, as the real server does, per expression: those it names are
                evaluated before it (the real server waits until a branch reaches one: a variable here must not
                fail where the expression's own guards would have kept it from being evaluated)."""
                for name in _VARIABLE_REFERENCE.findall(expression):
                    if name in values or name not in definitions:
                        continue
                    if name in resolving:
                        raise ValueError(f"variable {name!r} refers to itself")
                    resolve(definitions[name], resolving + (name,))
                    values[name] = self.programs.evaluate(definitions[name], context)

            for validation in spec.get("validations") or []:
                expression = validation["expression"]
                try:
                    resolve(expression)
                    passed = self.programs.evaluate(expression, context) is True
                except Exception as error:  # noqa: BLE001 - the CEL engine raises many types
                    if not fail_closed:
                        continue
                    return "Invalid", (f"expression '{expression.strip()}' could not be evaluated: "
                                       f"{type(error).__name__}: {error}")
                if passed:
                    continue
                message = validation.get("message") or f"failed expression: {validation['expression'].strip()}"
                if validation.get("messageExpression"):
                    try:
                        resolve(validation["messageExpression"])
                        message = str(self.programs.evaluate(validation["messageExpression"], context))
                    except Exception:  # noqa: BLE001 - the CEL engine raises many types
                        pass  # the static message stands, as the real server falls back to it
                return validation.get("reason") or "Invalid", message
        except Exception as error:  # noqa: BLE001 - compile and runtime errors of the CEL engine come in many types
            if not fail_closed:
                return None
            return "Invalid", f"expression could not be evaluated: {type(error).__name__}: {error}"
        return None
