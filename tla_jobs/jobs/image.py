"""The container image: build it with docker, podman or buildah, and convert it for the cluster.

`tla image build` and `tla image convert` are thin: they work out a few commands (argument lists,
never shell strings, so an image name or path is always one argument) and run them one after the
other, or print them for --dry-run. Standard library only: no torch, no timm.

  build    ENGINE build -f Dockerfile -t TAG --build-arg BASE_IMAGE=... --build-arg TLA_VERSION=...
           --build-arg GIT_COMMIT=... [--secret id=pip_cert,src=CA] [ENGINE ARGS...] CONTEXT
  convert  enroot import -o DEST.sqsh SOURCE                (Pyxis reads the .sqsh from shared storage)
           apptainer build DEST.sif SOURCE                  (after `podman save` for a podman image)

The engine is the first of docker, podman, buildah found on PATH. A docker client whose daemon does
not answer (a machine with the client package only) is passed over for the next one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs.errors import TlaError
from tla_jobs.jobs.commands import run

ENGINES = ("docker", "podman", "buildah")
# Keep in step with the Dockerfile's `ARG BASE_IMAGE=` (a unit test checks that they agree).
DEFAULT_BASE = "pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime"
TARGETS = {"enroot": "enroot", "sqsh": "enroot", "apptainer": "apptainer", "sif": "apptainer"}
SUFFIX = {"enroot": ".sqsh", "apptainer": ".sif"}
CA_SECRET = "pip_cert"  # the id the Dockerfile's RUN --mount=type=secret steps read


@dataclass
class Plan:
    """Commands to run in order; `cleanup` are files removed afterwards, whatever happened."""

    commands: list[list[str]]
    cleanup: list[Path] = field(default_factory=list)
    result: str = ""

    def lines(self) -> list[str]:
        return [shlex.join(c) for c in self.commands]


def _docker_answers(exe: str) -> bool:
    """A docker client is only an engine when a daemon answers it."""
    proc = run([exe, "version", "--format", "{{.Server.Version}}"], timeout=20)
    return proc is not None and proc.returncode == 0 and bool(proc.stdout.strip())


def find_engine(preferred: str | None = None, path: str | None = None) -> str:
    """The engine to build with: `preferred` (which must be installed), else the first that works.

    `path` is the PATH to search (default: the process's)."""
    if preferred:
        if preferred not in ENGINES:
            raise TlaError(f"--engine must be one of {', '.join(ENGINES)}, not {preferred!r}")
        if not shutil.which(preferred, path=path):
            raise TlaError(f"--engine {preferred}: {preferred} is not installed (not on PATH)")
        return preferred
    skipped = []
    for name in ENGINES:
        exe = shutil.which(name, path=path)
        if not exe:
            continue
        if name == "docker" and not _docker_answers(exe):
            skipped.append("docker (no daemon answers)")
            continue
        return name
    extra = f"; found only {', '.join(skipped)}" if skipped else ""
    raise TlaError(f"no container engine found: install docker, podman or buildah{extra}")


def _check_arg(what: str, value: str) -> str:
    """An image name, tag or path that the engine would take for an option is refused."""
    if not value or value.startswith("-") or any(c in value for c in "\n\r\0"):
        raise TlaError(f"{what} {value!r} is not a valid name")
    return value


def source_version(context: Path) -> str:
    """`__version__` of the tla_jobs in the build context (what `tla --version` will print inside)."""
    init = context / "tla_jobs" / "__init__.py"
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init.read_text(), re.M) if init.is_file() else None
    if not m:
        raise TlaError(f"{context} holds no tla_jobs/__init__.py with a __version__: is it the tla source tree?")
    return m.group(1)


def git_commit(context: Path) -> str:
    """HEAD of the context's git checkout, with "-dirty" when tracked files differ; "unknown" without git."""
    head = run(["git", "-C", str(context), "rev-parse", "HEAD"], timeout=30)
    if head is None or head.returncode != 0:
        return "unknown"
    dirty = run(["git", "-C", str(context), "status", "--porcelain", "--untracked-files=no"], timeout=60)
    if dirty is None:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def build_plan(engine: str, *, context: Path, dockerfile: Path | None = None, tag: str | None = None,
               base: str | None = None, ca_bundle: Path | None = None, engine_args: list[str] | None = None,
               commit: str | None = None) -> Plan:
    context = Path(context)
    if not context.is_dir():
        raise TlaError(f"build context {context} is not a directory")
    dockerfile = Path(dockerfile) if dockerfile else context / "Dockerfile"
    if not dockerfile.is_file():
        raise TlaError(f"no Dockerfile at {dockerfile}: run in the tla source tree, or pass --context/--file")
    version = source_version(context)
    tag = _check_arg("--tag", tag or f"tla:{version}")
    base = _check_arg("--base", base or DEFAULT_BASE)
    commit = commit or git_commit(context)
    argv = [engine, "build"]
    if engine in ("podman", "buildah"):
        argv += ["--format", "docker"]  # the OCI format drops the Dockerfile's SHELL
    argv += ["-f", str(dockerfile), "-t", tag,
             "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", f"TLA_VERSION={version}",
             "--build-arg", f"GIT_COMMIT={commit}"]
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise TlaError(f"--ca-bundle {ca_bundle} is not a file")
        argv += ["--secret", f"id={CA_SECRET},src={Path(ca_bundle).resolve()}"]
    argv += list(engine_args or [])
    argv.append(str(context))
    return Plan([argv], result=tag)


def _split_source(image: str) -> tuple[str, str]:
    """("registry" | "local", reference) for IMAGE given as docker://REF or a local NAME[:TAG]."""
    if image.startswith("docker://"):
        ref = image.removeprefix("docker://")
        return "registry", _check_arg("IMAGE", ref)
    if "://" in image:
        raise TlaError(f"IMAGE {image!r}: give a local image (name:tag) or a registry image as docker://REF")
    return "local", _check_arg("IMAGE", image)


def enroot_registry_ref(ref: str) -> str:
    """enroot's spelling of a registry image: REGISTRY#NAME:TAG (docker://reg.io/team/tla:1 ->
    docker://reg.io#team/tla:1); a first part with a dot, a colon or `localhost` is a registry."""
    first, sep, rest = ref.partition("/")
    if "#" in ref or not sep or not ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"{first}#{rest}"


def convert_dest(target: str, ref: str, dest: Path) -> Path:
    """DEST itself, or DEST/NAME-TAG.sqsh|.sif when DEST is a directory (shared storage)."""
    dest = Path(dest).expanduser()
    if dest.is_dir():
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.rsplit("/", 1)[-1].replace(":", "-")).strip("-.")
        dest = dest / f"{name or 'tla'}{SUFFIX[target]}"
    if not dest.parent.is_dir():
        raise TlaError(f"destination folder {dest.parent} does not exist")
    _check_arg("DEST", str(dest))
    return dest


def convert_plan(target: str, image: str, dest: Path, *, engine: str | None = None, force: bool = False) -> Plan:
    """Commands that turn IMAGE into a .sqsh (enroot, for Pyxis) or a .sif (Apptainer) at DEST."""
    if target not in TARGETS:
        raise TlaError(f"--to must be enroot (.sqsh, for Pyxis) or apptainer (.sif), not {target!r}")
    target = TARGETS[target]
    kind, ref = _split_source(image)
    dest = convert_dest(target, ref, dest)
    if dest.exists() and not force:
        raise TlaError(f"{dest} already exists: pass --force to replace it")
    commands: list[list[str]] = []
    cleanup: list[Path] = []
    if kind == "local" and engine is None:
        engine = find_engine()
    if target == "enroot":
        # enroot import reads the docker daemon (dockerd://) or podman's storage (podman://, which
        # buildah shares); it refuses to overwrite, so --force removes the old file first.
        source = {"registry": f"docker://{enroot_registry_ref(ref)}"}.get(kind) or (
            f"dockerd://{ref}" if engine == "docker" else f"podman://{ref}")
        if dest.exists():
            commands.append(["rm", "-f", "--", str(dest)])
        commands.append(["enroot", "import", "--output", str(dest), source])
    else:
        build = ["apptainer", "build", *(["--force"] if force else []), str(dest)]
        if kind == "registry":
            commands.append([*build, f"docker://{ref}"])
        elif engine == "docker":
            commands.append([*build, f"docker-daemon://{ref}"])
        else:
            # Apptainer cannot read podman's storage: an OCI archive beside DEST, removed afterwards.
            archive = dest.with_name(dest.name + ".oci.tar")
            save = "podman" if engine == "podman" else "buildah"
            commands.append([save, "push", ref, f"oci-archive:{archive}"] if save == "buildah"
                            else [save, "save", "--format", "oci-archive", "-o", str(archive), ref])
            commands.append([*build, f"oci-archive:{archive}"])
            cleanup.append(archive)
    return Plan(commands, cleanup, result=str(dest))


def run_plan(plan: Plan, echo=print) -> None:
    """Run the commands in order (output goes straight to the terminal); stop at the first failure."""
    for argv in plan.commands:  # every tool first: no half-done conversion for want of the last one
        if not shutil.which(argv[0]):
            raise TlaError(f"{argv[0]} is not installed on this machine (--dry-run prints the commands)")
    try:
        for argv in plan.commands:
            echo(f"+ {shlex.join(argv)}")
            rc = subprocess.run(argv, env=os.environ.copy()).returncode
            if rc != 0:
                raise TlaError(f"{argv[0]} {argv[1]} failed (exit {rc})")
    finally:
        for path in plan.cleanup:
            Path(path).unlink(missing_ok=True)
