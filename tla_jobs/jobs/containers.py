"""How a training step runs inside a container on SLURM, and the host-side requeue around it.

Only the srun step is containerised (Pyxis flags on sbatch would containerise the batch shell,
which then has no scontrol). Inside a container `scontrol` is normally absent, so submitit's
in-process requeue cannot work there; instead the batch shell (on the host) gets the signal
(`--signal=B:USR2@delay`), forwards it to the step, waits for the trainer to write its checkpoint
and exit, then runs `scontrol requeue` itself. submitit's generated script calls `srun` in the
foreground, where bash would hold a trap until srun returns; the setup lines therefore define a
shell function `srun` that starts the real srun in the background and waits on it, which bash
interrupts for the trap.
"""

from __future__ import annotations

import shlex

from tla_jobs.jobs.profiles import ContainerSettings, python_words

# Python ignores ~/.local/lib/pythonX.Y/site-packages with this set. Apptainer binds $HOME, and a site
# may mount it into Pyxis or podman containers too: a user's `pip install --user` torch would then
# shadow the image's, a different torch than the one the image was tested with. Set in every step.
NO_USER_SITE = "PYTHONNOUSERSITE"

# Environment the trainer needs from the host inside the container: SLURM's and submitit's
# variables (ranks, job id) and ours.
PASS_ENV = ("SLURM_*", "SUBMITIT_*", "TLA_*", "MASTER_*", "PYTHONUNBUFFERED")


def mounts(container: ContainerSettings, extra_paths: list[str]) -> list[str]:
    """The profile's mounts plus the run directory and data, at the same paths inside."""
    out = list(container.mounts)
    have = {m.split(":")[0] for m in out}
    for p in extra_paths:
        if p and p not in have:
            out.append(f"{p}:{p}")
            have.add(p)
    return out


# The podman step: `podman run "$@"` under a name, with the stop signals (TERM: preemption,
# `scontrol requeue`; USR2: time limit, forwarded by the batch shell) sent into the container by this
# shell as well. podman's own signal proxy is not enough: SLURM signals every process of the step,
# SIGCONT then SIGTERM, podman forwards each through a `runc kill` child, and when the SIGTERM kills
# that child podman stops forwarding for good. Seen on the test cluster: the trainer never heard the
# preemption, trained on through the grace time, and its container outlived the job (conmon is not a
# child of the step, so SLURM's kill does not reach it). Hence also: no --rm, the shell waits for the
# container itself when the podman client dies first and exits with the container's status (75 asks
# the batch shell for a requeue), and --replace ends a container a killed attempt of this job left.
PODMAN_STEP = "; ".join([  # one line: the srun line of the batch script stays one line
    'name="tla-${SLURM_JOB_ID:-0}-${SLURM_STEP_ID:-0}-${SLURM_PROCID:-0}"',
    """tla_running() { [ "$(podman container inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; }""",
    # (silent when the container has already ended)
    'tla_send() { podman kill --signal "$1" "$name" >/dev/null 2>&1 || ! tla_running '
    '|| echo "tla: could not send SIG$1 to container $name" >&2; }',
    "trap 'tla_send TERM' TERM",
    "trap 'tla_send USR2' USR2",
    'podman run --name "$name" --replace "$@" & pid=$!',
    'while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
    # the client gone (killed, or exited on a signal), the container may still run: wait for it
    "while tla_running; do sleep 1 & wait $!; done",
    """code=$(podman container inspect --format '{{.State.ExitCode}}' "$name" 2>/dev/null) && rc=$code""",
    'podman rm --force "$name" >/dev/null 2>&1',
    'exit "$rc"',
])


def step_python(container: ContainerSettings, mount_list: list[str]) -> str:
    """The "python" submitit puts on the srun line: the interpreter inside the container, its words
    quoted one by one as slurm.python's are (sbatch.node_python): `python; id #` runs no `id`."""
    py = python_words(container.python, "container.python")
    if container.runtime == "apptainer":
        # apptainer passes the host environment by default (the ranks need SLURM_*); --nv maps the GPUs.
        binds = ",".join(mount_list)
        parts = ["apptainer", "exec", "--nv", *(["--bind", binds] if binds else []),
                 *(["--pwd", container.workdir] if container.workdir else []), *container.extra_flags,
                 "--env", "TLA_HOST_REQUEUE=1", "--env", f"{NO_USER_SITE}=1", container.image, *py]
        return shlex.join(parts)
    if container.runtime == "podman":
        parts = ["bash", "-c", PODMAN_STEP, "tla-podman-step", "--network=host", "--ipc=host", "--init"]
        for m in mount_list:
            parts += ["-v", m]
        for var in PASS_ENV:
            parts += ["--env", var]
        parts += ["--env", "TLA_HOST_REQUEUE=1", "--env", f"{NO_USER_SITE}=1"]
        if container.workdir:
            parts += ["-w", container.workdir]
        parts += [*container.extra_flags, container.image, *py]
        return shlex.join(parts)
    return shlex.join(py)  # pyxis: the srun flags put the step in the container; "python" is the image's


def srun_args(container: ContainerSettings, mount_list: list[str]) -> list[str]:
    if container.runtime != "pyxis":
        return []
    args = [f"--container-image={container.image}", "--no-container-mount-home",
            f"--container-env=TLA_HOST_REQUEUE,{NO_USER_SITE}"]
    if mount_list:
        args.append("--container-mounts=" + ",".join(mount_list))
    if container.workdir:
        args.append(f"--container-workdir={container.workdir}")
    return args + list(container.extra_flags)


def step_env_setup() -> list[str]:
    """Batch-shell lines for the containerised step's environment (Pyxis passes them in with
    --container-env; Apptainer and podman get them with --env as well)."""
    return ["# the image's Python packages, not those of a bound $HOME's ~/.local", f"export {NO_USER_SITE}=1"]


def host_requeue_setup(max_requeues: int) -> list[str]:
    """Batch-shell lines: trap the signal on the host, forward it, wait, requeue (at most
    ``max_requeues`` times: the profile's max_requeue_timeout + max_requeue_preempt; the trainer
    in the image refuses a start past max_requeue_preempt on its own)."""
    return [
        "# host-side requeue: the containerised step cannot run scontrol",
        "export TLA_HOST_REQUEUE=1",
        f"tla_max_requeues={int(max_requeues)}",
        "tla_signal=",
        "tla_forward() { tla_signal=$1; echo \"tla: batch shell got SIG$1, forwarding to the step\" >&2; "
        "kill -s \"$1\" \"$tla_step\" 2>/dev/null; }",
        "trap 'tla_forward USR2' USR2",
        "trap 'tla_forward TERM' TERM",
        "srun() {",
        "  local rc err",
        "  err=$(mktemp) || err=/dev/null",  # srun's own words name a failed task's rank and node (retry.py)
        "  command srun \"$@\" 2>\"$err\" &",
        "  tla_step=$!",
        "  while :; do wait \"$tla_step\"; rc=$?; kill -0 \"$tla_step\" 2>/dev/null || break; done",
        "  [ \"$err\" = /dev/null ] || { cat \"$err\" >&2; }",
        # USR2 (time limit, submitit's preemption signal) or a step that stopped on its own signal:
        # requeue. TERM means SLURM itself is requeueing or cancelling the job: leave it to SLURM.
        "  if [ \"$tla_signal\" = USR2 ] || { [ \"$rc\" -eq 75 ] && [ \"$tla_signal\" != TERM ]; }; then",
        "    [ \"$err\" = /dev/null ] || rm -f \"$err\"",
        "    if [ \"${SLURM_RESTART_COUNT:-0}\" -ge \"$tla_max_requeues\" ]; then",
        "      echo \"tla: not requeueing $SLURM_JOB_ID: requeued ${SLURM_RESTART_COUNT:-0} times, the most the "
        "profile allows (max_requeue_timeout + max_requeue_preempt)\" >&2",
        "      exit 1",
        "    fi",
        "    echo \"tla: step stopped (exit $rc) after its checkpoint; requeueing $SLURM_JOB_ID\" >&2",
        "    scontrol requeue \"$SLURM_JOB_ID\"",
        "    exit 0",
        "  fi",
        # a step that failed while no signal came (a rank killed, an error): retry.py's failure requeue
        "  if [ \"$rc\" -ne 0 ] && [ \"$rc\" -ne 75 ] && [ \"$rc\" -ne 76 ] && [ -z \"$tla_signal\" ] \\",
        "      && declare -F tla_failed >/dev/null; then",
        "    tla_failed \"$rc\" \"$err\"",
        "  fi",
        "  [ \"$err\" = /dev/null ] || rm -f \"$err\"",
        "  return $rc",
        "}",
    ]
