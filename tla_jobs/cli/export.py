"""`tla export`: one set of a run's weights as a file plain timm loads (tla_jobs/train/export.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import typer
from rich.markup import escape

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import console
from tla_jobs.errors import TlaError

SUFFIX = {".safetensors": "safetensors", ".pth": "pth"}


def _check_out(out: Path, fmt: str | None, force: bool) -> str:
    """The format to write OUT in; refuses a name timm would read with the wrong loader (it picks
    safetensors by the suffix), a format that contradicts it, and an existing file without --force."""
    if fmt is not None and fmt not in SUFFIX.values():
        raise TlaError(f"--format must be safetensors or pth, not {fmt!r}")
    by_name = SUFFIX.get(out.suffix)
    if by_name is None:
        raise TlaError(f"{out}: the file name must end in .safetensors or .pth (timm picks its reader by the suffix)")
    if fmt is not None and fmt != by_name:
        raise TlaError(f"--format {fmt} does not match the file name {out.name} (a {by_name} name)")
    if out.is_dir():
        raise TlaError(f"{out} is a directory: give a file name")
    if out.exists() and not force:
        raise TlaError(f"{out} already exists; --force replaces it")
    return by_name


def _refuse_run_files(out: Path, source: Path) -> None:
    """An export never replaces what training needs: the checkpoint it reads, any checkpoint (a file
    with a sha256 sidecar), nor a checkpoint's name in a run folder, with or without --force."""
    from tla_jobs import rundir
    from tla_jobs.checkpoint_files import sidecar

    target = Path(os.path.realpath(out))
    if target == Path(os.path.realpath(source)):
        raise TlaError(f"{out} is the checkpoint being exported: give another file name")
    folder = target.parent
    in_run = any(os.path.lexists(folder / n) for n in (rundir.RUN_JSON, rundir.CONFIG_YAML, rundir.CHECKPOINT_LOG,
                                                       rundir.ATTEMPTS))
    if os.path.lexists(sidecar(target)) or (in_run and target.name.startswith("checkpoint_")):
        raise TlaError(f"{out} is a training checkpoint of a run (its optimizer and resume state would be lost): "
                       "export to another file name")


@app.command("export")
@guard
def export_command(
    target: str = typer.Argument(..., help="A run (name or directory) or a checkpoint file."),
    out: Path = typer.Argument(..., help="The file to write: NAME.safetensors (no pickle) or NAME.pth."),
    which: str = typer.Option(None, "--which", help="Of a run: best (default), last, prev, ema (the EMA weights "
                              "of the last checkpoint) or epoch:N. Of a checkpoint file: ema for its EMA weights."),
    fmt: str = typer.Option(None, "--format", help="safetensors or pth (default: OUT's suffix says)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write one set of weights (no optimizer state) with the model name, class names, input size,
    mean/std and crop as metadata: a file plain timm loads, without tla installed."""
    from tla_jobs.fsutil import locked
    from tla_jobs.jobs.artifacts import locate

    fmt = _check_out(out, fmt, force)
    src = locate(target, which, default="best")
    _refuse_run_files(out, src.path)
    # one export of a run at a time (a checkpoint outside any run: no folder of tla's to lock in); two
    # exports to one file never both write it either way (export() links its file into place). Taken
    # before torch is imported, so that a second export says so at once.
    lock = locked(src.run_dir / "export", wait=False, busy=f"another `tla export` of {src.run_dir.name} is running; "
                  "try again when it has finished") if src.run_dir else contextlib.nullcontext()
    with lock:
        from tla_jobs.train.export import export, load_line  # torch and timm: only now

        meta = export(src.path, out, weights=src.weights, fmt=fmt, force=force)
    line = load_line(meta, str(out))
    if as_json:
        typer.echo(json.dumps({"out": str(out.resolve()), "format": fmt, "bytes": out.stat().st_size,
                               "which": src.which, "load_line": line, "metadata": meta}))
        return
    classes = json.loads(meta["class_names"])
    shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    console.print(f"wrote {escape(str(out))} ({fmt}, {out.stat().st_size / 1e6:.1f} MB): {meta['model_name']}, "
                  f"{meta['weights']} weights of {src.path.name} (epoch {meta['epoch']}, sha256 "
                  f"{meta['source_sha256'][:12]}…)", highlight=False)
    console.print(f"  {meta['num_classes']} classes ({escape(shown)}); input {json.loads(meta['input_size'])}, "
                  f"mean {json.loads(meta['mean'])}, std {json.loads(meta['std'])}, crop {meta['crop_pct']} "
                  f"{meta['interpolation']}", highlight=False)
    console.print("load it with plain timm:", highlight=False)
    console.print(f"  import timm; model = {escape(line)}", highlight=False, soft_wrap=True)
