"""A small CRI v1 client: drives a containerd's CRI plugin the way kubelet does (RunPodSandbox & co).

No CRI client or `api.proto` is packaged here, but the containerd binary carries the CRI v1 API's serialized
`FileDescriptorProto` (gzipped, as gogo/protobuf registers it). `cri_descriptor()` finds it in the binary,
drops the gogoproto options and import (they only steer Go code generation and do not change the wire
format), and the client builds its message classes from it at run time with protobuf's descriptor pool —
so the messages always match the runtime under test and nothing is hand-written. Extraction reads the
binary once per process.

Only the calls the lab and the runtime tests need are wrapped: Version, Status, RunPodSandbox, StopPodSandbox,
RemovePodSandbox, ListPodSandbox, PodSandboxStatus, and for the DaemonSet's containers (wgcni_lab.kubelet)
CreateContainer, StartContainer, StopContainer, RemoveContainer and ContainerStatus. Failures raise `CriError` carrying
the method, the gRPC status code and containerd's message.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

CRI_PACKAGE = "runtime.v1"
RUNTIME_SERVICE = f"{CRI_PACKAGE}.RuntimeService"
DEFAULT_CONTAINERD_BINARY = Path("/usr/bin/containerd")

_GZIP_MAGIC = b"\x1f\x8b\x08"
# An embedded descriptor is small; bound each decompression attempt so a false gzip match stays cheap.
_MAX_DESCRIPTOR_BYTES = 4 << 20


class CriError(RuntimeError):
    """A CRI call failed; `code` is the gRPC status code, `details` containerd's message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"CRI {method} failed ({code.name}): {details}")
        self.method = method
        self.code = code
        self.details = details


class DescriptorNotFound(RuntimeError):
    """The binary does not embed the CRI v1 API descriptor."""


@dataclass(frozen=True)
class PortMapping:
    """A pod port mapping, passed to the CNI chain as `runtimeConfig.portMappings`."""

    container_port: int
    host_port: int
    protocol: str = "TCP"
    host_ip: str = ""


@dataclass(frozen=True)
class SandboxSummary:
    """One entry of ListPodSandbox."""

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxStatus:
    """PodSandboxStatus, with the runtime's verbose details that the lab needs.

    `pid` is the sandbox (pause) process as seen from the runtime's PID namespace, so `/proc/<pid>/ns/net`
    reaches the pod's network namespace from any mount namespace; `netns_path` is where containerd mounted
    it (only visible inside the runtime's mount namespace). Once the sandbox is stopped, `pid` is 0 and `ip` is
    empty.
    """

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str
    ip: str
    additional_ips: tuple[str, ...]
    pid: int
    netns_path: str
    created_at_ns: int


@dataclass(frozen=True)
class ContainerInfo:
    """ContainerStatus as the lab's kubelet reads it; `pid` is the container's first process (0 once it exited),
    times are Unix nanoseconds (0: not yet)."""

    id: str
    name: str
    attempt: int
    state: str  # CONTAINER_CREATED | CONTAINER_RUNNING | CONTAINER_EXITED | CONTAINER_UNKNOWN
    exit_code: int
    reason: str
    message: str
    pid: int
    started_at_ns: int
    finished_at_ns: int


@functools.lru_cache(maxsize=4)
def _descriptor_from(binary: str, size: int, mtime_ns: int) -> bytes:
    data = Path(binary).read_bytes()
    position = data.find(_GZIP_MAGIC)
    while position >= 0:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            raw = inflater.decompress(data[position : position + _MAX_DESCRIPTOR_BYTES])
        except zlib.error:
            raw = b""
        if raw and inflater.eof:
            try:
                candidate = descriptor_pb2.FileDescriptorProto.FromString(raw)
            except message.DecodeError:  # some other gzipped data
                candidate = None
            if candidate is not None and candidate.package == CRI_PACKAGE and candidate.service:
                return _without_gogo(candidate).SerializeToString()
        position = data.find(_GZIP_MAGIC, position + 1)
    raise DescriptorNotFound(f"{binary} embeds no {CRI_PACKAGE} API descriptor (is it containerd >= 1.5?)")


def cri_descriptor(binary: Path = DEFAULT_CONTAINERD_BINARY) -> descriptor_pb2.FileDescriptorProto:
    """The CRI v1 API descriptor embedded in `binary`, without gogoproto options or imports."""
    stat = os.stat(binary)
    return descriptor_pb2.FileDescriptorProto.FromString(
        _descriptor_from(str(binary), stat.st_size, stat.st_mtime_ns)
    )


def _without_gogo(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop the gogoproto import and options: Go code-generation hints that do not change the wire format.

    Parsed without gogo.proto's extensions registered, those options are unknown fields; standard options
    (such as `map_entry`) are kept.
    """
    stripped = descriptor_pb2.FileDescriptorProto()
    stripped.CopyFrom(proto)
    kept = [dep for dep in stripped.dependency if "gogo" not in dep]
    del stripped.dependency[:]
    stripped.dependency.extend(kept)
    del stripped.public_dependency[:]
    del stripped.weak_dependency[:]
    stripped.DiscardUnknownFields()
    return stripped


class _CriMessages:
    """Message classes and method paths built from the descriptor."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._pool.Add(proto)

    # Message classes are generated at run time from the descriptor: protobuf types them as nothing more than `type`.
    def cls(self, name: str) -> Any:
        return message_factory.GetMessageClass(self._pool.FindMessageTypeByName(f"{CRI_PACKAGE}.{name}"))

    def method(self, service: str, name: str) -> tuple[str, Any, Any]:
        method = self._pool.FindServiceByName(service).FindMethodByName(name)
        return (
            f"/{service}/{name}",
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )


@functools.lru_cache(maxsize=4)
def _messages(binary: str) -> _CriMessages:
    return _CriMessages(cri_descriptor(Path(binary)))


class CriClient:
    """A CRI v1 RuntimeService client over containerd's Unix socket."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        containerd_binary: Path = DEFAULT_CONTAINERD_BINARY,
    ) -> None:
        self._messages = _messages(str(containerd_binary))
        self._timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}")
        self._calls: dict[str, tuple[Any, type]] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, name: str, timeout: float | None = None, **request: Any) -> Any:
        if name not in self._calls:
            path, request_cls, response_cls = self._messages.method(RUNTIME_SERVICE, name)
            stub = self._channel.unary_unary(
                path,
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            self._calls[name] = (stub, request_cls)
        stub, request_cls = self._calls[name]
        try:
            return stub(request_cls(**request), timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise CriError(name, error.code(), error.details() or "") from None

    def version(self, timeout: float | None = None) -> dict[str, str]:
        """Runtime name/version and the CRI API version it serves."""
        answer = self._call("Version", timeout=timeout, version="v1")
        return {
            "version": answer.version,
            "runtime_name": answer.runtime_name,
            "runtime_version": answer.runtime_version,
            "runtime_api_version": answer.runtime_api_version,
        }

    def status(self, verbose: bool = False) -> dict[str, Any]:
        """Runtime conditions by type (`RuntimeReady`, `NetworkReady`) and, if verbose, the parsed info."""
        answer = self._call("Status", verbose=verbose)
        conditions = {
            condition.type: {"status": condition.status, "reason": condition.reason, "message": condition.message}
            for condition in answer.status.conditions
        }
        return {"conditions": conditions, "info": {key: _maybe_json(value) for key, value in answer.info.items()}}

    def run_pod_sandbox(
        self,
        *,
        name: str,
        namespace: str,
        uid: str,
        attempt: int = 0,
        hostname: str = "",
        log_directory: str = "",
        port_mappings: Iterable[PortMapping] = (),
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        cgroup_parent: str = "",
        sysctls: Mapping[str, str] | None = None,
        runtime_handler: str = "",
        host_network: bool = False,
    ) -> str:
        """Create and start a pod sandbox (this runs the CNI ADD chain, unless `host_network`: then the sandbox
        shares the runtime's network namespace, NamespaceMode NODE, and no CNI plugin is called); returns the
        sandbox id."""
        config = self.sandbox_config(name=name, namespace=namespace, uid=uid, attempt=attempt, hostname=hostname,
                                     log_directory=log_directory, port_mappings=port_mappings, labels=labels,
                                     annotations=annotations, cgroup_parent=cgroup_parent, sysctls=sysctls,
                                     host_network=host_network)
        return self.run_sandbox(config, runtime_handler)

    def run_sandbox(self, config: Mapping[str, Any], runtime_handler: str = "") -> str:
        """RunPodSandbox of a PodSandboxConfig made by sandbox_config; returns the sandbox id."""
        return str(self._call("RunPodSandbox", config=dict(config), runtime_handler=runtime_handler).pod_sandbox_id)

    def sandbox_config(
        self,
        *,
        name: str,
        namespace: str,
        uid: str,
        attempt: int = 0,
        hostname: str = "",
        log_directory: str = "",
        port_mappings: Iterable[PortMapping] = (),
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        cgroup_parent: str = "",
        sysctls: Mapping[str, str] | None = None,
        host_network: bool = False,
        privileged: bool = False,
    ) -> dict[str, Any]:
        """The PodSandboxConfig of run_pod_sandbox (CreateContainer is given it again); `privileged`: the sandbox
        may hold privileged containers (kubelet sets it when one of the pod's containers is)."""
        protocol = self._messages.cls("PortMapping").DESCRIPTOR.fields_by_name["protocol"].enum_type
        config: dict[str, Any] = {
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "attempt": attempt},
            "hostname": "" if host_network else hostname or name,  # runc cannot set it in the node's UTS namespace
            "log_directory": log_directory,
            "port_mappings": [
                {
                    "protocol": protocol.values_by_name[mapping.protocol.upper()].number,
                    "container_port": mapping.container_port,
                    "host_port": mapping.host_port,
                    "host_ip": mapping.host_ip,
                }
                for mapping in port_mappings
            ],
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "linux": {"cgroup_parent": cgroup_parent, "sysctls": dict(sysctls or {})},
        }
        security: dict[str, Any] = {"privileged": privileged}
        if host_network:
            security["namespace_options"] = {"network": self.namespace_mode("NODE")}
        config["linux"]["security_context"] = security
        return config

    def namespace_mode(self, name: str) -> int:
        """A NamespaceMode (POD, CONTAINER, NODE, TARGET) by name."""
        modes = self._messages.cls("NamespaceOption").DESCRIPTOR.fields_by_name["network"].enum_type
        return int(modes.values_by_name[name].number)

    # ---- containers ------------------------------------------------------------------------------------------------

    def create_container(self, sandbox_id: str, config: Mapping[str, Any], sandbox_config: Mapping[str, Any]) -> str:
        """CreateContainer in the sandbox from a ContainerConfig (as a dict of its fields); returns its id."""
        answer = self._call("CreateContainer", pod_sandbox_id=sandbox_id, config=dict(config),
                            sandbox_config=dict(sandbox_config))
        return answer.container_id

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", container_id=container_id)

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds (0: SIGKILL at once)."""
        self._call("StopContainer", container_id=container_id, timeout=timeout)

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", container_id=container_id)

    def container_status(self, container_id: str) -> ContainerInfo:
        answer = self._call("ContainerStatus", container_id=container_id, verbose=True)
        status = answer.status
        info = _maybe_json(answer.info.get("info", "{}"))
        info = info if isinstance(info, dict) else {}
        enum = self._messages.cls("ContainerStatus").DESCRIPTOR.fields_by_name["state"].enum_type
        return ContainerInfo(
            id=status.id, name=status.metadata.name, attempt=status.metadata.attempt,
            state=enum.values_by_number[status.state].name, exit_code=status.exit_code, reason=status.reason,
            message=status.message, pid=int(info.get("pid") or 0), started_at_ns=status.started_at,
            finished_at_ns=status.finished_at,
        )

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        """Stop the sandbox's processes and tear down its network (CNI DEL with the netns)."""
        self._call("StopPodSandbox", pod_sandbox_id=sandbox_id)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        """Remove a stopped sandbox (containerd 1.6 runs CNI DEL once more, with an empty netns)."""
        self._call("RemovePodSandbox", pod_sandbox_id=sandbox_id)

    def list_pod_sandboxes(self, labels: Mapping[str, str] | None = None) -> list[SandboxSummary]:
        request: dict[str, Any] = {}
        if labels:
            request["filter"] = {"label_selector": dict(labels)}
        answer = self._call("ListPodSandbox", **request)
        state_names = self._state_names()
        return [
            SandboxSummary(
                id=item.id,
                name=item.metadata.name,
                namespace=item.metadata.namespace,
                uid=item.metadata.uid,
                attempt=item.metadata.attempt,
                state=state_names[item.state],
                labels=dict(item.labels),
            )
            for item in answer.items
        ]

    def pod_sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        answer = self._call("PodSandboxStatus", pod_sandbox_id=sandbox_id, verbose=True)
        status = answer.status
        info = _maybe_json(answer.info.get("info", "{}"))
        info = info if isinstance(info, dict) else {}
        netns_path = ""
        for namespace in ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []:
            if namespace.get("type") == "network":
                netns_path = namespace.get("path", "")
        return SandboxStatus(
            id=status.id,
            name=status.metadata.name,
            namespace=status.metadata.namespace,
            uid=status.metadata.uid,
            attempt=status.metadata.attempt,
            state=self._state_names()[status.state],
            ip=status.network.ip,
            additional_ips=tuple(extra.ip for extra in status.network.additional_ips),
            pid=int(info.get("pid") or 0),
            netns_path=netns_path,
            created_at_ns=status.created_at,
        )

    def _state_names(self) -> dict[int, str]:
        enum = self._messages.cls("PodSandboxStatus").DESCRIPTOR.fields_by_name["state"].enum_type
        return {value.number: value.name for value in enum.values}


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
