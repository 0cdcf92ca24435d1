"""The trainer: DeiT recipe with or without TL-Align, torch.distributed, exact resume.

Import :func:`tla_jobs.train.loop.train` (the job entry point in :mod:`tla_jobs.jobs.entry` calls it);
this package itself stays free of torch so that configs can be built by the fast CLI commands.
"""
