"""Fixtures for the Kubernetes sync tests: a test API server with the CRD, clients, and peer sources that are
always stopped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from node_hook.cluster import KubernetesPeerSource, SyncSettings, api_client_for_url
from tests.support.peer_sink import RecordingSink
from tests.sync.helpers import CRD, FAST, RBAC
from wgcni_lab.apiserver.server import ApiServer


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(crds=[CRD], manifests=RBAC, bookmark_interval=0.2) as api_server:
        yield api_server


class Tokens:
    """What the kubelet does for wgcni's pod on a node: a service-account token file, bound to the node's Node
    when it exists (then the admission policy's node name is there), rewritten by `write` (a rotation)."""

    def __init__(self, server: ApiServer, directory: Path):
        self.server, self.directory = server, directory

    def write(self, name: str, ttl: float = 3600.0) -> Path:
        path = self.directory / f"{name}.token"
        try:
            token = self.server.node_token(name, ttl)
        except ValueError:  # no Node (yet): a token of the service account alone
            token = self.server.authenticator.service_account_token("kube-system", "wgcni-node", ttl=ttl)
        path.write_text(token)
        path.chmod(0o600)
        return path


@pytest.fixture
def tokens(server, tmp_path) -> Tokens:
    return Tokens(server, tmp_path)


@pytest.fixture
def core(server) -> Iterator[client.CoreV1Api]:
    api_client = api_client_for_url(server.url, server.admin_token, ca_file=server.ca_file)
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()




@pytest.fixture
def custom(core) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(core.api_client)




@pytest.fixture
def make_source(server, tokens) -> Iterator[Callable[..., tuple[KubernetesPeerSource, RecordingSink]]]:
    """Start peer sources, each with its node's token file (stopped at the end, whatever happens)."""
    started: list[tuple[KubernetesPeerSource, client.ApiClient]] = []

    def start(name: str, settings: SyncSettings = FAST,
              clock: Callable[[], float] = time.time) -> tuple[KubernetesPeerSource, RecordingSink]:
        api_client = api_client_for_url(server.url, token_file=tokens.write(name), ca_file=server.ca_file)
        source = KubernetesPeerSource(name, api_client, settings, clock)
        recorder = RecordingSink()
        started.append((source, api_client))
        source.start(recorder)
        return source, recorder

    try:
        yield start
    finally:
        for source, api_client in started:
            source.stop()
            api_client.close()
