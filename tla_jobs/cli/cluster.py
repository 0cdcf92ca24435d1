"""`tla cluster list`, `tla cluster init`, `tla cluster check`: which profiles a name reaches, a
starting profile for this SLURM cluster, and is a profile valid and does its cluster answer?"""

from __future__ import annotations

import json

import typer

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import console

cluster_app = typer.Typer(help="Cluster profiles: list them, make one for this SLURM cluster, check one.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("list")
@guard
def cluster_list(
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Every profile a name reaches, and where it comes from.

    Looked up in $TLA_CLUSTER_CONFIGS, ./cluster_configs, the user's profile directory, then the
    built-in examples; where a name is in several places the first one wins and shadows the others."""
    from rich.markup import escape
    from rich.table import Table

    from tla_jobs.errors import ChecksFailed
    from tla_jobs.jobs import profiles

    rows = profiles.listing()
    bad = [r["name"] for r in rows if r["error"]]
    # a profile that does not load is listed with its error, and the exit says so (3), as for a damaged run
    refuse = ChecksFailed(f"{len(bad)} profile(s) do not load: {', '.join(bad[:5])} (the listing says why)")
    if as_json:
        typer.echo(json.dumps(rows))
        if bad:
            raise refuse
        return
    table = Table(title=f"profiles (user directory: {escape(str(profiles.user_dir()))})")
    for col in ("name", "executor", "description", "from", "shadows"):
        table.add_column(col, no_wrap=col in ("name", "executor"))
    for r in rows:
        desc = f"[red]invalid: {escape(r['error'])}[/]" if r["error"] else escape(r["description"])
        table.add_row(escape(r["name"]), r["executor"] or "?", desc, escape(r["source"]),
                      escape(", ".join(r["shadows"])))
    console.print(table)
    if bad:
        raise refuse


@cluster_app.command("init")
@guard
def cluster_init(
    name: str = typer.Argument(..., help="Name of the new profile (the file NAME.yaml)."),
    source: str = typer.Option("slurm", "--from", help="Built-in example to start from: slurm (tasks on the host), "
                               "pyxis or apptainer (tasks in a container)."),
    partition: str = typer.Option(None, "--partition", help="Partition to fill in (default: the cluster's "
                                  "default partition, marked * by sinfo)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing profile file of that name."),
    folder: str = typer.Option(None, "--dir", help="Write into this folder instead of the user's profile directory "
                               "($TLA_CLUSTER_CONFIGS, else ~/.config/tla/clusters)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written and detected as JSON."),
) -> None:
    """Write a starting profile for this SLURM cluster, filled from sinfo.

    The built-in example's text with the partition's GPUs, CPUs and memory per node and its time
    limit, and the environment tla runs in; written to the user's profile directory."""
    from pathlib import Path

    from rich.markup import escape

    from tla_jobs.jobs import cluster_init as ci

    res = ci.init(name, source, partition, Path(folder) if folder else None, force)
    if as_json:
        typer.echo(json.dumps(res.as_dict()))
        return
    p, v = res.partition, res.values
    gpus = f"{v['gpus_per_node']} GPUs" if v["gpus_per_node"] else "no GPUs"
    console.print(f"wrote {escape(res.path)} (from the built-in {res.source!r})", highlight=False)
    console.print(f"  partition {escape(p['name'])}{' (default)' if p['default'] else ''}: {p['nodes']} nodes, "
                  f"{p['cpus']} CPUs, {p['mem_mb']} MB, {gpus} per node, MaxTime {escape(p['max_time'])}",
                  highlight=False)
    mem = f"{v['mem_gb']} GB" if v["mem_gb"] else "site default"
    console.print(f"  profile: {v['nodes']} node(s) x {v['tasks_per_node']} task(s) x {v['cpus_per_task']} CPUs, "
                  f"{gpus} per node, mem {mem}, time {v['time_min']} min", highlight=False)
    for line in v.get("setup") or []:
        console.print(f"  setup: {escape(line)}", highlight=False)
    for note in res.notes:
        console.print(f"  note: {escape(note)}", highlight=False)
    console.print("next: " + "   then: ".join(escape(c) for c in res.next), highlight=False)


@cluster_app.command("check")
@guard
def cluster_check(
    profile: str = typer.Argument("local", help="Profile name or YAML path."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Is the profile valid, and does the cluster answer (sinfo, sacct, partition limits, image,
    shared folders writable)?"""
    from rich.markup import escape

    from tla_jobs.errors import ChecksFailed
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
            console.print(f"  {c.label}  {escape(c.name)}: {escape(c.detail)}", highlight=False)
    failed = [c.name for c in checks if not c.ok]
    if failed:  # exit code 3, as for every check that finds a problem (errors.py)
        raise ChecksFailed(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
