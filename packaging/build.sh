#!/usr/bin/env bash
# Build the self-contained binaries with PyInstaller; `make build` runs `PY=.venv/bin/python bash packaging/build.sh`.
#   dist/wgcni/       the CNI plugin bundle (executable `wgcni` + _internal/), dist/bin/wgcni -> ../wgcni/wgcni;
#                     its executable is packaging/launcher.c, compiled against the bundle's libpython in place of
#                     PyInstaller's bootloader (the start-up kubelet pays per pod; docs/benchmarks.md, "P1")
#   dist/wgcni-node/  the node hook bundle, dist/bin/wgcni-node -> ../wgcni-node/wgcni-node
#                     (built once node_hook/cli.py exists)
# Each bundle is built into a temporary directory and swapped in only when complete, so a failed build never leaves
# a half-written bundle behind, and a bundle is rebuilt only when its inputs changed (sources, spec, this script).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DIST=dist
WORK=build/pyinstaller

inputs_digest() {  # $1 = spec; prints a digest of everything the bundle is built from
    local spec="$1"; shift
    {
        "$PY" -c 'import sys; print(sys.version)'
        "$PY" -m PyInstaller --version
        sha256sum "$spec" packaging/build.sh packaging/launcher.c pyproject.toml
        find "$@" -name '*.py' -type f -print0 | sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}

compile_launcher() {  # $1 = bundle directory; replaces its bootloader with packaging/launcher.c
    local bundle="$1" include libpython
    include="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("INCLUDEPY"))')"
    libpython="$(cd "$bundle/_internal" && ls libpython3*.so.*)"
    # RPATH, not RUNPATH (--disable-new-dtags): it also serves the libraries of extension modules loaded later
    gcc -O2 -Wall -Wextra -Werror -I"$include" -o "$bundle/wgcni.launcher" packaging/launcher.c \
        -L"$bundle/_internal" -l:"$libpython" -Wl,--disable-new-dtags,-rpath,'$ORIGIN/_internal'
    mv "$bundle/wgcni.launcher" "$bundle/wgcni"
}

build_bundle() {  # $1 = bundle name, $2 = spec, rest = source trees it is built from
    local name="$1" spec="$2"; shift 2
    local digest stamp="$DIST/$name/.inputs-sha256"
    digest="$(inputs_digest "$spec" "$@")"
    if [[ -x "$DIST/$name/$name" && -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
        echo "build: $DIST/$name is up to date"
    else
        echo "build: $DIST/$name (pyinstaller $spec)"
        local staging="$DIST/.staging-$name"
        rm -rf "$staging"
        "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
            --distpath "$staging" --workpath "$WORK/$name" "$spec"
        if [[ "$name" == wgcni ]]; then
            compile_launcher "$staging/$name"
        fi
        echo "$digest" > "$staging/$name/.inputs-sha256"
        rm -rf "$DIST/$name.old"
        if [[ -e "$DIST/$name" ]]; then mv "$DIST/$name" "$DIST/$name.old"; fi
        mv "$staging/$name" "$DIST/$name"
        rm -rf "$staging" "$DIST/$name.old"
    fi
    mkdir -p "$DIST/bin"
    ln -sfn "../$name/$name" "$DIST/bin/$name"
}

build_bundle wgcni packaging/wgcni.spec cni_plugin
if [[ -f node_hook/cli.py ]]; then
    build_bundle wgcni-node packaging/wgcni-node.spec node_hook cni_plugin
else
    echo "build: node_hook/cli.py does not exist yet; skipping wgcni-node"
fi

# Smoke test: the plugin answers VERSION without Python on PATH (it carries its own interpreter).
echo '{"cniVersion":"1.1.0"}' | env -i CNI_COMMAND=VERSION "$DIST/bin/wgcni" | grep -q '"supportedVersions"'
echo "build: done ($DIST/bin: $(ls "$DIST/bin" | tr '\n' ' '))"
