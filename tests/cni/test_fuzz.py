"""Property-based fuzzing of the plugin's stdin and environment (hypothesis).

Whatever arrives, the dispatcher answers with exactly one JSON object on stdout: a result on success, or a CNI
error object with a spec or wgcni code (never the internal-error code, never a traceback), and a failed call
leaves every record byte-for-byte as it was. The plugin's own paths (stateDir, logFile, hookSocket) are pinned
to a private temp dir so that no fuzzed value can point the plugin at the host's files.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni_plugin.cni import dispatch
from tests.cni.helpers import AZURE_CONFLIST, CONTAINER_ID, aks_prev_result, cni_env, plugin_stdin, record_files

EXPECTED_ERROR_CODES = {1, 3, 4, 5, 6, 7, 11, 50, 51, 100, 101, 102}
COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"]
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

env_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)



def env_value(*typical: str) -> st.SearchStrategy:
    """Mostly a value a runtime would pass, sometimes arbitrary text, sometimes unset (None)."""
    return st.sampled_from(typical) | env_text | st.none()


environments = st.fixed_dictionaries({
    "CNI_COMMAND": st.sampled_from(COMMANDS + ["", "add", "REPAIR"]),
    "CNI_CONTAINERID": env_value(CONTAINER_ID, "other"),
    "CNI_IFNAME": env_value("eth0", "net1"),
    "CNI_NETNS": env_value("/var/run/netns/x", ""),
    "CNI_ARGS": env_value("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", "IgnoreUnknown=1", ""),
    "CNI_PATH": env_value("/opt/cni/bin"),
}).map(lambda env: {key: value for key, value in env.items() if value is not None})

CONF_KEYS = ["cniVersion", "name", "type", "prevResult", "logLevel", "cni.dev/valid-attachments", "runtimeConfig"]
PREV_KEYS = ["cniVersion", "interfaces", "ips", "routes", "dns"]


@st.composite
def mutated_configs(draw) -> dict:
    """A valid AKS config of some version with some of its keys (and prevResult's) replaced or dropped."""
    version = draw(st.sampled_from(VERSIONS))
    conf = json.loads(plugin_stdin(AZURE_CONFLIST, version, {}, aks_prev_result(version)))
    for key in draw(st.lists(st.sampled_from(CONF_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            conf.pop(key, None)
        else:
            conf[key] = draw(json_values | st.sampled_from(VERSIONS))
    if isinstance(conf.get("prevResult"), dict):
        prev = conf["prevResult"]
        for key in draw(st.lists(st.sampled_from(PREV_KEYS), max_size=2, unique=True)):
            prev[key] = draw(json_values)
        if draw(st.booleans()) and isinstance(prev.get("ips"), list) and prev["ips"]:
            prev["ips"][0] = {"address": draw(st.text(max_size=45))}
    return conf


def pinned(conf: object, state_dir: str) -> bytes:
    if isinstance(conf, dict):
        conf = {**conf, "stateDir": state_dir + "/state", "logFile": state_dir + "/wgcni.log",
                "hookSocket": state_dir + "/hook.sock"}
    return json.dumps(conf).encode()


def run_and_check(env: dict, stdin: bytes, state_dir: str) -> None:
    seed = plugin_stdin(AZURE_CONFLIST, "1.0.0", {"stateDir": state_dir + "/state", "logFile": ""},
                        aks_prev_result("1.0.0"))
    assert dispatch(cni_env("ADD"), io.BytesIO(seed), io.StringIO()) == 0
    before = record_files(state_dir + "/state")
    stdout = io.StringIO()
    code = dispatch(env, io.BytesIO(stdin), stdout)
    raw = stdout.getvalue()
    assert "Traceback" not in raw
    event(f"{env['CNI_COMMAND'] if env['CNI_COMMAND'] in COMMANDS else 'other'} exit {code}"
          + (f" code {json.loads(raw)['code']}" if code else ""))
    if code == 0:
        assert env["CNI_COMMAND"] in COMMANDS
        assert raw == "" or isinstance(json.loads(raw), dict)
        return
    assert code == 1
    error = json.loads(raw)
    assert set(error) == {"cniVersion", "code", "msg", "details"}, error
    assert error["code"] in EXPECTED_ERROR_CODES, error
    assert isinstance(error["msg"], str) and error["msg"] and isinstance(error["details"], str)
    assert error["cniVersion"] in VERSIONS
    assert record_files(state_dir + "/state") == before


# 100 inputs per test in `make test`; WGCNI_FUZZ_EXAMPLES=N runs a longer campaign.
FUZZ = settings(max_examples=int(os.environ.get("WGCNI_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(env=environments, stdin=st.binary(max_size=300))
def test_arbitrary_bytes_on_stdin(env, stdin):
    with tempfile.TemporaryDirectory(prefix="wgcni-fuzz-") as state_dir:
        run_and_check(env, stdin, state_dir)


@FUZZ
@given(env=environments, conf=json_values)
def test_arbitrary_json_on_stdin(env, conf):
    with tempfile.TemporaryDirectory(prefix="wgcni-fuzz-") as state_dir:
        run_and_check(env, pinned(conf, state_dir), state_dir)


@FUZZ
@given(env=environments, conf=mutated_configs())
def test_mutated_aks_configurations(env, conf):
    with tempfile.TemporaryDirectory(prefix="wgcni-fuzz-") as state_dir:
        run_and_check(env, pinned(conf, state_dir), state_dir)
