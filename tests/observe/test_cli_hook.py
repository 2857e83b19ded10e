"""`wgcni status/peers/routes/pods/check` against a real hook daemon (appliers on fakes), human and --json forms;
`check`'s diagnoses each triggered by a real cause, and its exit codes."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from cni_plugin.cli_hook import annotate_allowed_ips, human_bytes, human_duration
from cni_plugin.notify import request
from tests.observe.conftest import Hook, key_of, remote


def mesh(hook: Hook) -> None:
    """node-a (this one) with pod web; node-b with two pods; node-c with one; all programmed."""
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}),
               remote("node-c", "C", "10.240.0.66", {"10.240.0.90"}))
    hook.add_pod("web", ["10.240.0.9"])
    hook.converged()


def test_status_human_and_json(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    code, out, _ = hook.cli("status", "--json", capsys=capsys)
    assert code == 0
    status = json.loads(out)
    assert status["node"] == "node-a" and status["ready"] is True and status["publicKey"] == hook.key.public_key
    assert status["counts"] == {"peers": 2, "remoteNodes": 2, "localPods": 1, "podRecords": 1, "podsWithoutRecord": 0,
                                "routes": 4}
    code, out, _ = hook.cli("status", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "node: node-a"
    labels = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[1:]}
    assert labels["state"].startswith("ready")
    assert labels["mtu"] == "1440 (underlay 1500 - 60 (WireGuard over IPv4) = 1440)"
    assert labels["routing"] == "rule 99: not fwmark 0x100000/0x100000 lookup 51820"
    assert labels["counts"] == "2 peers, 2 remote nodes, 1 local pod, 4 routes"
    assert labels["public key"].endswith(f"(fingerprint {status['keyFingerprint']})")
    values_start = {line.index(":") + 2 + len(line[line.index(":") + 1:]) - len(line[line.index(":") + 1:].lstrip())
                    for line in lines[1:]}
    assert len(values_start) == 1, "values are aligned in one column"


def test_peers_human_and_json_name_what_each_allowed_ip_is(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    device = hook.wg.device
    assert device is not None
    now = time.time()
    device.peers[key_of("B")] = replace(device.peers[key_of("B")], latest_handshake=now - 65, rx_bytes=2048,
                                        tx_bytes=5 * 1024 * 1024)
    code, out, _ = hook.cli("peers", "--json", capsys=capsys)
    assert code == 0
    answer = json.loads(out)
    assert answer["total"] == 2 and answer["summary"]["programmed"] == 2 and answer["summary"]["handshakeRecent"] == 1
    peer_b = answer["peers"][0]
    assert peer_b["node"] == "node-b" and peer_b["endpoint"] == "10.240.0.35:51820" and peer_b["rxBytes"] == 2048
    assert peer_b["allowedIPs"] == [{"prefix": "10.240.0.35/32", "pods": 0, "nodeIPs": ["10.240.0.35"]},
                                    {"prefix": "10.240.0.70/31", "pods": 2, "nodeIPs": []}]
    code, out, _ = hook.cli("peers", capsys=capsys)
    assert code == 0
    assert out.splitlines()[0] == ("2 peers: 2 programmed, 1 with a handshake in the last 3 minutes, 1 never")
    block = out.split("\n\n")[1].splitlines()
    assert block[0] == "peer: node-b"
    assert block[1:] == [
        f"  public key:       {key_of('B')}",
        "  endpoint:         10.240.0.35:51820",
        "  allowed ips:      10.240.0.35/32 (node IP), 10.240.0.70/31 (2 pods)",
        "  latest handshake: 1 minute, 5 seconds ago",
        "  transfer:         2.00 KiB received, 5.00 MiB sent",
        "  state:            programmed",
    ]
    assert "latest handshake: never" in out.split("\n\n")[2]


def test_peers_paging_and_node_filter(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    code, out, _ = hook.cli("peers", "--limit", "1", capsys=capsys)
    assert code == 0 and "peer: node-b" in out and "peer: node-c" not in out
    assert out.rstrip().endswith("... 1 more peer: --offset 1, or --all")
    code, out, _ = hook.cli("peers", "--limit", "1", "--offset", "1", "--json", capsys=capsys)
    assert [peer["node"] for peer in json.loads(out)["peers"]] == ["node-c"]
    code, out, _ = hook.cli("peers", "--node", "node-c", "--json", capsys=capsys)
    assert [peer["node"] for peer in json.loads(out)["peers"]] == ["node-c"] and json.loads(out)["total"] == 1
    code, out, _ = hook.cli("peers", "--all", "--json", capsys=capsys)
    assert [peer["node"] for peer in json.loads(out)["peers"]] == ["node-b", "node-c"]


def test_routes_human_and_json_name_the_local_pod(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    code, out, _ = hook.cli("routes", "--json", capsys=capsys)
    assert code == 0
    answer = json.loads(out)
    assert answer["byKind"] == {"dev": 3, "throw": 1} and answer["total"] == 4  # host encryption off
    assert answer["routes"][0] == {"prefix": "10.240.0.9/32", "kind": "throw", "owner": "local", "pod": "shop/web"}
    assert {"prefix": "10.240.0.70/32", "kind": "dev", "owner": "node-b", "pod": None} in answer["routes"]
    code, out, _ = hook.cli("routes", "--owner", "node-c", capsys=capsys)
    assert code == 0
    assert out.splitlines() == [
        "4 routes: 3 into WireGuard (dev), 1 leave the table (throw); 1 owned by node-c",
        "PREFIX          KIND  OWNER   POD",
        "10.240.0.90/32  dev   node-c  -",
    ]


def test_routes_pages_end_at_owner_groups_and_continue_after_them(hook: Hook,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    code, out, _ = hook.cli("routes", "--limit", "2", capsys=capsys)
    assert code == 0
    assert out.splitlines()[2:] == [  # the local group (1 route) is not enough: node-b's whole group follows
        "10.240.0.9/32   throw  local   shop/web",
        "10.240.0.70/32  dev    node-b  -",
        "10.240.0.71/32  dev    node-b  -",
        "... more routes: --after node-b, or --all",
    ]
    code, out, _ = hook.cli("routes", "--limit", "2", "--after", "node-b", "--json", capsys=capsys)
    answer = json.loads(out)
    assert [route["prefix"] for route in answer["routes"]] == ["10.240.0.90/32"] and answer["next"] is None
    code, out, _ = hook.cli("routes", "--limit", "1", "--all", "--json", capsys=capsys)
    assert len(json.loads(out)["routes"]) == json.loads(out)["total"] == 4
    code, out, _ = hook.cli("routes", "--limit", "1", "--all", capsys=capsys)
    assert len(out.splitlines()) == 1 + 1 + 4 and "more routes" not in out


def test_pods_show_the_programmed_state_when_the_hook_answers(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    # stop the safety-net rescans (after the one already scheduled), so a new record stays unseen until notified
    hook.engine.settings = replace(hook.engine.settings, record_rescan_interval=3600)
    since = time.monotonic()
    generation = hook.engine.generation
    hook.settle(lambda: time.monotonic() - since > 2 * hook.settings.record_rescan_interval
                and hook.engine.generation > generation)
    with hook.store.lock():
        record = hook.store.read("azure", "c-web", "eth0")
        assert record is not None
        hook.store.write(dict(record, containerID="c-late", podName="late", ips=["10.240.0.10"]))
    code, out, _ = hook.cli("pods", "--state-dir", str(hook.settings.state_dir), "--json", capsys=capsys)
    assert code == 0
    assert {row["podName"]: row["programmed"] for row in json.loads(out)} == {"web": True, "late": False}
    code, out, _ = hook.cli("pods", "--state-dir", str(hook.settings.state_dir), capsys=capsys)
    header, *rows = out.splitlines()
    assert header.split()[-1] == "PROGRAMMED" and sorted(row.split()[-1] for row in rows) == ["NO", "yes"]
    hook.engine.pod_changed("azure", "c-late", "eth0", wait=5)  # the plugin's notification
    hook.settle(lambda: hook.view.check(["10.240.0.10"])["programmed"])
    code, out, _ = hook.cli("pods", "--state-dir", str(hook.settings.state_dir), "--json", capsys=capsys)
    assert {row["podName"]: row["programmed"] for row in json.loads(out)} == {"web": True, "late": True}


def test_pods_lists_pods_without_a_record_with_their_source(hook: Hook,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    _pod_without_record(hook)
    code, out, _ = hook.cli("pods", "--state-dir", str(hook.settings.state_dir), "--json", capsys=capsys)
    assert code == 0
    rows = {tuple(row["ips"]): row for row in json.loads(out)}
    assert rows[("10.240.0.13",)]["sources"] == ["route"] and rows[("10.240.0.13",)]["network"] is None
    assert rows[("10.240.0.13",)]["hostInterface"] == "azv0123456789a" and rows[("10.240.0.13",)]["programmed"]
    assert all(row["sources"] == ["record"] for ips, row in rows.items() if ips != ("10.240.0.13",))
    code, out, err = hook.cli("pods", "--state-dir", str(hook.settings.state_dir), capsys=capsys)
    header, *lines = out.splitlines()
    assert header.split()[-2:] == ["SOURCE", "PROGRAMMED"]
    assert any("route only (azv0123456789a)" in line and "10.240.0.13" in line for line in lines)
    assert "1 pod(s) have no pod record" in err
    code, out, _ = hook.cli("status", capsys=capsys)
    assert "(1 without a pod record)" in out


def test_hook_down_is_one_line_and_check_exits_2(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    hook.api.stop()
    code, out, err = hook.cli("status", capsys=capsys)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "the hook is not answering" in err and "does not exist" in err
    code, out, _ = hook.cli("check", capsys=capsys)
    assert code == 2
    assert out.startswith("FAIL hook: the hook is not answering") and "-> is wgcni-node running" in out
    assert len(out.splitlines()) == 1 and out.count("wgcni-node running") == 1
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    answer = json.loads(out)
    assert code == 2 and answer["exitCode"] == 2 and answer["ok"] is False
    assert [finding["check"] for finding in answer["findings"]] == ["hook"]
    hook.api.start()  # the fixture stops it again


def test_check_passes_on_a_healthy_node(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    mesh(hook)
    code, out, _ = hook.cli("check", capsys=capsys)
    assert code == 0, out
    assert out.startswith("ok: 15 checks passed (sync, publication, reconcile, device, mtu, peers, rules, routes, "
                          "sysctls")
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    assert code == 0 and json.loads(out) == {"exitCode": 0, "ok": True, "findings": [],
                                             "checks": json.loads(out)["checks"]}


def _drop_rule(hook: Hook) -> None:
    hook.routing.rules.discard(next(rule for rule in hook.routing.rules if rule.family == 4))


def _drop_route(hook: Hook) -> None:
    del hook.routing.routes[next(prefix for prefix in hook.routing.routes if str(prefix) == "10.240.0.70/32")]


def _sysctl_off(hook: Hook) -> None:
    hook.sysctls.values["net/ipv4/conf/all/src_valid_mark"] = "0"


def _device_mtu(hook: Hook) -> None:
    assert hook.wg.device is not None
    hook.wg.device = replace(hook.wg.device, mtu=1500)


def _underlay_mtu(hook: Hook) -> None:
    hook.set_underlay_mtu(1400)


def _no_device(hook: Hook) -> None:
    hook.wg.device = None


def _no_firewall(hook: Hook) -> None:
    hook.firewall.listing = None


def _stale_handshake(hook: Hook) -> None:
    assert hook.wg.device is not None
    peers = hook.wg.device.peers
    peers[key_of("C")] = replace(peers[key_of("C")], tx_bytes=148 * 3, latest_handshake=0.0)


def _key_twice(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}),
               remote("node-c", "C", "10.240.0.66", {"10.240.0.90"}, key=key_of("B")))
    hook.converged()


def _ip_twice(hook: Hook) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70", "10.240.0.71"}),
               remote("node-c", "C", "10.240.0.66", {"10.240.0.90", "10.240.0.70"}, changed_at=2.0))
    hook.converged()


def _conflist_lost_entry(hook: Hook) -> None:
    path = hook.conf_dir / "10-azure.conflist"
    conflist = json.loads(path.read_text())
    conflist["plugins"] = [plugin for plugin in conflist["plugins"] if plugin["type"] != "wgcni"]
    path.write_text(json.dumps(conflist))


def _pod_without_record(hook: Hook) -> None:
    hook.pod_routes.routes["azv0123456789a"] = frozenset({"10.240.0.13"})
    hook.engine.pod_routes_changed()
    hook.settle(lambda: hook.view.status()["counts"]["podsWithoutRecord"] == 1)


@pytest.mark.parametrize("cause,check,severity,words", [
    (_pod_without_record, "records", "warning", "1 pod(s) have no pod record: 10.240.0.13 on azv0123456789a"),
    (_drop_rule, "rules", "error", "ip rule missing: 99: not fwmark 0x100000/0x100000 lookup 51820 (v4)"),
    (_drop_route, "routes", "error", "1 route(s) missing or wrong in table 51820: 10.240.0.70/32 (dev)"),
    (_sysctl_off, "sysctls", "error", "net.ipv4.conf.all.src_valid_mark is 0, needs 1"),
    (_device_mtu, "mtu", "error", "device MTU is 1500, the hook wants 1440"),
    (_underlay_mtu, "mtu", "error", "underlay eth0 MTU is 1400, but WireGuard MTU 1440 needs 1500"),
    (_no_device, "device", "error", "WireGuard device wgcni0 does not exist"),
    (_no_firewall, "firewall", "error", "nftables table inet wgcni is missing"),
    (_stale_handshake, "handshakes", "warning", "no handshake with 1 peer(s) although packets were sent: node-c"),
    (_key_twice, "conflicts", "error", "claimed by node-b, node-c"),
    (_ip_twice, "conflicts", "error", "1 IP(s) claimed by more than one node: 10.240.0.70 claimed by node-b, node-c"),
    (_conflist_lost_entry, "conflist", "error", "10-azure.conflist has no wgcni entry"),
])
def test_check_diagnoses_each_failure_mode(hook: Hook, capsys: pytest.CaptureFixture[str], cause, check: str,
                                          severity: str, words: str) -> None:
    mesh(hook)
    cause(hook)
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    findings = json.loads(out)["findings"]
    assert code == 1, findings
    matching = [f for f in findings if f["check"] == check and f["severity"] == severity and words in f["message"]]
    assert matching, findings
    assert all(finding["fix"] for finding in findings)
    code, out, _ = hook.cli("check", capsys=capsys)
    assert code == 1
    line = next(line for line in out.splitlines() if words in line)
    assert line.startswith(f"{'FAIL' if severity == 'error' else 'WARN'} {check}: ") and " -> " in line


def test_check_reports_a_failing_pass_and_an_incomplete_peer_list(hook: Hook,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    hook.source.error = "wireguardnodes: 403 Forbidden"  # before any complete list
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    findings = {f["check"]: f for f in json.loads(out)["findings"]}
    assert code == 1 and "no complete peer list yet (wireguardnodes: 403 Forbidden)" in findings["sync"]["message"]
    hook.source.error = None
    mesh(hook)
    del hook.sysctls.values["net/ipv4/conf/all/src_valid_mark"]  # as on a kernel without it: every write fails
    hook.engine.trigger_resync()
    hook.settle(lambda: hook.engine.last_error is not None)
    code, out, _ = hook.cli("check", "--json", capsys=capsys)
    findings = {f["check"]: f for f in json.loads(out)["findings"]}
    assert code == 1
    assert findings["reconcile"]["message"] == ("the last dataplane pass failed: sysctls: sysctl "
                                                "net/ipv4/conf/all/src_valid_mark does not exist (retrying)")


def test_opted_out_nodes_are_info_and_do_not_fail_the_check(hook: Hook, capsys: pytest.CaptureFixture[str]) -> None:
    hook.nodes(remote("node-b", "B", "10.240.0.35", {"10.240.0.70"}), remote("node-x", "X", "10.240.0.99", set(),
                                                                              key=""))
    hook.converged()
    code, out, _ = hook.cli("check", capsys=capsys)
    assert code == 0, out
    assert out.startswith("info conflicts: 1 node(s) without WireGuard")


def test_formatting_helpers() -> None:
    assert human_duration(0) == "0 seconds" and human_duration(3723) == "1 hour, 2 minutes, 3 seconds"
    assert human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.50 KiB"
    assert annotate_allowed_ips(["fd00::/127", "10.0.0.0/30"], ["10.0.0.1", "10.0.0.2", "fd00::1"], ["10.0.0.3"]) == [
        {"prefix": "10.0.0.0/30", "pods": 2, "nodeIPs": ["10.0.0.3"]}, {"prefix": "fd00::/127", "pods": 1,
                                                                        "nodeIPs": []}]


@pytest.mark.parametrize("request_,error", [
    ({"op": "peers", "offset": -1}, "peers: 'offset' must be an integer >= 0"),
    ({"op": "peers", "limit": "10"}, "peers: 'limit' must be an integer >= 1 or absent (all)"),
    ({"op": "peers", "limit": 0}, "peers: 'limit' must be an integer >= 1 or absent (all)"),
    ({"op": "peers", "node": 7}, "peers: 'node' must be a string"),
    ({"op": "routes", "limit": 0}, "routes: 'limit' must be an integer >= 1 or absent (all)"),
    ({"op": "routes", "after": ["node-b"]}, "routes: 'after' must be a string"),
])
def test_bad_paging_requests_get_one_line_errors(hook: Hook, request_: dict, error: str) -> None:
    answer = request(str(hook.settings.socket), request_, 5.0)
    assert answer == {"ok": False, "error": error}
