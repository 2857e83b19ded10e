"""Tests of the `wgcni` operator CLI (no CNI_COMMAND): version, pods, and one-line errors for bad use."""

from __future__ import annotations

import json
import pathlib
import tomllib

import pytest

import cni_plugin
from cni_plugin.cli import run
from cni_plugin.records import RecordStore

REPO = pathlib.Path(__file__).resolve().parents[2]


def write_record(state_dir, container_id, network="azure", pod=("shop", "web"), ips=("10.240.0.65",)):
    record = {
        "format": 1, "network": network, "containerID": container_id, "ifname": "eth0", "netns": "/proc/1/ns/net",
        "podNamespace": pod[0], "podName": pod[1], "podUID": "uid-" + container_id, "ips": list(ips),
        "cniVersion": "0.3.0", "prevResult": {"cniVersion": "0.3.0", "ips": []},
        "created": "2026-01-01T00:00:00Z", "updated": "2026-01-02T00:00:00Z",
    }
    store = RecordStore(str(state_dir))
    with store.lock():
        store.write(record)


def test_version_matches_the_package_version(capsys):
    assert run(["version"]) == 0
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert cni_plugin.__version__ == project["version"]
    assert capsys.readouterr().out == "wgcni 0.1.0 (CNI 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)\n"


def test_pods_json_is_a_stable_array(tmp_path, capsys):
    write_record(tmp_path, "b2", ips=("10.240.0.66", "fd00::42"))
    write_record(tmp_path, "a1", pod=("kube-system", "coredns"))
    write_record(tmp_path, "c3", network="other")
    assert run(["pods", "--state-dir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["network"], r["containerID"]) for r in rows] == [("azure", "a1"), ("azure", "b2"), ("other", "c3")]
    assert rows[1] == {"network": "azure", "podNamespace": "shop", "podName": "web", "podUID": "uid-b2",
                       "containerID": "b2", "ifname": "eth0", "ips": ["10.240.0.66", "fd00::42"],
                       "created": "2026-01-01T00:00:00Z", "updated": "2026-01-02T00:00:00Z", "sources": ["record"],
                       "hostInterface": None, "programmed": None}
    assert run(["pods", "--state-dir", str(tmp_path), "--json", "--network", "other"]) == 0
    assert [r["containerID"] for r in json.loads(capsys.readouterr().out)] == ["c3"]


def test_pods_table_shows_pod_names_and_ips(tmp_path, capsys):
    write_record(tmp_path, "0123456789abcdef", ips=("10.240.0.66", "fd00::42"))
    (tmp_path / "pods" / "azure" / "junk@eth0.json").write_text("{")
    assert run(["pods", "--state-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    header, row = captured.out.splitlines()
    assert header.split() == ["NETWORK", "POD", "CONTAINER", "IFNAME", "IPS", "UPDATED"]
    assert row.split() == ["azure", "shop/web", "0123456789abc", "eth0", "10.240.0.66,fd00::42",
                           "2026-01-02T00:00:00Z"]
    assert "skipped" in captured.err and "junk@eth0.json" in captured.err


def test_pods_of_an_empty_node(tmp_path, capsys):
    assert run(["pods", "--state-dir", str(tmp_path / "none"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_no_arguments_print_the_help(capsys):
    assert run([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: wgcni") and "pods" in out and "version" in out


@pytest.mark.parametrize("argv", [["--bogus"], ["pods", "--jsn"], ["nosuch"], ["pods", "--network", "../x"]])
def test_bad_usage_is_one_line_without_traceback(argv, capsys):
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("wgcni: ")
    assert "Traceback" not in captured.err


def test_a_state_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run(["pods", "--state-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a file" in err


def test_an_unreadable_record_tree_is_one_line(tmp_path, capsys):
    (tmp_path / "pods").write_text("not a directory")
    assert run(["pods", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wgcni: Not a directory") and len(err.strip().splitlines()) == 1
