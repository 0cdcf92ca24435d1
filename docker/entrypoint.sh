#!/bin/sh
# Entrypoint of the tla image (installed as /usr/local/bin/tla-entrypoint).
#
#   <image>                      tla --help
#   <image> train --epochs 3 ... tla train --epochs 3 ...        (any tla command or option)
#   <image> python -u -m ...     python -u -m ...                (a program on PATH, or a path)
#
# The second form is how the podman runtime of a SLURM profile starts submitit's step
# (`podman run ... IMAGE python -u -m submitit.core._submit DIR`). Pyxis and Apptainer do not run
# the entrypoint at all: they start the command they are given.
set -e

# A user id with no passwd entry (`--user 12345`) or no writable home: give tools a home they can use.
if [ -z "${HOME:-}" ] || [ "${HOME}" = / ] || ! [ -w "${HOME}" ]; then
    HOME=/tmp
    export HOME
fi

case "${1:-}" in
    "" | -*) exec tla "$@" ;;
    */*) exec "$@" ;;
esac
# A tla command never has the name of a program on PATH (train, submit, status, ...); a program does.
case "$(command -v "$1" 2>/dev/null || true)" in
    /*) exec "$@" ;;  # an executable file (shell builtins such as eval give no path)
esac
exec tla "$@"
