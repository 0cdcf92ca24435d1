#!/usr/bin/env bash
# Build a local stand-in for the official PyTorch base image, with no registry at all.
#
#   docker/make-standin-base.sh [TAG]      (default TAG: localhost/tla-standin-base:torch2.14.1)
#
# The real Dockerfile starts FROM pytorch/pytorch:...-runtime. Our CI and dev machines reach no
# container registry, only the Debian and PyPI package mirrors, so the container tests build the real
# Dockerfile on top of this stand-in instead. It has the same shape as the PyTorch image where the
# Dockerfile cares: a Python environment in /opt/conda (first on PATH) that already holds torch and
# torchvision, `pip` in it, root as the user, /workspace as the working directory.
#
#   1. debootstrap --variant=minbase bookworm (python3, python3-pip, python3-venv) from the Debian
#      mirror of /etc/apt/sources.list*, `podman import` -> localhost/tla-standin-rootfs:bookworm
#   2. podman build docker/standin/Containerfile: a venv in /opt/conda with torch==2.14.1 and
#      torchvision==0.29.1 (bookworm's python3 is 3.11, like the wheels), installed from this
#      machine's local wheel folders (pip's find-links / extra-index-url, see `pip config list`),
#      which are mounted into that one build with `podman build -v`, as is the host's CA bundle.
#      Neither is copied into any image.
#
# Cached: when TAG already exists nothing is done (and the rootfs image is reused when only step 2 is
# missing). Needs root; installs podman, runc, catatonit and debootstrap with apt-get when missing.
# Podman settings come from docker/containers.conf (CONTAINERS_CONF), not from /etc.
#
# Environment: TORCH_VERSION, TORCHVISION_VERSION, DEBIAN_MIRROR, STANDIN_PIP_ARGS (extra pip
# arguments, e.g. "--index-url URL"), HOST_CA_BUNDLE.
set -euo pipefail

TAG=${1:-localhost/tla-standin-base:torch2.14.1}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
SUITE=bookworm
ROOTFS_TAG=localhost/tla-standin-rootfs:$SUITE
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

say() { printf '[standin] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, podman import)"

install_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    # the init process of `podman run --init` (the podman runtime of SLURM profiles uses it)
    [ -x /usr/libexec/podman/catatonit ] || [ -x /usr/bin/catatonit ] || missing+=(catatonit)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # wait for another apt-get (the SLURM test cluster installs its packages too) instead of failing
    local apt=(apt-get -q -o DPkg::Lock::Timeout=600)
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        "${apt[@]}" update >/dev/null
        "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
    }
}

# The Debian mirror apt already uses (deb822 .sources or one-line .list), for the bookworm suite.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u = ""; ok = 0; next }
            /^URIs:/   { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END        { if (u != "" && ok) print u }' "$f" | head -n1)
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == suite) print $i; break } }' "$f" | head -n1)
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    echo http://deb.debian.org/debian
}

# pip's local package sources on this machine: prints "find-links|index URL" items, one a line.
pip_sources() {
    local py
    py=$(command -v python3 || true)
    [ -n "$py" ] || return 0
    "$py" -m pip config list 2>/dev/null | sed -n -E "s/^[^.]*\.(find-links|extra-index-url|index-url)='(.*)'$/\1 \2/p" | sort -u || true
}

build_rootfs() {
    if podman image exists "$ROOTFS_TAG"; then
        say "rootfs image $ROOTFS_TAG exists, reusing it"
        return
    fi
    local mirror work start=$SECONDS
    mirror=$(debian_mirror)
    work=$(mktemp -d /var/tmp/tla-standin.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    say "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        "$SUITE" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        die "debootstrap failed"
    }
    rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb
    say "debootstrap took $((SECONDS - start)) s; importing it as $ROOTFS_TAG"
    tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$ROOTFS_TAG" >/dev/null
    rm -rf "$work"
    trap - EXIT
}

build_standin() {
    local start=$SECONDS find_links=() indexes=() volumes=() kind value item path ca
    while read -r kind value; do
        [ -n "$kind" ] || continue
        for item in $value; do
            path=${item#file://}
            if [ "$path" != "$item" ] || [ "${item:0:1}" = / ]; then
                [ -e "$path" ] || continue
                # A file:// simple index links to its wheels with ../../files/...: mount its parent.
                if [ "$kind" = find-links ]; then volumes+=(-v "$path:$path:ro")
                else volumes+=(-v "$(dirname "$path"):$(dirname "$path"):ro"); fi
            fi
            case $kind in
                find-links) find_links+=("$item") ;;
                *) indexes+=("$item") ;;
            esac
        done
    done < <(pip_sources)
    ca=${HOST_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
    local ca_args=()
    if [ -f "$ca" ]; then
        ca_args=(-v "$ca:/run/host-ca-bundle.crt:ro" --build-arg PIP_CERT_PATH=/run/host-ca-bundle.crt)
    fi
    say "building $TAG: torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" \
        "(find-links: ${find_links[*]:-none}; extra indexes: ${indexes[*]:-none})"
    # --network=host: no CNI/netavark network is set up here; pip reaches its indexes as the host does
    podman build --format docker --pull=never --layers=false --network=host -t "$TAG" \
        --build-arg "BASE=$ROOTFS_TAG" \
        --build-arg "TORCH_VERSION=$TORCH_VERSION" \
        --build-arg "TORCHVISION_VERSION=$TORCHVISION_VERSION" \
        --build-arg "FIND_LINKS=${find_links[*]}" \
        --build-arg "EXTRA_INDEX_URLS=${indexes[*]}" \
        --build-arg "EXTRA_PIP_ARGS=${STANDIN_PIP_ARGS:-}" \
        "${ca_args[@]}" "${volumes[@]}" \
        -f "$HERE/standin/Containerfile" "$HERE/standin"
    say "stand-in build took $((SECONDS - start)) s"
}

install_tools
if podman image exists "$TAG"; then
    say "$TAG exists (cached): nothing to do"
    exit 0
fi
# One builder at a time (two test sessions starting together).
exec 9>/var/lock/tla-standin-base.lock
flock 9
if podman image exists "$TAG"; then
    say "$TAG exists (built meanwhile): nothing to do"
    exit 0
fi
build_rootfs
build_standin
say "ready: $TAG"
