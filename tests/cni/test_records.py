"""Tests of the pod-record store (the contract the node hook reads), the hook client and the plugin's file log."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from cni_plugin import notify
from cni_plugin.filelog import FileLog
from cni_plugin.records import (
    TEMP_SWEEP_INTERVAL,
    RecordError,
    RecordStore,
    valid_container_id,
    valid_ifname,
    valid_network,
    validate_record,
)
from wgcni_lab.harness.fake_hook import FakeHook


def make_record(container_id="c1", ifname="eth0", network="azure", ips=("10.240.0.5",)):
    return {
        "format": 1, "network": network, "containerID": container_id, "ifname": ifname, "netns": "/proc/1/ns/net",
        "podNamespace": "default", "podName": "web", "podUID": None, "ips": list(ips), "cniVersion": "0.3.0",
        "prevResult": {"cniVersion": "0.3.0", "ips": []}, "created": "2026-01-01T00:00:00Z",
        "updated": "2026-01-01T00:00:00Z",
    }


@pytest.fixture
def store(tmp_path):
    return RecordStore(str(tmp_path / "state"))


def write(store, record):
    with store.lock():
        store.write(record)


@pytest.mark.parametrize("value,ok", [
    ("3f6940ab5ab4", True), ("a", True), ("A_b.c-d", True), ("x" * 255, True), ("x" * 256, False), ("", False),
    ("-a", False), (".a", False), ("a/b", False), ("a@b", False), ("a b", False), ("a\n", False), ("é", False),
])
def test_container_id_validation(value, ok):
    assert valid_container_id(value) is ok


@pytest.mark.parametrize("value,ok", [
    ("eth0", True), ("net1", True), (".x", True), ("x" * 15, True), ("x" * 16, False), (".", False), ("..", False),
    ("", False), ("a/b", False), ("a@b", False), ("eth0\n", False),
])
def test_ifname_validation(value, ok):
    assert valid_ifname(value) is ok


@pytest.mark.parametrize("value,ok", [("azure", True), ("k8s-pod-network", True), ("", False), (".", False),
                                      ("..", False), ("a/b", False), ("x" * 129, False)])
def test_network_validation(value, ok):
    assert valid_network(value) is ok


def test_write_read_list_remove_round_trip(store):
    write(store, make_record("c2"))
    write(store, make_record("c1", ips=("10.240.0.6", "fd00::6")))
    write(store, make_record("c1", network="other"))
    assert store.read("azure", "c1", "eth0")["ips"] == ["10.240.0.6", "fd00::6"]
    assert [(r["network"], r["containerID"]) for r in store.list()] == [("azure", "c1"), ("azure", "c2"),
                                                                        ("other", "c1")]
    assert [r["containerID"] for r in store.list("azure")] == ["c1", "c2"]
    assert store.networks() == ["azure", "other"]
    with store.lock():
        assert store.remove("azure", "c1", "eth0") is True
        assert store.remove("azure", "c1", "eth0") is False
    assert store.read("azure", "c1", "eth0") is None


def test_an_empty_store_lists_nothing(store):
    assert store.list() == [] and store.networks() == [] and store.list("azure") == []


def test_reader_skips_temp_files_and_reports_invalid_files(store):
    write(store, make_record())
    directory = os.path.join(store.pods_dir, "azure")
    with open(os.path.join(directory, ".tmp.1.abcd"), "w") as handle:
        handle.write("{")
    with open(os.path.join(directory, "bad@eth0.json"), "w") as handle:
        handle.write("{")
    with open(os.path.join(directory, "renamed@eth1.json"), "w") as handle:
        json.dump(make_record("c9"), handle)
    problems = []
    assert [r["containerID"] for r in store.list(errors=problems)] == ["c1"]
    assert len(problems) == 2
    assert any("bad@eth0.json" in p and "not valid JSON" in p for p in problems)
    assert any("renamed@eth1.json" in p and "c9@eth0" in p for p in problems)


@pytest.mark.parametrize("field,value", [
    ("format", 2), ("format", True), ("ips", "10.0.0.1"), ("ips", [1]), ("podName", 5), ("containerID", "../x"),
    ("prevResult", []), ("created", None),
])
def test_validate_record_refuses_contract_violations(field, value):
    record = make_record()
    record[field] = value
    with pytest.raises(RecordError):
        validate_record(record)


def test_write_refuses_an_invalid_record_and_leaves_no_file(store):
    with pytest.raises(RecordError):
        write(store, make_record(container_id="../../etc/x"))
    assert store.list() == []
    assert not os.path.exists(os.path.join(store.pods_dir, "azure")) or os.listdir(
        os.path.join(store.pods_dir, "azure")) == []


def test_write_replaces_atomically(store):
    write(store, make_record())
    write(store, make_record(ips=("10.240.0.7",)))
    assert os.listdir(os.path.join(store.pods_dir, "azure")) == ["c1@eth0.json"]
    assert store.read("azure", "c1", "eth0")["ips"] == ["10.240.0.7"]


def _age_last_sweep(store, seconds, network="azure"):
    stamp = store.temp_sweep_stamp(network)
    os.utime(stamp, (time.time() - seconds,) * 2)


def _stale_temp_file(store, name=".tmp.999.dead"):
    path = os.path.join(store.pods_dir, "azure", name)
    with open(path, "w") as handle:
        handle.write("torn")
    return path


def test_writers_sweep_temp_files_of_killed_writers_at_most_once_per_interval(store):
    write(store, make_record())  # the first write of the network: sweeps (nothing yet) and stamps
    stamp = store.temp_sweep_stamp("azure")
    assert os.path.dirname(stamp) == store.pods_dir and store.networks() == ["azure"]
    stale = _stale_temp_file(store)

    _age_last_sweep(store, TEMP_SWEEP_INTERVAL - 5)
    write(store, make_record("c2"))
    assert os.path.exists(stale), "swept again before the interval is over"

    _age_last_sweep(store, TEMP_SWEEP_INTERVAL + 1)
    write(store, make_record("c3"))
    assert not os.path.exists(stale)
    assert time.time() - os.stat(stamp).st_mtime < 5, "the sweep is stamped"
    assert sorted(os.listdir(os.path.join(store.pods_dir, "azure"))) == ["c1@eth0.json", "c2@eth0.json",
                                                                        "c3@eth0.json"]

    stale = _stale_temp_file(store)
    write(store, make_record("c4"))
    assert os.path.exists(stale), "a sweep was just stamped"
    _age_last_sweep(store, -3600)  # the clock was set back an hour since the last sweep
    write(store, make_record("c5"))
    assert not os.path.exists(stale)

    stale = _stale_temp_file(store)
    os.unlink(stamp)  # lost (or a store written by an older plugin)
    write(store, make_record("c6"))
    assert not os.path.exists(stale) and os.path.exists(stamp)


def test_remove_all_except_keeps_listed_and_foreign_files(store):
    for container in ("a", "b", "c"):
        write(store, make_record(container))
    foreign = os.path.join(store.pods_dir, "azure", "notes.txt")
    with open(foreign, "w") as handle:
        handle.write("operator notes")
    with store.lock():
        removed = store.remove_all_except("azure", {("b", "eth0")})
    assert sorted(r["containerID"] for r in removed) == ["a", "c"]
    assert [r["containerID"] for r in store.list()] == ["b"]
    assert os.path.exists(foreign)


def test_the_lock_is_exclusive_between_writers(store):
    order = []
    with store.lock():
        def other_writer():
            with store.lock():
                order.append("other")

        thread = threading.Thread(target=other_writer)
        thread.start()
        thread.join(0.2)
        order.append("first")
    thread.join()
    assert order == ["first", "other"]


# -- the hook client ------------------------------------------------------------------------------------------------


@pytest.fixture
def hook_socket(short_tmp):
    return str(short_tmp / "hook.sock")


def test_request_round_trip(hook_socket):
    with FakeHook(hook_socket) as hook:
        assert notify.request(hook_socket, {"op": "status"}, 1.0)["ready"] is True
        assert hook.requests == [{"op": "status"}]


def test_request_to_a_missing_socket_is_unavailable(hook_socket):
    with pytest.raises(notify.HookUnavailable, match="does not exist"):
        notify.request(hook_socket, {"op": "status"}, 1.0)


def test_request_to_a_dead_socket_is_unavailable(hook_socket):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(hook_socket)
    dead.close()  # the path exists, nobody listens
    with pytest.raises(notify.HookUnavailable, match="nothing listens"):
        notify.request(hook_socket, {"op": "status"}, 1.0)


def test_request_to_a_hung_hook_times_out(hook_socket):
    with FakeHook(hook_socket) as hook:
        hook.answer_delay = 1.0
        with pytest.raises(notify.HookUnavailable, match="no answer within 100 ms"):
            notify.request(hook_socket, {"op": "status"}, 0.1)


@pytest.mark.parametrize("behaviour,error", [("close", notify.HookUnavailable), ("garbage", notify.HookProtocolError)])
def test_request_to_a_misbehaving_hook(hook_socket, behaviour, error):
    with FakeHook(hook_socket) as hook:
        hook.behaviour = behaviour
        with pytest.raises(error):
            notify.request(hook_socket, {"op": "status"}, 1.0)


# -- the file log ---------------------------------------------------------------------------------------------------


def test_log_filters_by_level_and_creates_a_private_file(tmp_path):
    path = tmp_path / "log" / "wgcni.log"
    log = FileLog(str(path), "warning")
    log.info("quiet")
    log.warning("loud")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("loud") and " WARNING wgcni[" in lines[0]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_log_rotates_once_it_reaches_its_bound(tmp_path):
    path = tmp_path / "wgcni.log"
    for round_number in range(5):
        log = FileLog(str(path), "info", max_bytes=200)
        for line in range(5):
            log.info(f"round {round_number} line {line}")
        log.close()
    assert path.stat().st_size < 400  # at most one invocation's lines beyond the bound
    assert (tmp_path / "wgcni.log.1").exists()
    assert "round 4 line 4" in path.read_text()


def test_an_unwritable_log_never_fails_the_caller(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = FileLog(str(blocker / "wgcni.log"))
    log.error("nowhere to go")
    log.close()
