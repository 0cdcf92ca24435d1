"""Orchestration: cluster profiles, submission through submitit, run records, status, reports.

Nothing here imports torch or timm: `tla status`, `tla report` and `tla logs` must start fast.
"""
