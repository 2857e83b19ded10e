"""Layering check: the plugin's CNI path (ADD/DEL/CHECK/VERSION/STATUS/GC) loads only the standard library.

kubelet runs the plugin on every pod start and stop, so its start-up must stay cheap and it must never pull in
node_hook, pyroute2, kubernetes or click. Checked twice: statically over the import graph (AST) of the modules
reachable from the CNI entry, and dynamically by running the CNI path in a fresh interpreter with ``-X importtime``
and looking at what it actually imported.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = REPO / "cni_plugin"
CNI_ENTRY_MODULES = ["cni_plugin.cni"]  # main.py hands the CNI path to cni.dispatch; main.py itself is checked apart
FORBIDDEN = {"node_hook", "pyroute2", "kubernetes", "click", "nacl", "yaml", "prometheus_client", "wgcni_lab"}


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports anywhere in its source (module level and inside functions)."""
    path = PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: use absolute imports"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE / alias.name).with_suffix(".py").exists() and node.module == "cni_plugin")
    return found


def reachable_from(entries: list[str]) -> tuple[set[str], set[str]]:
    """(cni_plugin modules reachable from ``entries``, the external modules they import)."""
    seen, external, todo = set(), set(), list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in imports_of(module):
            if imported == "cni_plugin":
                continue
            if imported.startswith("cni_plugin."):
                todo.append(imported)
            else:
                external.add(imported)
    return seen, external


def test_the_cni_path_imports_only_the_standard_library_statically():
    modules, external = reachable_from(CNI_ENTRY_MODULES)
    assert {"cni_plugin.cni", "cni_plugin.commands", "cni_plugin.records", "cni_plugin.notify"} <= modules
    assert "cni_plugin.cli" not in modules
    non_stdlib = {name for name in external if name.split(".")[0] not in sys.stdlib_module_names}
    assert non_stdlib == set(), f"the CNI path imports {sorted(non_stdlib)}"


def test_the_entry_module_loads_the_cli_only_outside_the_cni_branch():
    tree = ast.parse((PACKAGE / "main.py").read_text())
    module_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert module_level <= set(sys.stdlib_module_names)
    [main] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    [cni_branch] = [node for node in main.body if isinstance(node, ast.If)]
    branch_imports = {node.module for node in ast.walk(cni_branch) if isinstance(node, ast.ImportFrom)}
    assert branch_imports == {"cni_plugin.cni"}
    last = cni_branch.body[-1]  # the branch ends the process, so control never reaches the CLI import below it
    assert isinstance(last, ast.Expr) and ast.unparse(last.value).startswith("posix._exit(")


def test_the_forbidden_list_is_real():
    """Guard against a check that cannot fail: the CLI does import click, and the static walk sees it."""
    _, external = reachable_from(["cni_plugin.cli"])
    assert "click" in external


def run_cni_path(command: str, stdin: dict, tmp_path: pathlib.Path) -> set[str]:
    """The modules one CNI command loads, started as packaging/launcher.c starts it: no site, no PYTHON* variables,
    ``cni_plugin.main`` imported (not run with ``-m``, whose runpy would load ``os`` and more itself)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
        "CNI_CONTAINERID": "layering", "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x",
        "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
    }
    launch = f"import sys; sys.path.insert(0, {str(REPO)!r}); from cni_plugin.main import main; main()"
    process = subprocess.run(
        [sys.executable, "-S", "-E", "-X", "importtime", "-c", launch], input=json.dumps(stdin).encode(),
        env=env, capture_output=True, timeout=60,
    )
    assert process.returncode == 0, process.stdout.decode() + process.stderr.decode()
    loaded = set()
    for line in process.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                loaded.add(name)
    assert loaded, "no -X importtime output: the check would be vacuous"
    return loaded


def netconf(command: str, tmp_path: pathlib.Path) -> dict:
    conf = {"cniVersion": "1.1.0", "name": "azure", "type": "wgcni", "stateDir": str(tmp_path / "state"),
            "hookSocket": str(tmp_path / "hook.sock"), "logFile": str(tmp_path / "wgcni.log"),
            "cni.dev/valid-attachments": []}
    if command in ("ADD", "CHECK"):
        conf["prevResult"] = {"cniVersion": "1.1.0", "ips": [{"address": "10.240.0.65/16"}]}
    return conf


@pytest.mark.parametrize("command", ["VERSION", "ADD", "DEL", "GC", "CHECK"])
def test_the_cni_path_imports_only_the_standard_library_at_run_time(command, tmp_path):
    conf = netconf(command, tmp_path)
    if command == "CHECK":
        run_cni_path("ADD", conf, tmp_path)
    loaded = run_cni_path(command, conf, tmp_path)
    outside = {name for name in loaded if name.split(".")[0] not in sys.stdlib_module_names
               and name.split(".")[0] != "cni_plugin"}
    assert outside == set(), f"{command} loaded {sorted(outside)}"
    assert not {name.split(".")[0] for name in loaded} & FORBIDDEN
    assert "cni_plugin.cli" not in loaded
    if command != "VERSION":
        assert "cni_plugin.commands" in loaded


# Pure-Python modules each ADD/DEL would pay for at start-up (docs/benchmarks.md, P1): os alone is >1 ms
HEAVY_FOR_START_UP = {"os", "_collections_abc", "struct", "__future__", "json", "re", "socket", "ipaddress",
                      "logging", "typing", "subprocess"}


@pytest.mark.parametrize("command", ["VERSION", "ADD", "DEL"])
def test_the_pod_path_on_a_node_that_has_its_directories_loads_no_heavy_module(command, tmp_path):
    run_cni_path("ADD", netconf("ADD", tmp_path), tmp_path)  # the first ADD on a node creates the state directories
    loaded = run_cni_path(command, netconf(command, tmp_path), tmp_path)
    assert "cni_plugin.commands" in loaded or command == "VERSION"
    assert loaded & HEAVY_FOR_START_UP == set()


def test_the_heavy_module_check_is_real(tmp_path):
    """The first ADD on a node creates its directories with os.makedirs: the check above sees that import."""
    assert "os" in run_cni_path("ADD", netconf("ADD", tmp_path), tmp_path)
