#!/usr/bin/env bash
# Convert the tla image once onto shared storage, for clusters whose nodes should not each pull it
# (the same commands `tla image convert` runs):
#
#   docker/convert.sh [--dry-run] enroot    IMAGE DEST.sqsh     for Pyxis:     srun --container-image=DEST.sqsh
#   docker/convert.sh [--dry-run] apptainer IMAGE DEST.sif      for Apptainer: apptainer exec --nv DEST.sif
#
# IMAGE is a local image (name:tag, in the docker daemon, else in podman's storage; ENGINE=docker|podman
# chooses) or a registry image as docker://REGISTRY/NAME:TAG. Run it where enroot or apptainer is
# installed (a login or build node of the cluster).
set -euo pipefail

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
[ $# -eq 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
target=$1 image=$2 dest=$3

engine=${ENGINE:-}
if [ -z "$engine" ] && [[ $image != docker://* ]]; then
    if command -v docker >/dev/null && [ -n "$(docker version --format '{{.Server.Version}}' 2>/dev/null)" ]; then
        engine=docker
    else
        engine=podman
    fi
fi

# step CMD...: print it (--dry-run), or show and run it. Arguments stay arguments: no eval, no word splitting.
step() {
    if [ "$dry_run" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; return; fi
    printf '+ %s\n' "$*" >&2
    "$@"
}

case $target in
    enroot | sqsh)
        if [[ $image == docker://* ]]; then
            ref=${image#docker://} first=${image#docker://}
            first=${first%%/*}
            # enroot spells a registry image REGISTRY#NAME:TAG
            if [[ $ref != *'#'* && $ref == */* && ( $first == *.* || $first == *:* || $first == localhost ) ]]; then
                ref="$first#${ref#*/}"
            fi
            src="docker://$ref"
        elif [ "$engine" = docker ]; then src="dockerd://$image"
        else src="podman://$image"; fi
        step enroot import --output "$dest" "$src"
        ;;
    apptainer | sif)
        if [[ $image == docker://* ]]; then
            step apptainer build "$dest" "$image"
        elif [ "$engine" = docker ]; then
            step apptainer build "$dest" "docker-daemon://$image"
        else  # apptainer cannot read podman's storage: an OCI archive beside DEST, removed afterwards
            archive="$dest.oci.tar"
            trap 'rm -f -- "$archive"' EXIT
            step podman save --format oci-archive -o "$archive" "$image"
            step apptainer build "$dest" "oci-archive:$archive"
        fi
        ;;
    *) echo "convert.sh: the target must be enroot or apptainer, not '$target'" >&2; exit 2 ;;
esac
if [ "$dry_run" = 0 ]; then echo "wrote $dest"; fi
