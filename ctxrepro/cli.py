"""The `ctxrepro` command line: run stages by hand, inspect params, switch profiles."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import List, Optional

import typer

from ctxrepro.config import BaseParams, ParamsError, load_params, to_plain
from ctxrepro.container import DockerError, docker_app
from ctxrepro.io import error_line
from ctxrepro.metrics.normals import normals_command
from ctxrepro.metrics.purity import purity_command
from ctxrepro.metrics.voc import voc_command
from ctxrepro.preflight.check import PreflightError, stage_check
from ctxrepro.report.writer import report_command
from ctxrepro.stage import StageError, available_stages, resolve_params, run_stage, stage_help, stage_shards

app = typer.Typer(help="Reproduce Doersch et al. 2015 (context prediction) as a DVC pipeline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
stage_app = typer.Typer(help="Run one DVC stage by hand (what `dvc repro` calls).", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(docker_app, name="docker")
eval_app = typer.Typer(help="Evaluate results files with the protocols other projects use (VOC AP, normals, purity).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _one_line_errors(command):
    """A command whose read and write failures (OSError, or an error raised from one) are one line and
    exit 1; `--debug` or CTXREPRO_DEBUG=1 lets the traceback through instead."""
    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            line = error_line(e)
            if line is None or _DEBUG[0] or os.environ.get("CTXREPRO_DEBUG", "") not in ("", "0"):
                raise
            _fail(line, 1)

    return guarded


_DEBUG = [False]  # set per invocation by --debug


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show tracebacks (also CTXREPRO_DEBUG=1)")) -> None:
    _DEBUG[0] = debug


eval_app.command("voc")(_one_line_errors(voc_command))
eval_app.command("normals")(_one_line_errors(normals_command))
eval_app.command("purity-coverage")(_one_line_errors(purity_command))
app.command("report")(_one_line_errors(report_command))

PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", help="params file to read")
SET_OPT = typer.Option(None, "--set", help="override section.key=value (YAML value), repeatable, like dvc exp run -S")
SHARD_OPT = typer.Option("0/1", "--shard", help="run shard i of n: split the work across machines")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(name: str, params: Path, sets: list[str], shard: str) -> None:
    _setup_logging()
    try:
        run_stage(name, params, sets, shard, preflight=stage_check)
    except (ParamsError, PreflightError) as e:
        _fail(str(e), 2)
    except (StageError, DockerError) as e:
        _fail(str(e), 1)


def _make_stage_command(name: str):
    """The stage's command; only a stage that splits its work (`SHARDS = True` in its module) takes --shard."""
    if stage_shards(name):
        def command(params: Path = PARAMS_OPT, set_: Optional[List[str]] = SET_OPT, shard: str = SHARD_OPT) -> None:
            _run(name, params, list(set_ or []), shard)
    else:
        def command(params: Path = PARAMS_OPT, set_: Optional[List[str]] = SET_OPT) -> None:
            _run(name, params, list(set_ or []), "0/1")

    command.__name__ = f"stage_{name}"
    return command


for _name in available_stages():
    stage_app.command(name=_name, help=stage_help(_name))(_one_line_errors(_make_stage_command(_name)))


def _params_class(stage: str) -> type:
    if stage == "base":
        return BaseParams
    if stage not in available_stages():
        _fail(f"unknown stage '{stage}'; available: base, {', '.join(available_stages())}", 2)
    return importlib.import_module(f"stages.{stage}").Params


def _active(stage: str, cls: type, path: Path) -> dict | None:
    """The section as the params file sets it, parsed and checked like a stage does; None without the file."""
    if not path.is_file():
        return None
    try:
        base, params = load_params(path, stage, cls)
    except ParamsError as e:
        _fail(str(e), 2)
    return to_plain(base if stage == "base" else params)


def _rule(f: dataclasses.Field) -> str:
    rule = []
    if f.metadata.get("choices") is not None:
        rule.append("one of " + "|".join(map(str, f.metadata["choices"])))
    if f.metadata.get("min") is not None:
        rule.append(f">= {f.metadata['min']}")
    if f.metadata.get("max") is not None:
        rule.append(f"<= {f.metadata['max']}")
    return "; " + ", ".join(rule) if rule else ""


def _describe(cls: type, prefix: str, active: dict | None, source: str) -> list[str]:
    """One row per key: type, default and rule, then the params file's value (`*` where it differs)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += _describe(type(default), f"{prefix}{f.name}.", None if active is None else active[f.name], source)
            continue
        tname = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        value = ""
        if active is not None:
            mark = "" if active[f.name] == to_plain(default) else " *"
            value = f"  {source}: {active[f.name]!r}{mark}"
        rows.append(f"{prefix}{f.name} ({tname}; default {to_plain(default)!r}{_rule(f)}){value}"
                    f"  {f.metadata.get('help', '')}")
    return rows


@app.command("params")
def params_cmd(stage: str = typer.Argument(..., help="stage name, or 'base'"),
               params: Path = typer.Option(Path("params.yaml"), "--params", help="params file whose values to show")
               ) -> None:
    """List a params section's keys with types, defaults, allowed values and the params file's values."""
    cls = _params_class(stage)
    active = _active(stage, cls, params)
    head = (f"# {params}: no such file; the code's defaults only" if active is None else
            f"# {stage}: the code's defaults and {params}'s values (* where they differ)")
    typer.echo("\n".join([head, *_describe(cls, f"{stage}.", active, str(params))]))


@app.command("profile")
def profile_cmd(name: str = typer.Argument(..., help="tiny, smoke or paper"),
                force: bool = typer.Option(False, "--force", help="overwrite a params.yaml with local edits")) -> None:
    """Switch params.yaml to a profile (profiles/<name>.yaml); `dvc params diff` then shows the switch."""
    from ctxrepro.profiles import ProfileError, switch_profile

    try:
        previous = switch_profile(Path.cwd(), name, force=force)
    except ProfileError as e:
        _fail(str(e), 2)
    typer.echo(f"params.yaml is now the '{name}' profile (was: {previous}); see `dvc params diff`")


@app.command("check")
def check_cmd(params: Path = PARAMS_OPT,
              as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object")) -> None:
    """Before `dvc repro` (`make repro` runs it first): every params section and the keys sections share, what
    DVC would run, the inputs they need, their disk and memory, and the free disk. Exits 2 when a param is
    wrong, an input is missing or the disk will not hold."""
    import json

    from ctxrepro.preflight.check import format_report, run_check
    from ctxrepro.profiles import current_profile

    try:
        report = run_check(Path.cwd(), resolve_params(params), current_profile(Path.cwd()))
    except ParamsError as e:
        _fail(str(e), 2)
    typer.echo(json.dumps(report.to_json(), indent=1) if as_json else format_report(report))
    raise typer.Exit(report.code)


@app.command("states")
def states_cmd(remove: Optional[str] = typer.Option(None, "--remove", help="delete the kept state with this config "
                                                    "hash (or folder); nothing else ever deletes one"),
               params: Path = PARAMS_OPT,
               as_json: bool = typer.Option(False, "--json", help="print the list as JSON")) -> None:
    """List the kept resume states (one per stage instance and configuration) and how each differs from the params."""
    import json

    from ctxrepro.states.listing import current_records, format_states, list_states, remove_state

    if remove is not None:
        try:
            removed = remove_state(Path.cwd(), remove)
        except (OSError, ValueError) as e:
            _fail(str(e), 2)
        typer.echo("\n".join(f"removed {p}" for p in removed))
        return
    current, notes = current_records(params)
    rows = list_states(Path.cwd(), current)
    typer.echo(json.dumps(rows, indent=2) if as_json else "\n".join([format_states(rows), *notes]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
