#!/usr/bin/env bash
# Build the tla image where tla itself is not installed (a CI job, a build host): the same command
# that `tla image build` runs (tests/test_container.py checks that the two agree).
#
#   docker/build.sh [--dry-run] [TAG] [-- ENGINE_ARGS...]       (default TAG: tla:VERSION)
#
# Environment:
#   ENGINE      docker, podman or buildah (default: the first installed; docker only with a daemon)
#   BASE_IMAGE  the base image (default: the Dockerfile's official PyTorch image)
#   CA_BUNDLE   a CA bundle pip needs to reach its index, passed as the build secret `pip_cert`
#               (mounted for the RUN steps only, never stored in the image)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
tag=
if [ $# -gt 0 ] && [ "$1" != -- ]; then tag=$1; shift; fi
if [ "${1:-}" = -- ]; then shift; fi

version=$(sed -n -E 's/^__version__ = "([^"]+)"$/\1/p' "$ROOT/tla_jobs/__init__.py")
[ -n "$version" ] || { echo "build.sh: no __version__ in $ROOT/tla_jobs/__init__.py" >&2; exit 2; }
tag=${tag:-tla:$version}
base=${BASE_IMAGE:-$(sed -n -E 's/^ARG BASE_IMAGE=(.+)$/\1/p' "$ROOT/Dockerfile")}

commit=unknown
if command -v git >/dev/null && head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
    commit=$head
    if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit=$head-dirty; fi
fi

engine=${ENGINE:-}
if [ -z "$engine" ]; then
    for e in docker podman buildah; do
        command -v "$e" >/dev/null || continue
        if [ "$e" = docker ] && [ -z "$(docker version --format '{{.Server.Version}}' 2>/dev/null)" ]; then
            continue  # a docker client with no daemon behind it
        fi
        engine=$e
        break
    done
fi
[ -n "$engine" ] || { echo "build.sh: no container engine found: install docker, podman or buildah" >&2; exit 2; }

cmd=("$engine" build)
case $engine in podman | buildah) cmd+=(--format docker) ;; esac  # the OCI format drops SHELL
cmd+=(-f "$ROOT/Dockerfile" -t "$tag"
      --build-arg "BASE_IMAGE=$base" --build-arg "TLA_VERSION=$version" --build-arg "GIT_COMMIT=$commit")
if [ -n "${CA_BUNDLE:-}" ]; then cmd+=(--secret "id=pip_cert,src=$CA_BUNDLE"); fi
cmd+=("$@" "$ROOT")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo
    exit 0
fi
printf '+ %s\n' "${cmd[*]}" >&2
"${cmd[@]}"
echo "built $tag"
