#!/usr/bin/env bash
# The wgcni image's root file system: the Debian 12 packages of packaging/image-packages.txt and their dependencies,
# unpacked by `mmdebstrap --variant=extract --mode=chrootless` (no chroot, no mounts, no maintainer scripts; no dpkg,
# apt or shell in the result), without documentation, man pages, locales and glibc's iconv modules. `make image`
# (packaging/image.sh) and packaging/Dockerfile both run it, so the two images hold the same packages.
#   rootfs.sh OUT.tar [SIZES.txt] [MIRROR]
# SIZES.txt gets one line per package: its Installed-Size in KiB and its name and version (the cost of each part).
set -euo pipefail

if [[ "${1:-}" == "--prune" ]]; then  # mmdebstrap's extract hook: $2 = SIZES.txt, $3 = the unpacked tree
    sizes="$2" root="$3"
    for deb in "$root"/var/cache/apt/archives/*.deb; do  # still there: the cleanup runs after the hooks
        dpkg-deb --showformat='${Installed-Size}\t${Package} ${Version}\n' --show "$deb"
    done | sort -rn > "$sizes"
    rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,bash-completion,zsh}
    rm -rf "$root"/usr/lib/*-linux-gnu/gconv  # glibc's iconv modules: nothing in the image calls iconv
    mkdir -p "$root/usr/local/bin"
    for applet in sh unshare mount; do  # the three busybox applets the hook runs (image-packages.txt)
        ln -sf /bin/busybox "$root/usr/local/bin/$applet"
    done
    exit 0
fi

out="$1"
sizes="$(realpath -m "${2:-/dev/null}")"
mirror="${3:-http://deb.debian.org/debian}"
here="$(cd "$(dirname "$0")" && pwd)"
packages="$(sed -e 's/#.*//' "$here/image-packages.txt" | xargs | tr ' ' ',')"
[[ -n "$packages" ]] || { echo "rootfs.sh: no packages in $here/image-packages.txt" >&2; exit 2; }

mmdebstrap --quiet --mode=chrootless --variant=extract --include="$packages" \
    --extract-hook="'$here/rootfs.sh' --prune '$sizes' \"\$1\"" \
    bookworm "$out" "$mirror" "deb $mirror-security bookworm-security main"
[[ -s "$out" ]] || { echo "rootfs.sh: mmdebstrap made no root file system" >&2; exit 1; }
