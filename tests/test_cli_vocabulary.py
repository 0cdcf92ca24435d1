"""One vocabulary across the CLI: every command and option documented, the timm/DeiT spellings of the
recipe flags accepted, the sweep's arms named as reports name them, one set of exit codes, shell
completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import run_tla

from tla_jobs.cli import app
from tla_jobs.config import ARMS, TrainConfig
from tla_jobs.errors import TlaError


def _commands(cmd, path):
    """Every command and group (a group's own options: `tla checkpoints` lists, `... prune` prunes)."""
    yield " ".join(path), cmd
    for name, sub in getattr(cmd, "commands", {}).items():  # typer carries its own click: no isinstance
        yield from _commands(sub, [*path, name])


COMMANDS = dict(_commands(typer.main.get_command(app), ["tla"]))


def test_every_command_and_every_option_has_a_help_text():
    assert {"tla submit train", "tla submit sweep", "tla status", "tla report", "tla signal"} <= set(COMMANDS)
    missing = [f"{name} {p.opts or p.name}" for name, cmd in COMMANDS.items() for p in cmd.params
               if not getattr(p, "hidden", False) and not (getattr(p, "help", None) or "").strip()]
    missing += [name for name, cmd in COMMANDS.items() if not (cmd.help or "").strip()]
    assert not missing, missing


def _parse(command: str, args: list[str]) -> dict:
    """The values click gives the command's function for ``args`` (parsing only, nothing runs)."""
    cmd = COMMANDS[command]
    return cmd.make_context(command.split()[-1], args, resilient_parsing=False).params


@pytest.mark.parametrize("command", ["tla train", "tla submit train"])
def test_timm_and_deit_spellings_of_recipe_flags_set_the_same_fields(command):
    base = ["--name", "x"] if command == "tla submit train" else []
    theirs = _parse(command, [*base, "--mixup-mode", "elem", "--input-size", "48", "-b", "16", "--data-set", "digits",
                              "--num_workers", "3", "--train-interpolation", "bilinear", "--checkpoint-hist", "2"])
    ours = _parse(command, [*base, "--mix-mode", "elem", "--img-size", "48", "--batch-size", "16", "--dataset",
                            "digits", "--workers", "3", "--interpolation", "bilinear", "--keep-best", "2"])
    fields = ("mix_mode", "img_size", "batch_size", "dataset", "workers", "interpolation", "keep_best")
    assert {k: theirs[k] for k in fields} == {k: ours[k] for k in fields} == {
        "mix_mode": "elem", "img_size": 48, "batch_size": 16, "dataset": "digits", "workers": 3,
        "interpolation": "bilinear", "keep_best": 2}  # timm's --checkpoint-hist keeps the N best
    assert _parse("tla train", ["--eval"])["eval_only"] is True


def test_sweep_arms_are_the_mixing_names_reports_print():
    from tla_jobs.jobs import sweep

    for arm, fields in ARMS.items():  # each arm's recipe is the mixing it is named after
        kw = {k: v for k, v in fields.items() if v is not None}
        assert TrainConfig(model="tla_vit_nano", **kw).mixing() == arm
    grid = sweep.grid("m", "tla,grid-cutmix,base,none", "0")
    assert [arm for _, arm, _ in grid] == ["tl-align", "grid-cutmix", "mixup+cutmix", "none"]
    with pytest.raises(TlaError, match="gives tl-align twice"):
        sweep.grid("m", "tla,tl-align", "0")


def test_exit_codes_and_signals(tmp_path):
    runs = tmp_path / "runs"
    (runs / "broken").mkdir(parents=True)
    (runs / "broken" / "run.json").write_text("{")  # a damaged run record: a check found a problem
    env = {"TLA_RUNS": str(runs)}
    damaged = run_tla("status", "--json", env=env)
    assert damaged.returncode == 3 and "damaged files in 1 run" in damaged.stderr
    assert json.loads(damaged.stdout)[0]["state"] == "DAMAGED"  # the output still comes first
    for args in (["status", "no-such-run"], ["signal", "broken", "--signal", "INT"], ["report", "--format", "xml"]):
        proc = run_tla(*args, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith("tla: error: "), (args, proc.stderr)
    assert "--signal must be USR2 or TERM" in run_tla("signal", "broken", "-s", "USR1", env=env).stderr
    top = run_tla("--help", env=env).stdout
    assert "Exit codes" in top and "--install-completion" in top


def test_shell_completion_script_and_completions():
    tla = str(Path(sys.executable).with_name("tla"))  # the installed entry point: completion keys on its name
    script = subprocess.run([tla, "--show-completion", "bash"], capture_output=True, text=True, check=True).stdout
    assert "_TLA_COMPLETE=complete_bash" in script and "complete -o default -F _tla_completion tla" in script
    # what the installed script asks for when the user types `tla sta<TAB>`, then `tla status --st<TAB>`
    for words, cword, expected in (("tla sta", "1", "status"), ("tla report --fo", "2", "--format")):
        proc = subprocess.run([tla], capture_output=True, text=True, env={
            **os.environ, "_TLA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword})
        assert expected in proc.stdout.split(), proc.stdout + proc.stderr


def test_every_command_that_prints_a_table_has_json_output():
    tables = ["tla status", "tla report", "tla checkpoints list", "tla checkpoints prune", "tla cluster list",
              "tla cluster check"]
    for name in tables:
        flags = {opt for p in COMMANDS[name].params for opt in getattr(p, "opts", [])}
        assert "--json" in flags or "--format" in flags, name
