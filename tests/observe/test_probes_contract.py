"""The DaemonSet's probes (conf/daemonset.yaml) hit what the hook serves: the port is the ConfigMap's
metricsAddress port, and every probe path answers (200 or 503), never 404."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import yaml

from node_hook.config import settings_from_mapping
from tests.observe.conftest import Hook

REPO = Path(__file__).resolve().parents[2]


def hook_container() -> dict:
    daemonset = yaml.safe_load((REPO / "conf" / "daemonset.yaml").read_text())
    [container] = [c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "wgcni-node"]
    return container


def test_probe_port_is_the_configured_metrics_port() -> None:
    configmap = yaml.safe_load((REPO / "conf" / "configmap.yaml").read_text())
    settings = settings_from_mapping(yaml.safe_load(configmap["data"]["config.yaml"]))
    container = hook_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == int(settings.metrics_address.rpartition(":")[2])


def test_every_probe_path_is_served(hook: Hook) -> None:
    container = hook_container()
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"/healthz", "/readyz"}
    for path in paths:
        try:
            status = urllib.request.urlopen(hook.url + path, timeout=10).status
        except urllib.error.HTTPError as error:
            status = error.code
        assert status in (200, 503), path
