#!/usr/bin/env bash
# Build the wgcni image without a container registry (`make image` runs it through wgcni_lab.image, which caches the
# result by content): the root file system from Debian packages (rootfs.sh), the two PyInstaller bundles of dist/
# laid out as packaging/Dockerfile lays them out, committed by buildah from scratch into an OCI archive.
#   image.sh OUT_DIR IMAGE_NAME     e.g. image.sh .build/image docker.io/library/wgcni:0.1.0
# Writes OUT_DIR/wgcni.oci.tar (the image, named IMAGE_NAME), OUT_DIR/packages.txt (Installed-Size in KiB per Debian
# package) and OUT_DIR/sizes.txt (KiB per part of the image). buildah keeps its storage in a temporary directory that
# is removed on exit, so nothing is left in /var/lib/containers.
set -euo pipefail

out="$(realpath -m "$1")"
name="$2"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
for bundle in wgcni wgcni-node; do
    [[ -x "$repo/dist/$bundle/$bundle" ]] || { echo "image.sh: dist/$bundle is missing: run \`make build\`" >&2; exit 2; }
done
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/wgcni-image.XXXXXX")"
# Each buildah call in a mount namespace of its own with an empty /var/lib: containers/image keeps a blob-info cache
# in /var/lib/containers/cache for root whatever --root says, and this build leaves nothing on the machine.
buildah=(unshare --mount --propagation private -- sh -c 'mount -t tmpfs wgcni-image /var/lib && exec "$@"' buildah
         buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
    "${buildah[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$here/rootfs.sh" "$work/rootfs.tar" "$out/packages.txt"
tree="$work/tree"
mkdir -p "$tree"
tar -xf "$work/rootfs.tar" -C "$tree"
rootfs_kib=$(du -sk "$tree" | cut -f1)
# The layout of packaging/Dockerfile (its COPY and ln -s lines; tests/install/test_install_image.py holds them equal).
mkdir -p "$tree/opt/wgcni" "$tree/usr/local/bin"
cp -a "$repo/dist/wgcni" "$tree/opt/wgcni/wgcni"
cp -a "$repo/dist/wgcni-node" "$tree/opt/wgcni/wgcni-node"
ln -s /opt/wgcni/wgcni/wgcni "$tree/usr/local/bin/wgcni"
ln -s /opt/wgcni/wgcni-node/wgcni-node "$tree/usr/local/bin/wgcni-node"
mkdir -p "$tree/tmp" "$tree/proc" "$tree/sys" "$tree/dev" "$tree/run"
chmod 1777 "$tree/tmp"
# The Dockerfile's smoke test: both commands of the DaemonSet start in the image's own file system.
chroot "$tree" /usr/local/bin/wgcni-node --help >/dev/null
chroot "$tree" /usr/local/bin/wgcni-node install-cni --help >/dev/null

container=$("${buildah[@]}" from --quiet scratch)
tar -C "$tree" -cf "$work/tree.tar" .
"${buildah[@]}" add --quiet "$container" "$work/tree.tar" / >/dev/null
"${buildah[@]}" config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd '["wgcni-node", "--help"]' \
    --label org.opencontainers.image.title=wgcni \
    --label "org.opencontainers.image.description=WireGuard encryption for AKS clusters running Azure CNI: chained CNI plugin and node hook" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    "$container"
"${buildah[@]}" commit --quiet --format oci --disable-compression=false --rm "$container" "oci-archive:$out/wgcni.oci.tar:$name" >/dev/null

{
    printf '%s\t%s\n' "$rootfs_kib" "Debian packages (packages.txt), pruned as rootfs.sh says"
    printf '%s\t%s\n' "$(du -sk "$repo/dist/wgcni-node" | cut -f1)" "/opt/wgcni/wgcni-node (hook bundle)"
    printf '%s\t%s\n' "$(du -sk "$repo/dist/wgcni" | cut -f1)" "/opt/wgcni/wgcni (plugin bundle)"
    printf '%s\t%s\n' "$(du -sk "$tree" | cut -f1)" "the image, unpacked"
    printf '%s\t%s\n' "$(du -sk "$out/wgcni.oci.tar" | cut -f1)" "the OCI archive (gzip-compressed layer)"
} > "$out/sizes.txt"
