"""Thin entry point: `python cli.py ...` is the same as the installed `tla` command."""

from tla_jobs.cli import main

if __name__ == "__main__":
    main()
