"""Helpers of the Kubernetes sync tests: the CRD, fast sync settings, keys, nodes and announcements (what a peer
source hands the hook is recorded by tests.support.peer_sink.RecordingSink)."""

from __future__ import annotations

import base64
import os
import pathlib

import yaml
from kubernetes import client

from node_hook.cluster import SyncSettings
from node_hook.model import LocalAnnouncement

CONF = pathlib.Path(__file__).parents[2] / "conf"
CRD = yaml.safe_load((CONF / "crd.yaml").read_text())
RBAC = [doc for doc in yaml.safe_load_all((CONF / "rbac.yaml").read_text()) if doc]  # RBAC and admission policy

# Short intervals for tests; writes at 10/s except where the production rate (2/s) is what is tested.
FAST = SyncSettings(max_writes_per_second=10.0, watch_timeout_seconds=5, request_timeout=2.0, watch_read_margin=2.0,
                    resync_interval=60.0, backoff_initial=0.05, backoff_max=0.4)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def create_node(core: client.CoreV1Api, name: str, labels: dict[str, str] | None = None) -> client.V1Node:
    return core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels)))


def announcement(name: str, key: str, pod_ips: set[str], endpoint: str = "10.240.0.4", ready: bool = True,
                 message: str = "programmed") -> LocalAnnouncement:
    return LocalAnnouncement(name=name, public_key=key, endpoint_ip=endpoint, endpoint_port=51820,
                             node_ips=frozenset({endpoint}), pod_ips=frozenset(pod_ips), mtu=1340, ready=ready,
                             message=message)
