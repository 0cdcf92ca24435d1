"""The two places where submitit's public API falls short, as subclasses of its public executors.

Everything else goes through submitit's public API (``SlurmExecutor``/``LocalExecutor``,
``update_parameters``, ``submit``, ``map_array``, ``JobPaths``). tests/test_submitit_versions.py
renders and submits through these classes with every submitit release pyproject allows.

- ``DetachedLocalExecutor``: submitit's local executor starts its controller with a bare
  ``subprocess.Popen`` in ``start_controller``: in the session of `tla submit` (a Ctrl-C in that
  terminal would kill the training) and with its stdout/stderr (a caller reading `tla submit`'s
  output through a pipe would wait for the whole job). No parameter changes either, so this class
  overrides ``_submit_command``, the hook ``LocalExecutor`` itself overrides for exactly this
  ("the implementation is simpler than for clusters"), and starts the same controller with the
  same ``SUBMITIT_LOCAL_*`` environment, in a new session, output to a log file. It also takes
  extra environment variables for the job (the thread count of each element of a local sweep).
- ``SlurmExecutor``: submitit's, with a '%' in the folder escaped on the script's --output/--error
  (SLURM reads % as a filename pattern there), by rewriting the text ``_make_submission_file_text``
  returns: submitit has no parameter for it.
- ``SlurmScriptExecutor``: a dry run shows the very sbatch script submitit would submit, on a
  machine without SLURM (a laptop preparing a submission). ``SlurmExecutor.__init__`` refuses to
  build where ``srun`` is missing: ``affinity`` (public) says it is available here. ``script()``
  renders submitit's own template with ``_make_submission_file_text``, the method submitit's
  executors implement for exactly this (documented on ``PicklingExecutor``), and the command
  ``SlurmExecutor`` submits: it submits nothing and writes no file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import submitit

from tla_jobs.fsutil import open_for_append


class DetachedLocalExecutor(submitit.LocalExecutor):
    def __init__(self, folder: Path, log: Path, env: dict[str, str] | None = None):
        super().__init__(folder)
        self.log = log
        self.env = dict(env or {})

    def _submit_command(self, command: str) -> submitit.LocalJob:
        # The same controller as submitit's start_controller (python -m submitit.local._local FOLDER, its
        # SUBMITIT_LOCAL_* variables), started in its own session with no inherited stdio.
        ntasks = self.parameters.get("tasks_per_node", 1)
        gpus = self.parameters.get("visible_gpus", ()) or range(self.parameters.get("gpus_per_node", 0))
        env = {**os.environ, **self.env,
               "SUBMITIT_LOCAL_NTASKS": str(ntasks), "SUBMITIT_LOCAL_COMMAND": command,
               "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * self.parameters.get("timeout_min", 2.0))),
               "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(self.parameters.get("signal_delay_s", 30))),
               "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
               "SUBMITIT_STDERR_TO_STDOUT": "1" if self.parameters.get("stderr_to_stdout") else "",
               "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_WITH_SHELL": "",  # no setup lines: no shell
               "CUDA_VISIBLE_DEVICES": ",".join(str(k) for k in list(gpus)[:self.parameters.get("gpus_per_node", 0)])}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(open_for_append(self.log), "ab") as out:  # never through a link out of the run folder
            process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(self.folder)], env=env,
                                       start_new_session=True, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT)
        return submitit.LocalJob(folder=self.folder, job_id=str(process.pid), process=process,
                                 tasks=list(range(ntasks)))


def escape_slurm_pattern(path: str) -> str:
    """``path`` for sbatch's and srun's --output/--error, which read %j, %x, %5a ... as filename
    patterns and "%%" as a literal "%" (sbatch(1), "filename pattern")."""
    return path.replace("%", "%%")


class SlurmExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, whose script has a literal '%' of its folder escaped.

    submitit writes --output/--error (on #SBATCH lines and on the srun line) as its folder followed
    by its own patterns (%j_%t_log.out), unescaped: a runs root such as /tmp/50%x would have SLURM
    write the logs to /tmp/50<job name>/... where neither tla nor submitit looks. The folder part
    is escaped here, in the text submitit generated, so every '%' SLURM expands is submitit's own.
    (submitit itself reads %j, %t, %A and %a in its folder as the job's ids, with no escape: such a
    folder is refused before this, sbatch.check_script_values.)"""

    def _internal_process_submissions(self, delayed_submissions):
        if len(delayed_submissions) == 1 or "%" not in str(self.folder):
            return super()._internal_process_submissions(delayed_submissions)
        # A job array's script is written by a fresh executor that submitit builds by the module's
        # name (slurm.SlurmExecutor(self.folder, ...)), not type(self): for that call the name is this
        # class, so that the array's script is escaped as well (tla submits from one thread).
        from submitit.slurm import slurm as module

        original, module.SlurmExecutor = module.SlurmExecutor, SlurmExecutor
        try:
            return super()._internal_process_submissions(delayed_submissions)
        finally:
            module.SlurmExecutor = original

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        text = super()._make_submission_file_text(command, uid)
        folder = str(self.folder)
        if "%" not in folder:
            return text
        escaped = escape_slurm_pattern(folder)
        for kind in ("out", "err"):
            for ids in ("%j", "%A_%a"):
                for task in ("%t", "0"):
                    tail = f"/{ids}_{task}_log.{kind}"  # submitit's JobPaths.stdout/stderr, as the script has them
                    text = text.replace(shlex.quote(folder + tail), shlex.quote(escaped + tail))
        return text


class SlurmScriptExecutor(SlurmExecutor):
    @classmethod
    def affinity(cls) -> int:
        return 1  # a dry run needs no srun here

    def script(self, array_size: int | None = None) -> str:
        """The sbatch script ``submit`` (one job) or ``map_array`` (``array_size`` elements) would submit."""
        if array_size:
            self.parameters["map_count"] = array_size  # as SlurmExecutor sets it for an array
        command = " ".join([self.python, "-u -m submitit.core._submit", shlex.quote(str(self.folder))])
        return self._make_submission_file_text(command, uid="dry-run")
