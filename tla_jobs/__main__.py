"""`python -m tla_jobs` is the `tla` command."""

from tla_jobs.cli import main

main()
