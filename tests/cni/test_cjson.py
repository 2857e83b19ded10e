"""The plugin's start-up-cheap replacements agree with the standard library they stand in for.

cni_plugin.cjson (strict JSON over CPython's _json) is checked against json, and the commands' address parser
(inet_pton/inet_ntop) against ipaddress, on arbitrary input.
"""

from __future__ import annotations

import ipaddress
import json
import math
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_plugin import cjson
from cni_plugin.commands import format_host, parse_cidr_host

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
MANY = settings(max_examples=400, deadline=None)


@MANY
@given(json_values, st.booleans())
def test_dumps_matches_json(value, sort_keys):
    assert cjson.dumps(value, sort_keys=sort_keys) == json.dumps(value, sort_keys=sort_keys, separators=(",", ":"),
                                                                 allow_nan=False)


@MANY
@given(json_values, st.sampled_from(["", " ", "\n\t ", "\r\n"]))
def test_loads_round_trips_what_json_writes(value, padding):
    text = padding + json.dumps(value, indent=1) + padding
    assert cjson.loads(text) == json.loads(text)
    assert cjson.loads(text.encode()) == json.loads(text)


def outcome(parse, data):
    try:
        return "ok", parse(data)
    except (ValueError, RecursionError) as error:
        return "error", type(error).__name__ if isinstance(error, RecursionError) else "ValueError"


@MANY
@given(st.text(alphabet=st.sampled_from(list('{}[]",:0123456789.eE+-truefalsnl \\\t\nabc')), max_size=40))
def test_loads_accepts_and_refuses_exactly_what_json_does(text):
    expected = outcome(lambda t: json.loads(t, parse_constant=lambda c: math.nan), text)
    assert outcome(cjson.loads, text) == expected


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}'])
def test_loads_refuses_non_finite_constants(text):
    with pytest.raises(ValueError):
        cjson.loads(text)


def test_dumps_refuses_non_finite_floats_and_foreign_types():
    with pytest.raises(ValueError):
        cjson.dumps([math.inf])
    with pytest.raises(TypeError):
        cjson.dumps({"a": object()})


def test_loads_refuses_invalid_utf8_and_byte_order_marks():
    with pytest.raises(ValueError):
        cjson.loads(b'{"a": "\xff"}')
    with pytest.raises(ValueError):
        cjson.loads("\ufeff{}".encode())


def reference_host(cidr: str):
    try:
        interface = ipaddress.ip_interface(cidr)
    except ValueError:
        return None
    if interface.version == 6 and (interface.ip.ipv4_mapped or interface.ip.scope_id):
        return "skip"  # printed differently by ipaddress in 3.11 (hex tail); both forms are the same address
    return str(interface.ip)


addresses = (
    st.ip_addresses().map(str) | st.text(alphabet=st.sampled_from(list("0123456789abcdef.:")), max_size=20)
)
prefixes = st.integers(-1, 130).map(str) | st.sampled_from(["", "x", "+8", "08", "٣", " 8"])


@MANY
@given(addresses, prefixes)
def test_address_parser_agrees_with_ipaddress(address, prefix):
    cidr = f"{address}/{prefix}"
    expected = reference_host(cidr)
    if expected == "skip":
        return
    parsed = parse_cidr_host(cidr)
    if expected is None:
        assert parsed is None, cidr
        return
    assert parsed is not None, cidr
    assert format_host(*parsed) == expected


@pytest.mark.parametrize("cidr", ["10.240.0.65", "10.240.0.65/", "10.240.0.65/33", "fd00::5/129", "1.2.3/8",
                                  "01.2.3.4/8", "fe80::1%eth0/64", "10.0.0.1/+8", "10.0.0.1/ 8"])
def test_address_parser_refuses(cidr):
    assert parse_cidr_host(cidr) is None


def test_syntax_errors_are_reported_in_a_process_that_never_imported_json():
    """_json finds JSONDecodeError only in sys.modules: the plugin's process has not imported json."""
    code = ("import sys; from cni_plugin import cjson\n"
            "assert 'json' not in sys.modules\n"
            "try:\n    cjson.loads(b'{\"a\": }')\n"
            "except ValueError as error:\n    print(type(error).__name__, error)\n")
    repo = str(pathlib.Path(__file__).resolve().parents[2])
    process = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": repo}, capture_output=True,
                             text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("JSONDecodeError Expecting value")


@pytest.mark.parametrize("address", ["::1:0", "::ffff:102:304", "fd00::5", "10.240.0.65"])
def test_host_addresses_are_printed_as_ipaddress_prints_them(address):
    parsed = parse_cidr_host(f"{address}/64" if ":" in address else f"{address}/16")
    assert parsed is not None and format_host(*parsed) == str(ipaddress.ip_address(address))
