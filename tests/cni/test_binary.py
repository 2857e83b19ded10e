"""The built plugin (dist/bin/wgcni) exercised as kubelet's runtime runs it: a fresh process per call, a minimal
environment without Python, the conflist entry on stdin, the result on stdout.

Covers ADD, CHECK, DEL, double DEL, DEL after a failed ADD, GC, STATUS and VERSION with the hook absent and present,
the debug CLI of the same binary, crash safety (SIGKILL at random instants while writing) and 200 concurrent
ADD/DEL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni_plugin.records import TEMP_SWEEP_INTERVAL, RecordStore
from tests.cni.helpers import AZURE_CONFLIST, CONTAINER_ID, VERSIONS, aks_prev_result, cni_env, plugin_stdin
from tests.support.binaries import built_binary
from wgcni_lab.harness.fake_hook import FakeHook

V04_PLUS = [v for v in VERSIONS if v >= "0.4.0"]


@pytest.fixture(scope="module")
def wgcni() -> str:
    return built_binary("wgcni")


class Run:
    def __init__(self, process: subprocess.CompletedProcess) -> None:
        self.code = process.returncode
        self.stdout = process.stdout.decode()
        self.stderr = process.stderr.decode()
        self.output = json.loads(self.stdout) if self.stdout.strip() else None


def run(binary: str, env: dict, stdin: bytes) -> Run:
    # What a runtime passes: the CNI_* variables and a PATH without any Python on it.
    process = subprocess.run([binary], env={**env, "PATH": "/nonexistent"}, input=stdin, capture_output=True,
                             timeout=30)
    result = Run(process)
    assert result.stderr == "", result.stderr  # logs go to the log file, never to the runtime's streams
    return result


def call(binary, command, settings, version, prev=None, **overrides):
    extra = overrides.pop("extra", {})
    stdin = plugin_stdin(AZURE_CONFLIST, version, settings, prev, **extra)
    return run(binary, cni_env(command, **overrides), stdin)


def record_ips(settings):
    return {r["containerID"]: r["ips"] for r in RecordStore(settings["stateDir"]).list()}


@pytest.fixture(params=["hook-absent", "hook-present"])
def hook(request, settings):
    if request.param == "hook-absent":
        yield None
        return
    with FakeHook(settings["hookSocket"], settings["stateDir"]) as fake:
        yield fake


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_del_as_kubelet_does(wgcni, settings, hook, version):
    prev = aks_prev_result(version)
    added = call(wgcni, "ADD", settings, version, prev)
    assert added.code == 0 and added.output == prev
    assert record_ips(settings) == {CONTAINER_ID: ["10.240.0.65"]}
    if version in V04_PLUS:
        checked = call(wgcni, "CHECK", settings, version, prev)
        assert (checked.code, checked.stdout) == (0, ""), checked.stdout
    # StopPodSandbox: DEL with the netns (prevResult only from 0.4.0 on); RemovePodSandbox: no netns, no prevResult
    first = call(wgcni, "DEL", settings, version, prev if version in V04_PLUS else None)
    second = call(wgcni, "DEL", settings, version, None, netns="")
    assert (first.code, first.stdout, second.code, second.stdout) == (0, "", 0, "")
    assert record_ips(settings) == {}
    if hook is not None:
        expected = ["pod-added"] + (["check"] if version in V04_PLUS else []) + ["pod-deleted"]
        assert hook.ops() == expected
        assert hook.programmed_ips() == set()
    log = open(settings["logFile"]).read()
    assert f"ADD azure/{CONTAINER_ID}@eth0" in log and "removed the record" in log


@pytest.mark.parametrize("version", VERSIONS)
def test_del_after_failed_add(wgcni, settings, hook, version):
    failed = call(wgcni, "ADD", settings, version, None)  # no prevResult: refused
    assert failed.code == 1 and failed.output["code"] == 7 and failed.output["cniVersion"] == version
    rollback = call(wgcni, "DEL", settings, version, None)
    assert (rollback.code, rollback.stdout) == (0, "")
    assert record_ips(settings) == {}


def test_status_and_gc(wgcni, settings, hook):
    for container in ("keep", "stale"):
        assert call(wgcni, "ADD", settings, "1.1.0", aks_prev_result("1.1.0"), container_id=container).code == 0
    status = call(wgcni, "STATUS", settings, "1.1.0", container_id=None, ifname=None, netns=None, args=None)
    if hook is None:
        assert status.code == 1 and status.output["code"] == 50
    else:
        assert (status.code, status.stdout) == (0, "")
        hook.dataplane_programmed = False
        limited = call(wgcni, "STATUS", settings, "1.1.0", container_id=None, ifname=None, netns=None, args=None)
        assert limited.output["code"] == 51
    gc = call(wgcni, "GC", settings, "1.1.0", container_id=None, ifname=None, netns=None, args=None,
              extra={"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    assert (gc.code, gc.stdout) == (0, "")
    assert set(record_ips(settings)) == {"keep"}


@pytest.mark.parametrize("version", VERSIONS)
def test_version(wgcni, version):
    answer = run(wgcni, {"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": version}).encode())
    assert answer.code == 0 and answer.output == {"cniVersion": version, "supportedVersions": VERSIONS}


@pytest.mark.parametrize("stdin,code", [
    (b"{", 6), (b"", 6), (b"\xff", 6), (b"[" * 5000, 6), (b'{"a": NaN}', 6), (b'{"a": 1} x', 6),
    (b'{"cniVersion": "0.1.0", "name": "azure"}', 1), (b'{"cniVersion": "1.0.0"}', 7),
    (b'{"cniVersion": "1.0.0", "name": "azure", "logFile": "", '
     b'"prevResult": {"ips": [{"address": "10.0.0.1"}]}}', 7),
])
def test_bad_input_gets_an_error_object_and_no_traceback(wgcni, stdin, code):
    """In the bundle, where the process has imported nothing but the CNI path (unlike the in-process tests)."""
    answer = run(wgcni, cni_env("ADD"), stdin)
    assert answer.code == 1 and answer.output["code"] == code and "Traceback" not in answer.stdout


def test_the_binary_is_also_the_debug_cli(wgcni, settings):
    assert call(wgcni, "ADD", settings, "0.3.0", aks_prev_result("0.3.0")).code == 0
    env = {"PATH": "/nonexistent"}
    listed = subprocess.run([wgcni, "pods", "--state-dir", settings["stateDir"], "--json"], env=env,
                            capture_output=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    [pod] = json.loads(listed.stdout)
    assert (pod["podName"], pod["ips"]) == ("web-7d4b9c6f5-x2x9q", ["10.240.0.65"])
    wrong = subprocess.run([wgcni, "pods", "--nope"], env=env, capture_output=True, timeout=30)
    assert wrong.returncode == 2 and wrong.stdout == b""
    assert len(wrong.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in wrong.stderr


# -- the launcher (packaging/launcher.c) --------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(wgcni, tmp_path):
    """A copy of the whole bundle (executable + _internal/) that a test may damage."""
    copy = tmp_path / "wgcni-bundle"
    shutil.copytree(os.path.dirname(os.path.realpath(wgcni)), copy, symlinks=True)
    return copy


@pytest.mark.parametrize("missing,reason", [
    ("cni_plugin", "its Python modules are incomplete: No module named 'cni_plugin'"),
    ("encodings", "the Python runtime did not start"),
])
def test_a_damaged_bundle_says_so_to_the_runtime_and_on_one_stderr_line(bundle_copy, missing, reason):
    shutil.rmtree(bundle_copy / "_internal" / missing)
    process = subprocess.run([bundle_copy / "wgcni"], env={**cni_env("ADD"), "PATH": "/nonexistent"},
                             input=b"{}", capture_output=True, timeout=30)
    error = json.loads(process.stdout)
    assert process.returncode == 1 and error["code"] == 999, process.stdout
    assert error["msg"].startswith(f"wgcni cannot start: {reason}") and "reinstall wgcni" in error["details"]
    # CPython may print its path configuration first (it does when the stdlib is missing); the launcher's own
    # message is one line, and there is no traceback
    last = process.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"wgcni: {reason}") and b"Traceback" not in process.stderr
    cli = subprocess.run([bundle_copy / "wgcni", "status"], env={"PATH": "/nonexistent"}, capture_output=True,
                         timeout=30)
    assert cli.returncode == 1 and cli.stdout == b"" and cli.stderr.decode().strip().splitlines()[-1] == last


def test_the_bundle_ignores_python_variables_and_runs_through_any_symlink(wgcni, tmp_path):
    """kubelet's environment is not the bundle's: a PYTHONPATH/PYTHONHOME pointing at another cni_plugin changes
    nothing. /opt/cni/bin/wgcni is a symlink into /opt/wgcni: the launcher finds _internal/ from the real path."""
    shadow = tmp_path / "shadow" / "cni_plugin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise SystemExit('the shadowing cni_plugin was imported')\n")
    (shadow / "main.py").write_text("raise SystemExit('the shadowing cni_plugin was imported')\n")
    link = tmp_path / "opt-cni-bin" / "wgcni"
    link.parent.mkdir()
    link.symlink_to(wgcni)
    env = {"CNI_COMMAND": "VERSION", "PYTHONPATH": str(shadow.parent), "PYTHONHOME": str(shadow.parent),
           "PYTHONSTARTUP": str(shadow / "main.py"), "PYTHONINSPECT": "1"}
    answer = run(str(link), env, b'{"cniVersion": "1.0.0"}')
    assert answer.code == 0 and answer.output == {"cniVersion": "1.0.0", "supportedVersions": VERSIONS}


def test_the_launcher_loads_the_bundles_own_libpython(wgcni):
    """Not a libpython the node happens to have (Debian's python3-dev installs one): the executable's RPATH names
    _internal/, and the dynamic loader resolves every library of the bundle's from there."""
    internal = os.path.join(os.path.dirname(os.path.realpath(wgcni)), "_internal")
    linked = subprocess.run(["ldd", os.path.realpath(wgcni)], capture_output=True, text=True, timeout=30).stdout
    [libpython] = [line for line in linked.splitlines() if "libpython" in line]
    assert f"=> {internal}/libpython" in libpython, linked


# -- crash safety ---------------------------------------------------------------------------------------------------


def test_sigkill_at_random_instants_never_leaves_a_torn_record(wgcni, settings):
    """Kill ADDs of alternating content at random instants: the record is always the old or the new one."""
    store = RecordStore(settings["stateDir"])
    rng = random.Random(20261126)
    contents = [aks_prev_result("0.3.0"), aks_prev_result("0.3.0", dual_stack=True)]
    previous_ips = None
    outcomes = {"completed": 0, "killed": 0}
    record_path = os.path.join(settings["stateDir"], "pods", "azure", f"{CONTAINER_ID}@eth0.json")
    # Spread the kills over a whole run as long as one takes on this machine right now (load varies a lot).
    durations = []
    for _ in range(3):
        started = time.monotonic()
        assert call(wgcni, "ADD", settings, "0.3.0", contents[0], container_id="calibration").code == 0
        durations.append(time.monotonic() - started)
    window = 1.5 * sorted(durations)[1]
    for attempt in range(80):
        new_prev = contents[attempt % 2]
        stdin = plugin_stdin(AZURE_CONFLIST, "0.3.0", settings, new_prev)
        process = subprocess.Popen([wgcni], env={**cni_env("ADD"), "PATH": "/nonexistent"}, stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process.stdin.write(stdin)
        process.stdin.close()
        time.sleep(rng.uniform(0, window))  # spans start-up, the locked write and the notification
        process.send_signal(signal.SIGKILL)
        outcomes["completed" if process.wait() == 0 else "killed"] += 1
        if not os.path.exists(record_path):
            assert previous_ips is None, "a record that existed was lost"
            continue
        with open(record_path, "rb") as handle:
            raw = handle.read()
        record = json.loads(raw)  # never torn: always complete JSON
        assert record["ips"] in (["10.240.0.65"], ["10.240.0.65", "fd00:10:240::41"])
        if previous_ips is not None and record["ips"] != previous_ips:
            assert record["ips"] == [ip.split("/")[0] for ip in
                                     (entry["address"] for entry in new_prev["ips"])]
        previous_ips = record["ips"]
        assert store.read("azure", CONTAINER_ID, "eth0") is not None
    assert outcomes["killed"] >= 5 and outcomes["completed"] >= 1, outcomes  # the instants really were spread
    # The lock died with its holders, and the first writer once the sweep interval is over (as if it were) removes
    # any temp file they left.
    stamp = store.temp_sweep_stamp("azure")
    os.utime(stamp, (time.time() - TEMP_SWEEP_INTERVAL,) * 2)
    assert call(wgcni, "ADD", settings, "0.3.0", contents[0]).code == 0
    assert sorted(os.listdir(os.path.dirname(record_path))) == [f"{CONTAINER_ID}@eth0.json", "calibration@eth0.json"]


# -- concurrency ----------------------------------------------------------------------------------------------------


def test_200_concurrent_adds_and_dels_leave_exact_records(wgcni, settings):
    containers = [f"pod{index:03d}" for index in range(200)]

    def prev_for(index: int, generation: int) -> dict:
        prev = aks_prev_result("0.3.0")
        prev["ips"][0]["address"] = f"10.{generation}.{index // 250}.{index % 250 + 1}/16"
        return prev

    def invoke(job: tuple[str, int, int]) -> Run:
        command, index, generation = job
        prev = prev_for(index, generation) if command == "ADD" else None
        return call(wgcni, command, settings, "0.3.0", prev, container_id=containers[index])

    with FakeHook(settings["hookSocket"], settings["stateDir"]) as hook, ThreadPoolExecutor(max_workers=64) as pool:
        first = list(pool.map(invoke, [("ADD", index, 1) for index in range(200)]))
        assert [r.code for r in first] == [0] * 200
        assert len(record_ips(settings)) == 200
        # Half the pods go away while the other half are re-added with new IPs, all at once, in random order.
        jobs = [("DEL", index, 0) for index in range(0, 200, 2)] + [("ADD", index, 2) for index in range(1, 200, 2)]
        random.Random(7).shuffle(jobs)
        second = list(pool.map(invoke, jobs))
        assert [r.code for r in second] == [0] * 200
        expected = {containers[index]: [prev_for(index, 2)["ips"][0]["address"].split("/")[0]]
                    for index in range(1, 200, 2)}
        assert record_ips(settings) == expected
        # Every ADD and every DEL that removed a record notified the hook: answered, or given up after 250 ms
        # and logged (best effort on a loaded machine; the records above are the truth).
        given_up = open(settings["logFile"]).read().count("not delivered")
        assert len(hook.requests) + given_up >= 200 + 100 + 100
    directory = os.path.join(settings["stateDir"], "pods", "azure")
    assert not [name for name in os.listdir(directory) if name.startswith(".tmp")]
