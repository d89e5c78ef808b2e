#!/bin/sh
# Assembles the root file system of a kubeha image: the image's programs and
# every shared library they load, nothing else (no package manager, no
# /etc/passwd).
#
#   images/rootfs.sh OUT IMAGE [BINDIR]
#
# IMAGE is operator or agent; BINDIR holds the release binaries (default
# target/release). The programs of each image are listed below, in one place:
# - operator: kubeha-operator;
# - agent: kubeha-agent; nft (Debian's nftables), which the packet fence runs
#   (`nft -f -`, node-agent/src/vip/packet_fence.rs); busybox (static) as
#   /bin/sh with its applets, for hook scripts when the chart runs hooks
#   inside the container (with the default, hooks run in the host's mount
#   namespace and use the host's shell).
# The kubeha binaries go to /usr/local/bin, stripped; host programs keep
# their paths. The libraries are the ones `ldd` lists, copied (symlinks
# resolved) to the paths ldd names, the dynamic loader included; the loader
# finds them in its built-in search path (no ld.so.cache).
#
# Both image builds run this script: the Dockerfiles' build stage (on a
# Debian 12 builder image) and `cargo xtask images` (on this Debian 12 host),
# so an image built either way has the same files.
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 OUT operator|agent [BINDIR]" >&2
    exit 2
fi
out=$1
image=$2
bindir=${3:-target/release}
mkdir -p "$out"

# Copies file $1 to $out$2 (dereferenced), creating the directories.
put() {
    mkdir -p "$out$(dirname "$2")"
    cp -L "$1" "$out$2"
}

# Copies the shared libraries of ELF file $1.
libs() {
    # ldd prints "name => /path (addr)", "/path (addr)" or "name (addr)"
    # (the vDSO, which has no file).
    ldd "$1" 2>/dev/null | while read -r first second third _; do
        case "$second" in
        "=>") lib=$third ;;
        *) lib=$first ;;
        esac
        case "$lib" in
        /*) [ -e "$out$lib" ] || put "$lib" "$lib" ;;
        esac
    done
}

# Copies the kubeha binary kubeha-$1 to /usr/local/bin, stripped.
kubeha() {
    put "$bindir/kubeha-$1" "/usr/local/bin/kubeha-$1"
    if command -v strip >/dev/null; then
        strip --strip-unneeded "$out/usr/local/bin/kubeha-$1"
    fi
    libs "$out/usr/local/bin/kubeha-$1"
}

# Copies installed program $1 (found on PATH) to the same path.
host() {
    path=$(command -v "$1") || {
        echo "$0: $1 is not installed" >&2
        exit 1
    }
    put "$path" "$path"
    libs "$out$path"
}

case "$image" in
operator)
    kubeha operator
    ;;
agent)
    kubeha agent
    PATH=$PATH:/usr/sbin:/sbin host nft
    host busybox
    mkdir -p "$out/bin"
    for applet in $(busybox --list); do
        [ -e "$out/bin/$applet" ] || ln -s "$(command -v busybox)" "$out/bin/$applet"
    done
    ;;
*)
    echo "$0: unknown image $image (operator or agent)" >&2
    exit 2
    ;;
esac

# Scratch space for programs that want a writable /tmp (the chart mounts an
# emptyDir over it; the root file system is read-only there).
mkdir -p "$out/tmp"
chmod 1777 "$out/tmp"
