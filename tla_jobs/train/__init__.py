"""The trainer: DeiT recipe with or without TL-Align, torch.distributed, exact resume.

Import :func:`tla_jobs.train.loop.train` (or the submitit callable in :mod:`tla_jobs.train.job`);
this package itself stays free of torch so that configs can be built by the fast CLI commands.
"""
