"""`tla cluster check`: is a profile valid, and does its cluster answer?"""

from __future__ import annotations

import json

import typer

from tla_jobs.cli.app import app, guard
from tla_jobs.cli.show import console

cluster_app = typer.Typer(help="Check a cluster profile against the cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
@guard
def cluster_check(
    profile: str = typer.Argument("local", help="Profile name or YAML path."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Is the profile valid, and does the cluster answer (sinfo, sacct, partition limits, image,
    shared folders writable)?"""
    from tla_jobs.jobs import profiles, records, slurm
    from tla_jobs.jobs.plan import Check
    from tla_jobs.jobs.preflight import runs_root_check

    prof = profiles.load(profile)
    checks = [Check("profile", True, f"{prof.name}: {prof.executor}"),
              runs_root_check(records.runs_root(prof.runs_root), create=True)]
    if prof.executor == "slurm":
        checks += slurm.checks(prof)
    if as_json:
        typer.echo(json.dumps([vars(c) for c in checks]))
    else:
        for c in checks:
            console.print(f"  {c.label}  {c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
