"""In-process tests of the plugin over its dispatcher, every behaviour at every cniVersion, with AKS inputs."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cni_plugin import commands
from cni_plugin.records import RecordStore
from tests.cni.helpers import (
    AKS_CONFLISTS,
    AZURE_CONFLIST,
    CONTAINER_ID,
    NETNS,
    VERSIONS,
    aks_prev_result,
    cni_env,
    expected_ips,
    invoke,
    is_dual_stack,
    load_conflist,
    plugin_stdin,
    record_files,
)
from wgcni_lab.harness.fake_hook import FakeHook

AZURE = AZURE_CONFLIST
V04_PLUS = [v for v in VERSIONS if v >= "0.4.0"]
BEFORE_04 = [v for v in VERSIONS if v < "0.4.0"]
BEFORE_11 = [v for v in VERSIONS if v != "1.1.0"]


def add(settings, version, prev=None, conflist=AZURE, **env_overrides):
    prev = aks_prev_result(version) if prev is None else prev
    return invoke(cni_env("ADD", **env_overrides), plugin_stdin(conflist, version, settings, prev))


def delete(settings, version, prev=None, **env_overrides):
    return invoke(cni_env("DEL", **env_overrides), plugin_stdin(AZURE, version, settings, prev))


def records(settings):
    return RecordStore(settings["stateDir"]).list()


# -- ADD ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("conflist_path", AKS_CONFLISTS, ids=lambda p: p.stem)
def test_add_passes_prev_result_through_and_records_the_pod(settings, version, conflist_path):
    dual = is_dual_stack(conflist_path)
    prev = aks_prev_result(version, dual_stack=dual)
    call = add(settings, version, prev, conflist=load_conflist(conflist_path))
    assert call.code == 0, call.raw
    assert call.output == prev  # same content, same version
    [record] = records(settings)
    assert record["network"] == "azure"
    assert record["containerID"] == CONTAINER_ID and record["ifname"] == "eth0" and record["netns"] == NETNS
    assert (record["podNamespace"], record["podName"]) == ("shop", "web-7d4b9c6f5-x2x9q")
    assert record["podUID"] == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert record["ips"] == expected_ips(dual)
    assert record["cniVersion"] == version and record["prevResult"] == prev
    assert record["created"] == record["updated"] and record["created"].endswith("Z")


@pytest.mark.parametrize("version", VERSIONS)
def test_add_record_file_is_private_and_named_by_contract(settings, version):
    assert add(settings, version).code == 0
    pods = os.path.join(settings["stateDir"], "pods")
    path = os.path.join(pods, "azure", f"{CONTAINER_ID}@eth0.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(pods, "azure")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pods).st_mode) == 0o700
    assert json.loads(open(path).read())["format"] == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_add_without_prev_result_is_refused_as_not_chained(settings, version):
    call = invoke(cni_env("ADD"), plugin_stdin(AZURE, version, settings))
    assert call.error_code() == 7
    assert call.output["msg"] == "must be called as chained plugin"
    assert call.output["cniVersion"] == version
    assert record_files(settings["stateDir"]) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_converts_a_prev_result_of_the_other_shape(settings, version):
    other = "1.0.0" if version.startswith("0.") else "0.3.1"
    call = add(settings, version, aks_prev_result(other, dual_stack=True))
    assert call.code == 0, call.raw
    assert call.output == aks_prev_result(version, dual_stack=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_add_drops_1_1_fields_only_below_1_1(settings, version):
    prev = aks_prev_result("1.1.0")
    prev["routes"][0].update({"mtu": 1500, "table": 100})
    prev["interfaces"][0]["mtu"] = 1500
    call = add(settings, version, prev)
    assert call.code == 0, call.raw
    assert ("mtu" in call.output["routes"][0]) == (version == "1.1.0")
    assert ("mtu" in call.output["interfaces"][0]) == (version == "1.1.0")
    assert call.output["dns"] == prev["dns"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_again_replaces_the_record_and_keeps_its_creation_time(settings, version):
    assert add(settings, version).code == 0
    path = os.path.join(settings["stateDir"], "pods", "azure", f"{CONTAINER_ID}@eth0.json")
    first = json.loads(open(path).read())
    first["created"] = "2020-01-01T00:00:00Z"
    with open(path, "w") as handle:
        json.dump(first, handle)
    prev = aks_prev_result(version)
    prev["ips"][0]["address"] = "10.240.0.66/16"
    assert add(settings, version, prev).code == 0
    [record] = records(settings)
    assert record["created"] == "2020-01-01T00:00:00Z" and record["ips"] == ["10.240.0.66"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_normalises_ips_sorts_v4_first_and_deduplicates(settings, version):
    prev = aks_prev_result(version)
    extra = [{"address": "fd00:0:0::0005/64"}, {"address": "10.240.0.9/16"}, {"address": "10.240.0.65/32"}]
    prev["ips"] = extra + prev["ips"]
    assert add(settings, version, prev).code == 0
    assert records(settings)[0]["ips"] == ["10.240.0.9", "10.240.0.65", "fd00::5"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("bad_ips", [
    "10.0.0.1", [{"address": "10.0.0.1"}], [{"address": "300.1.1.1/24"}], [{"gateway": "10.0.0.1"}], ["x"],
], ids=["not-a-list", "no-prefix", "bad-address", "no-address", "not-an-object"])
def test_add_with_a_malformed_prev_result_fails_with_code_7_and_writes_nothing(settings, version, bad_ips):
    prev = aks_prev_result(version)
    prev["ips"] = bad_ips
    assert add(settings, version, prev).error_code() == 7
    assert record_files(settings["stateDir"]) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_notifies_the_hook_which_reads_the_record(settings, version):
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        assert add(settings, version).code == 0
        assert hook.requests == [{"op": "pod-added", "network": "azure", "containerID": CONTAINER_ID,
                                  "ifname": "eth0"}]
        assert hook.programmed_ips() == {"10.240.0.65"}


@pytest.mark.parametrize("behaviour", ["close", "garbage", "refuse"])
def test_add_succeeds_whatever_the_hook_answers(settings, behaviour):
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        hook.behaviour = behaviour
        assert add(settings, "0.3.0").code == 0
    assert len(records(settings)) == 1
    assert "pod-added" in open(settings["logFile"]).read()


def test_add_does_not_wait_long_for_a_hung_hook(settings):
    import time

    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        hook.answer_delay = 3.0
        started = time.monotonic()
        assert add(settings, "0.3.0").code == 0
        # The notification is bounded (250 ms); 2 s leaves room for a loaded machine and still proves the bound.
        assert time.monotonic() - started < 2.0
    assert "no answer within 250 ms" in open(settings["logFile"]).read()


# -- DEL ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_del_without_prev_result_removes_the_record_and_is_idempotent(settings, version):
    assert add(settings, version).code == 0
    first = delete(settings, version)
    assert (first.code, first.output) == (0, None)
    assert records(settings) == []
    second = delete(settings, version, netns="")  # containerd's RemovePodSandbox: empty netns, no prevResult
    assert (second.code, second.output) == (0, None)


@pytest.mark.parametrize("version", V04_PLUS)
def test_del_with_prev_result_removes_the_record(settings, version):
    assert add(settings, version).code == 0
    assert delete(settings, version, aks_prev_result(version)).code == 0
    assert records(settings) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_del_after_failed_add_succeeds(settings, version):
    prev = aks_prev_result(version)
    prev["ips"] = "broken"
    assert add(settings, version, prev).error_code() == 7
    assert delete(settings, version).code == 0
    assert record_files(settings["stateDir"]) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_del_only_removes_its_own_attachment(settings, version):
    assert add(settings, version).code == 0
    assert add(settings, version, ifname="net1").code == 0
    assert add(settings, version, container_id="other").code == 0
    assert delete(settings, version, ifname="net1").code == 0
    assert {(r["containerID"], r["ifname"]) for r in records(settings)} == {(CONTAINER_ID, "eth0"), ("other", "eth0")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("container_id", ["../../etc/passwd", "a/b", "-x", "a@b", "x" * 300])
def test_del_of_an_attachment_that_cannot_have_a_record_succeeds_without_touching_files(settings, version,
                                                                                         container_id):
    assert add(settings, version).code == 0
    before = record_files(settings["stateDir"])
    assert delete(settings, version, container_id=container_id).code == 0
    assert record_files(settings["stateDir"]) == before


@pytest.mark.parametrize("version", VERSIONS)
def test_del_notifies_the_hook_only_when_it_removed_a_record(settings, version):
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        assert add(settings, version).code == 0
        assert delete(settings, version).code == 0
        assert delete(settings, version).code == 0
        assert hook.ops() == ["pod-added", "pod-deleted"]
        assert hook.programmed_ips() == set()


# -- CHECK ----------------------------------------------------------------------------------------------------------


def check(settings, version, prev=None, **env_overrides):
    prev = aks_prev_result(version) if prev is None else prev
    return invoke(cni_env("CHECK", **env_overrides), plugin_stdin(AZURE, version, settings, prev))


@pytest.mark.parametrize("version", BEFORE_04)
def test_check_is_refused_before_0_4_0(settings, version):
    assert add(settings, version).code == 0
    assert check(settings, version).error_code() == 1


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_passes_when_the_record_matches_and_the_hook_is_absent(settings, version):
    assert add(settings, version).code == 0
    call = check(settings, version)
    assert (call.code, call.output) == (0, None)


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_asks_the_hook_and_passes_when_programmed(settings, version):
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        assert add(settings, version).code == 0
        assert check(settings, version).code == 0
        assert hook.requests[-1] == {"op": "check", "ips": ["10.240.0.65"]}


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_fails_when_the_hook_has_not_programmed_the_pod(settings, version):
    assert add(settings, version).code == 0  # hook absent: it never learned about the pod
    with FakeHook(settings["hookSocket"], settings["stateDir"]):
        call = check(settings, version)
    assert call.error_code() == 101
    assert "10.240.0.65" in call.output["msg"]


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_fails_without_a_record(settings, version):
    assert check(settings, version).error_code() == 3


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_fails_when_the_ips_changed(settings, version):
    assert add(settings, version).code == 0
    prev = aks_prev_result(version)
    prev["ips"][0]["address"] = "10.240.0.99/16"
    call = check(settings, version, prev)
    assert call.error_code() == 100
    assert "10.240.0.65" in call.output["msg"] and "10.240.0.99" in call.output["msg"]


@pytest.mark.parametrize("version", V04_PLUS)
def test_check_without_prev_result_is_refused(settings, version):
    call = invoke(cni_env("CHECK"), plugin_stdin(AZURE, version, settings))
    assert call.error_code() == 7


@pytest.mark.parametrize("version", V04_PLUS)
@pytest.mark.parametrize("behaviour,code", [("garbage", 102), ("refuse", 101)])
def test_check_reports_a_misbehaving_hook(settings, version, behaviour, code):
    assert add(settings, version).code == 0
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        hook.behaviour = behaviour
        assert check(settings, version).error_code() == code


# -- STATUS ---------------------------------------------------------------------------------------------------------


def status(settings, version):
    return invoke(cni_env("STATUS", container_id=None, ifname=None, netns=None, args=None),
                  plugin_stdin(AZURE, version, settings))


@pytest.mark.parametrize("version", BEFORE_11)
def test_status_is_refused_before_1_1_0(settings, version):
    assert status(settings, version).error_code() == 1


def test_status_without_the_hook_is_not_available(settings):
    call = status(settings, "1.1.0")
    assert call.error_code() == 50
    assert settings["hookSocket"] in call.output["msg"] and "wgcni-node" in call.output["details"]


@pytest.mark.parametrize("ready,programmed", [(False, True), (True, False), (False, False)])
def test_status_with_a_hook_that_is_not_ready_is_limited(settings, ready, programmed):
    with FakeHook(settings["hookSocket"]) as hook:
        hook.ready, hook.dataplane_programmed, hook.status_message = ready, programmed, "waiting for peers"
        call = status(settings, "1.1.0")
    assert call.error_code() == 51
    assert "waiting for peers" in call.output["msg"]


@pytest.mark.parametrize("behaviour", ["close", "garbage", "refuse"])
def test_status_with_a_misbehaving_hook_is_not_available(settings, behaviour):
    with FakeHook(settings["hookSocket"]) as hook:
        hook.behaviour = behaviour
        assert status(settings, "1.1.0").error_code() == 50


def test_status_with_a_ready_hook_succeeds(settings):
    with FakeHook(settings["hookSocket"]):
        call = status(settings, "1.1.0")
    assert (call.code, call.output) == (0, None)


# -- GC -------------------------------------------------------------------------------------------------------------


def gc(settings, version, attachments, key="cni.dev/valid-attachments"):
    extra = {} if attachments is None else {key: attachments}
    return invoke(cni_env("GC", container_id=None, ifname=None, netns=None, args=None),
                  plugin_stdin(AZURE, version, settings, **extra))


@pytest.mark.parametrize("version", BEFORE_11)
def test_gc_is_refused_before_1_1_0(settings, version):
    assert add(settings, version).code == 0
    assert gc(settings, version, []).error_code() == 1
    assert len(records(settings)) == 1


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_every_record_not_listed_and_notifies(settings, key):
    for container in ("keep1", "drop1", "drop2"):
        assert add(settings, "1.1.0", container_id=container).code == 0
    assert add(settings, "1.1.0", container_id="keep1", ifname="net1").code == 0
    other_network = plugin_stdin({**AZURE, "name": "other"}, "1.1.0", settings, aks_prev_result("1.1.0"))
    assert invoke(cni_env("ADD", container_id="drop1"), other_network).code == 0
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook:
        call = gc(settings, "1.1.0", [{"containerID": "keep1", "ifname": "eth0"},
                                      {"containerID": "keep1", "ifname": "net1"}], key=key)
        assert (call.code, call.output) == (0, None)
        assert sorted(r["containerID"] for r in hook.requests) == ["drop1", "drop2"]
    assert {(r["network"], r["containerID"], r["ifname"]) for r in records(settings)} == {
        ("azure", "keep1", "eth0"), ("azure", "keep1", "net1"), ("other", "drop1", "eth0")}


def test_gc_with_an_empty_list_removes_every_record_of_the_network(settings):
    assert add(settings, "1.1.0").code == 0
    assert gc(settings, "1.1.0", []).code == 0
    assert records(settings) == []


@pytest.mark.parametrize("attachments", [None, {"containerID": "x"}, [{"containerID": "x"}], ["x"]],
                         ids=["missing", "not-a-list", "no-ifname", "not-an-object"])
def test_gc_with_a_malformed_list_fails_and_keeps_records(settings, attachments):
    assert add(settings, "1.1.0").code == 0
    assert gc(settings, "1.1.0", attachments).error_code() == 7
    assert len(records(settings)) == 1


def test_gc_removes_temp_files_of_killed_writers(settings):
    assert add(settings, "1.1.0").code == 0
    stale = os.path.join(settings["stateDir"], "pods", "azure", ".tmp.1234.deadbeef")
    with open(stale, "w") as handle:
        handle.write('{"torn')
    assert gc(settings, "1.1.0", [{"containerID": CONTAINER_ID, "ifname": "eth0"}]).code == 0
    assert not os.path.exists(stale) and len(records(settings)) == 1


# -- VERSION --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_version_reports_every_supported_version_in_the_callers_version(version):
    call = invoke({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}).encode())
    assert call.code == 0
    assert call.output == {"cniVersion": version, "supportedVersions": VERSIONS}


def test_version_with_an_unknown_caller_version_answers_in_the_latest():
    call = invoke({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "9.9.9"}')
    assert call.output == {"cniVersion": "1.1.0", "supportedVersions": VERSIONS}


# -- bad input ------------------------------------------------------------------------------------------------------


REQUIRED_ENV = [(command, name) for command in ("ADD", "DEL", "CHECK")
                for name in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS") if (command, name) != ("DEL", "CNI_NETNS")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("command,missing", REQUIRED_ENV)
def test_missing_environment_is_code_4(settings, version, command, missing):
    env = cni_env(command)
    del env[missing]
    call = invoke(env, plugin_stdin(AZURE, version, settings, aks_prev_result(version)))
    assert call.error_code() == 4
    assert record_files(settings["stateDir"]) == {}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overrides", [
    {"container_id": "../../etc/cron.d/x"}, {"container_id": "a@b"}, {"container_id": ".hidden"},
    {"ifname": ".."}, {"ifname": "eth0/../x"}, {"ifname": "x" * 16}, {"args": "K8S_POD_NAME"},
], ids=["cid-traversal", "cid-at", "cid-dot", "ifname-dotdot", "ifname-slash", "ifname-long", "args-no-equals"])
def test_unsafe_identifiers_and_bad_args_are_code_4_and_touch_nothing(settings, version, overrides):
    call = add(settings, version, **overrides)
    assert call.error_code() == 4
    assert call.output["cniVersion"] == version
    assert record_files(settings["stateDir"]) == {}


@pytest.mark.parametrize("stdin,code", [
    (b"", 6), (b"not json", 6), (b"[1,2]", 6), (b"\xff\xfe\x00", 6), (b'{"a": NaN}', 6), (b"[" * 100000, 6),
    (b'{"name": "azure"}', 7), (b'{"cniVersion": "0.2.0", "name": "azure"}', 1),
    (b'{"cniVersion": 1, "name": "azure"}', 7), (b'{"cniVersion": "1.0.0"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "../x"}', 7), (b'{"cniVersion": "1.0.0", "name": "azure", "prevResult": 3}', 7),
    (b'{"cniVersion": "1.0.0", "name": "azure", "stateDir": "relative"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "azure", "logLevel": "loud"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "azure", "hookSocket": 5}', 7),
], ids=["empty", "text", "array", "binary", "nan", "deep", "no-version", "old-version", "version-type", "no-name",
        "bad-name", "prev-type", "relative-state", "bad-level", "socket-type"])
def test_bad_configuration_gets_the_spec_code(stdin, code):
    call = invoke(cni_env("ADD"), stdin)
    assert call.error_code() == code


@pytest.mark.parametrize("command", ["", "add", "REPAIR"])
def test_unknown_command_is_code_4(command):
    env = cni_env(command)
    if not command:
        del env["CNI_COMMAND"]
    assert invoke(env, b"{}").error_code() == 4


def test_unexpected_failure_is_an_internal_error_with_the_traceback_only_in_the_log(settings, monkeypatch):
    def explode(*args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(commands, "add", explode)
    call = add(settings, "1.0.0")
    assert call.error_code() == 999
    assert "Traceback" not in call.raw and settings["logFile"] in call.output["details"]
    log = open(settings["logFile"]).read()
    assert "Traceback" in log and "ZeroDivisionError: boom" in log


@pytest.mark.parametrize("version", VERSIONS)
def test_unwritable_state_dir_is_an_io_error(short_tmp, settings, version):
    blocker = short_tmp / "file"
    blocker.write_text("")
    settings["stateDir"] = str(blocker / "state")
    assert add(settings, version).error_code() == 5
