"""A full `wgcni-node run` in network namespaces (userspace backend, two nodes, real packets): the DaemonSet's
probes and the scrape work on `metricsAddress`, the CLI talks to the real hook, and no log line of the whole run
(JSON lines at debug level, and wireguard-go's own log) contains the private key in any encoding."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_hook.keys import load_existing
from wgcni_lab.harness.netns import PYTHON, REPO, in_ns
from wgcni_lab.harness.netns_lab import Lab, Node, running_lab
from wgcni_lab.harness.polling import wait_until

pytestmark = pytest.mark.netns

NODES = {"a": "10.240.0.4", "b": "10.240.0.35"}
PODS = {"a": ["10.240.0.12"], "b": ["10.240.0.70"]}
METRICS = "127.0.0.1:9820"
FETCH = f"""
import sys, urllib.request, urllib.error
try:
    response = urllib.request.urlopen("http://{METRICS}" + sys.argv[1], timeout=5)
    print(response.status); print(response.read().decode(), end="")
except urllib.error.HTTPError as error:
    print(error.code); print(error.read().decode(), end="")
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    def configure(lab: Lab) -> None:
        for node in lab.nodes.values():
            lab.write_config(node, metricsAddress=METRICS, logLevel="debug", logFormat="json")

    with running_lab(NODES, PODS, configure) as lab:
        yield lab


def fetch(node: Node, path: str) -> tuple[int, str]:
    result = node.exec(PYTHON, "-c", FETCH, path)
    status, _, body = result.stdout.partition("\n")
    return int(status), body


def wgcni(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cni_plugin.main", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), WGCNI_HOOK_SOCKET=str(node.socket)))


def test_probes_scrape_and_cli_against_the_real_hook(lab: Lab) -> None:
    a, b = lab.nodes["a"], lab.nodes["b"]
    pod_a = next(iter(a.pods.values()))
    assert in_ns(pod_a.netns, "ping", "-c", "1", "-W", "2", PODS["b"][0], check=False).returncode == 0
    assert fetch(a, "/healthz")[0] == 200
    ready = (200, "ok: dataplane programmed, peers synced, publication held by the API\n")
    wait_until(lambda: fetch(a, "/readyz") == ready, 10, what="readyz")
    status, text = fetch(a, "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("wgcni_peers", ())] == 1 and samples[("wgcni_ready", ())] == 1
    assert samples[("wgcni_peer_latest_handshake_seconds", (("peer", "b"),))] > 0  # the ping made one
    assert samples[("wgcni_peer_sent_bytes_total", (("peer", "b"),))] > 0
    assert samples[("wgcni_pod_convergence_seconds_count", ())] >= 1

    result = wgcni(a, "peers")
    assert result.returncode == 0, result.stderr
    assert "peer: b" in result.stdout and re.search(r"latest handshake: \d+ seconds? ago", result.stdout)
    assert "10.240.0.35/32 (node IP)" in result.stdout and "10.240.0.70/32 (1 pod)" in result.stdout
    status_json = json.loads(wgcni(a, "status", "--json").stdout)
    assert status_json["node"] == "a" and status_json["backend"] == "userspace" and status_json["ready"]
    check = wgcni(b, "check", "--json")
    answer = json.loads(check.stdout)
    dataplane = {"sync", "reconcile", "device", "mtu", "peers", "rules", "routes", "sysctls", "firewall",
                 "conflicts", "handshakes", "records"}
    assert [f for f in answer["findings"] if f["check"] in dataplane] == []
    assert check.returncode == (0 if not answer["findings"] else 1)  # the host's /etc/cni/net.d decides the rest


def test_no_log_line_of_the_run_holds_the_private_key(lab: Lab) -> None:
    secrets: dict[str, list[str]] = {}
    for name, node in lab.nodes.items():
        private = load_existing(node.state_dir / "private.key").private
        secrets[name] = [base64.b64encode(private).decode(), private.hex()]
    for node in lab.nodes.values():
        node.api("resync")
        node.stop_hook()  # the shutdown is logged too
    for name, node in lab.nodes.items():
        logs = [node.log_file] + sorted(node.state_dir.glob("*.log"))
        text = "".join(path.read_text(errors="replace") for path in logs)
        assert len(text.splitlines()) > 5, "the run logged (else this check would be vacuous)"
        for line in node.log_file.read_text().splitlines():
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= entry.keys()
        for secret in secrets[name]:
            assert secret not in text, f"node {name}: the private key appears in its logs"
