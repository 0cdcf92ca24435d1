"""Orchestration: cluster profiles, submission through submitit, run records, status, reports.

Nothing here imports torch or timm: `tla status`, `tla report` and `tla logs` must start fast.

Backend-neutral: plan.py (a submission before anything is written), preflight.py (checks before
queueing), submit.py (submitting through submitit, and what run.json records of it), sweep.py,
evals.py, artifacts.py (what a run + --which, a checkpoint or an export names: `tla export`, `tla eval
checkpoint`; a run's checkpoint files themselves, listing and pruning, are in the torch-free
tla_jobs/checkpoint_files.py, which the trainer uses too), control.py (cancel, resume, signal),
scheduler.py (job states in one shape), state.py (where a run stands: ``decide``),
attempts.py, pickles.py (submitit's results), records.py (run.json), damage.py, logs.py, report.py,
commands.py (the one subprocess helper).
SLURM: slurm.py (sacct, squeue, sinfo checks, scancel), sbatch.py (the batch script), containers.py.
The local executor: local.py (processes). executors.py: the two submitit subclasses.
"""
