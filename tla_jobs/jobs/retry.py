"""A failed training step is retried, not the end of the run.

A failure is a rank's non-zero exit or a signal (a GPU that fell off the bus, the out-of-memory
killer on a shared node, an NCCL timeout). The job comes back the way it comes back after a
preemption or the time limit: the same job requeued (SLURM's ``scontrol requeue``; submitit's local
controller starting its tasks again on submitit's requeue exit code), continuing from the run's
newest checkpoint, at most the profile's ``max_requeue_failure`` times per job (0: never).

Where the rule runs is decided by who outlives the failure:

- SLURM: a rank killed by a signal can do nothing, and srun (``--kill-on-bad-exit``) then ends the
  whole step, so no other rank can either; SLURM itself retries nothing that fails (its RequeueExit
  is the site's slurm.conf, not the job's). The batch shell outlives the step: :func:`setup_lines`
  wraps its ``srun`` so that a step that failed while SLURM was not stopping the job (no SIGTERM to
  the batch shell: not a preemption, requeue, cancel or time limit) is recorded, then requeued,
  excluding the node srun named ("srun: error: n2: task 1: Killed") when the partition keeps
  enough other nodes for the job. Plain shell: in a container the host has no Python of ours. In a
  container profile the host's own srun wrapper (containers.host_requeue_setup), which forwards
  SLURM's signals into the container, calls the same tla_failed after a step that failed on no signal.
- Local: submitit's controller outlives its tasks but has no hook; a rank whose training raised
  (its own error, or a dead peer seen in a collective) asks for the requeue itself
  (:func:`local_failure`). A lone local process killed by a signal is not retried.

Either way the attempt's end event in attempts.jsonl says which rank failed, how (``exit_code`` or
``signal``) and on which ``node``, and whether it was requeued (``requeue``, ``excluded``);
attempts.py joins it to the attempt's own end record (rank 0's error, when it was rank 0). An
attempt that ended itself for good (the stall guard's "stalled", "requeue limit") is not retried:
a failure that repeats at the same step meets the stall guard, which ends the run FAILED.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.fsutil import read_json, read_jsonl

FAILED = "failed"  # the reason of a failure's end event
FINAL = ("stalled", "requeue limit")  # an attempt that ended with one of these asked not to be retried


def setup_lines(max_requeue_failure: int, run_dirs: list[str], own_srun: bool = True) -> list[str]:
    """Batch-shell lines of a training job (one run, or a job array's runs by array index). ``own_srun``
    False: only tla_failed, for a container profile whose own srun wrapper (containers.host_requeue_setup)
    forwards signals and calls it after a step that failed while no signal came."""
    dirs = " ".join("'" + str(d).replace("'", "'\\''") + "'" for d in run_dirs)  # always quoted, as data
    head = [
        "# failure requeue (tla_jobs/jobs/retry.py): a step that failed is requeued at most max_requeue_failure times",
        f"tla_max_requeue_failure={int(max_requeue_failure)}",
        f"tla_run_dirs=({dirs})",
        'tla_run_dir=${tla_run_dirs[${SLURM_ARRAY_TASK_ID:-0}]}',
        'tla_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}',  # as rundir.job_identity
        'tla_job=${tla_job:-$SLURM_JOB_ID}',
    ]
    if not own_srun:
        return head + _FUNCTIONS[:_FUNCTIONS.index("srun() {")]
    return [*head,
            "tla_term=",
            "trap 'tla_term=1' TERM",  # SLURM stops the job (preemption, requeue, cancel, time limit): not a failure
            *_FUNCTIONS]


_FUNCTIONS = r'''tla_failed() {
  local rc=$1 f="$tla_run_dir/attempts.jsonl" job line node rank what how nfail requeue=false why excl= part left
  job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null)
  # only while SLURM still runs this very attempt (a node failure may have requeued the job already)
  case "$job" in *JobState=RUNNING*"Restarts=${SLURM_RESTART_COUNT:-0} "*) ;; *) return;; esac
  line=$(grep -m1 -E '^srun: error: [^ :]+: tasks? [0-9]+[^:]*: ' "$2")
  node=$(printf %s "$line" | sed -E 's/^srun: error: ([^ :]+): .*/\1/' | tr -cd '][A-Za-z0-9._,-')  # a hostlist too
  rank=$(printf %s "$line" | sed -E 's/^srun: error: [^ :]+: tasks? ([0-9]+).*/\1/' | tr -cd 0-9)
  what=${line##*: }
  case "$what" in
    "") how="\"exit_code\": $rc";;
    "Exited with exit code "*) how="\"exit_code\": $(printf %s "${what##* }" | tr -cd 0-9)";;
    Killed*) how='"signal": "SIGKILL"';; Terminated*) how='"signal": "SIGTERM"';;
    Segmentation*) how='"signal": "SIGSEGV"';; Aborted*) how='"signal": "SIGABRT"';;
    "Bus error"*) how='"signal": "SIGBUS"';; *) how="\"signal\": \"$(printf %s "$what" | tr -cd 'A-Za-z0-9 ._-')\"";;
  esac
  nfail=$(grep -F "\"job_id\": \"$tla_job\"" "$f" 2>/dev/null | grep -cF '"reason": "failed"')
  if tail -n 1 "$f" 2>/dev/null | grep -qE '"reason": "(stalled|requeue limit)"'; then why="the attempt ended for good"
  elif [ "${nfail:-0}" -ge "$tla_max_requeue_failure" ]; then why="max_requeue_failure is $tla_max_requeue_failure"
  else requeue=true; fi
  if $requeue && [ -n "$node" ]; then  # without that node, when the partition keeps enough others for the job
    part=$(printf %s "${SLURM_JOB_PARTITION%%,*}" | tr -cd 'A-Za-z0-9._-')
    excl=$(printf %s "$job" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2 | grep -v null)
    excl=$(scontrol show hostnames "${excl:+$excl,}$node" 2>/dev/null | sort -u | paste -sd, -)
    left=$(sinfo -h -N -p "$part" -t idle,mixed,allocated,completing -o %N 2>/dev/null | sort -u \
      | grep -cvxF -e "$(printf %s "$excl" | tr , '\n')")
    if [ -z "$excl" ] || [ "${left:-0}" -lt "${SLURM_JOB_NUM_NODES:-1}" ]; then
      why="$node not excluded: partition $part would keep ${left:-0} nodes for ${SLURM_JOB_NUM_NODES:-1}"; excl=
    fi
  fi
  local fmt='{"time": %s, "event": "end", "reason": "failed", "job_id": "%s", "restart_count": %s, "host": "%s", '
  fmt+='"executor": "slurm", "rank": %s, "node": %s, %s, "requeue": %s, "excluded": %s, "note": "%s"}\n'
  [ -d "$tla_run_dir" ] && printf "$fmt" \
    "$(date +%s)" "$tla_job" "${SLURM_RESTART_COUNT:-0}" "$(hostname | tr -cd 'A-Za-z0-9._-')" "${rank:-null}" \
    "${node:+\"$node\"}" "$how" "$requeue" "${excl:+\"$excl\"}" "$why" \
    | sed 's/"node": ,/"node": null,/; s/"excluded": ,/"excluded": null,/' >>"$f"
  if ! $requeue; then echo "tla: step failed (srun exit $rc), not requeued: $why" >&2; return; fi
  echo "tla: step failed (srun exit $rc: ${line:-no task named}); requeueing $SLURM_JOB_ID${excl:+ without $excl}" >&2
  trap '' TERM  # the requeue signals this shell too, which still sets the exclusion
  scontrol requeue "$SLURM_JOB_ID" || return
  [ -z "$excl" ] || scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$excl" || true
  exit 0
}
srun() {
  local err rc
  err=$(mktemp) || err=/dev/null
  command srun "$@" 2>"$err"; rc=$?
  [ "$err" = /dev/null ] || cat "$err" >&2
  # 75/76: the trainer checkpointed on a signal / a newer attempt took over; neither is a failure
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && [ "$rc" -ne 76 ] && [ -z "$tla_term" ]; then
    tla_failed "$rc" "$err"
  fi
  [ "$err" = /dev/null ] || rm -f "$err"
  return $rc
}'''.splitlines()


def retries(record: dict) -> bool:
    """Does the run's profile (as run.json keeps it) retry failed steps? Older records have no
    max_requeue_failure: no."""
    prof = record.get("profile") or {}
    if prof.get("executor") == "slurm":
        return bool((prof.get("slurm") or {}).get("max_requeue_failure"))
    return bool((prof.get("local") or {}).get("max_requeue_failure"))


def is_failure(end: dict | None) -> bool:
    """An attempt's end record says it ended by a failure (joined with the step's record: attempts.py)."""
    return bool(end) and (end.get("reason") == FAILED or "requeue" in end)


# ---------------------------------------------------------------------------------------- local


def failures(rows: list[dict], job_id: str) -> int:
    """Attempts of the job that ended by a failure (a failure recorded by two ranks counts once)."""
    seen: set = set()
    n = 0
    for e in rows:
        if e.get("event") == "end" and e.get("reason") == FAILED and str(e.get("job_id", "")) == job_id:
            key = e.get("attempt_id")
            if key is None or key not in seen:
                n += 1
                seen.add(key)
    return n


def local_failure(run_dir: Path, limit: int, exc: BaseException, started: float) -> None:
    """In a rank of a local job whose training raised ``exc``: record the failure, and within the
    limit requeue through submitit (its local environment exits with the controller's requeue
    code; the controller then starts every task again). Returns when the failure is final."""
    ident = rundir.job_identity()
    if ident["executor"] != "local" or not (run_dir / rundir.ATTEMPTS).exists():
        return
    rows = read_jsonl(run_dir / rundir.ATTEMPTS)
    done = failures(rows, ident["job_id"])
    final = bool(rows) and rows[-1].get("event") == "end" and rows[-1].get("reason") in FINAL
    requeue = bool(limit) and not final and done < limit
    owner = read_json(run_dir / rundir.OWNER, default=None)
    # this attempt's id: owner.json when this attempt wrote it (after every rank had started)
    mine = isinstance(owner, dict) and str(owner.get("job_id")) == ident["job_id"] and \
        isinstance(owner.get("time"), (int, float)) and owner["time"] >= started
    rank = int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0") or 0)
    why = "" if requeue else "the attempt ended for good" if final else f"max_requeue_failure is {limit}"
    rundir.append_event(run_dir / rundir.ATTEMPTS, {
        "event": "end", "reason": FAILED, **({"attempt_id": owner["attempt_id"]} if mine else {}), **ident,
        "rank": rank, "node": ident["host"], "exit_code": 1, "error": f"{exc.__class__.__name__}: {exc}"[:500],
        "requeue": requeue, "excluded": None, "note": why, "time": time.time()})
    if requeue:
        import submitit

        print(f"tla: rank {rank} failed ({exc.__class__.__name__}); requeueing local job {ident['job_id']} "
              f"(failure {done + 1} of at most {limit})", flush=True)
        submitit.JobEnvironment()._requeue(limit - done)  # submitit's own requeue: exits with its requeue code


def describe(end: dict) -> str:
    """How an attempt's failure reads in `tla status RUN`: 'rank 1 on n2: SIGKILL; requeued without n2'."""
    how = f"signal {end['signal']}" if end.get("signal") else f"exit code {end.get('exit_code')}"
    where = f"rank {end.get('rank')}" if end.get("rank") is not None else "the step"
    out = f"{where}{' on ' + str(end['node']) if end.get('node') else ''}: {how}"
    if end.get("requeue"):
        out += f"; requeued{' without ' + str(end['excluded']) if end.get('excluded') else ''}"
    elif end.get("requeue") is False:
        out += "; not requeued"
    return out + (f" ({end['note']})" if end.get("note") else "")
