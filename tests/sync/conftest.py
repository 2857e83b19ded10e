"""Fixtures for the Kubernetes sync tests: a test API server with the CRD, clients, and peer sources that are
always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from kubernetes import client

from node_hook.cluster import KubernetesPeerSource, SyncSettings, api_client_for_url
from tests.support.peer_sink import RecordingSink
from tests.sync.helpers import CRD, FAST
from wgcni_lab.apiserver.server import ApiServer


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(crds=[CRD], bookmark_interval=0.2) as api_server:
        yield api_server




@pytest.fixture
def core(server) -> Iterator[client.CoreV1Api]:
    api_client = api_client_for_url(server.url)
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()




@pytest.fixture
def custom(core) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(core.api_client)




@pytest.fixture
def make_source(server) -> Iterator[Callable[..., tuple[KubernetesPeerSource, RecordingSink]]]:
    """Start peer sources (stopped at the end, whatever happens)."""
    started: list[tuple[KubernetesPeerSource, client.ApiClient]] = []

    def start(name: str, settings: SyncSettings = FAST) -> tuple[KubernetesPeerSource, RecordingSink]:
        api_client = api_client_for_url(server.url)
        source = KubernetesPeerSource(name, api_client, settings)
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
