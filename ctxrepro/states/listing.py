"""Listing and removing kept resume states (`ctxrepro states`; issue 22).

Every stage keeps its resume states under `models/<stage>_state/<instance>/<config hash>/` (`states.folders`).
`list_states` reads them without loading a tensor (each state's `last.json`), and says in which params keys
each differs from the current params; `remove_state` deletes one configuration's folder, and is the only code
that ever deletes a kept state.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any, Mapping

from ctxrepro.checkpoint import prev_path
from ctxrepro.states.folders import LAST, differences, read_info

MODELS = Path("models")
STAGES_WITH_STATES = ("pretrain", "detect", "normals")  # stages whose `state_records` give the current params


def _folder_row(stage: str, instance: str, folder: Path, files: list[Path], current: Mapping[str, dict] | None
                ) -> dict[str, Any]:
    info = read_info(folder / LAST) or {}
    newest = folder / LAST if (folder / LAST).is_file() else prev_path(folder / LAST)
    record = None if current is None else current.get(f"{stage}/{instance}", current.get(stage))
    differs = None
    if record is not None and isinstance(info.get("config"), dict):
        differs = differences(info["config"], record, only_current=True)
    single = folder.name == instance  # a state of the single-file layout, moved into its folder at the next run
    return {"stage": stage, "instance": instance, "path": str(folder), "config_hash": "-" if single else folder.name,
            "position": info.get("position"), "step": info.get("at"), "bytes": sum(f.stat().st_size for f in files),
            "mtime": newest.stat().st_mtime if newest.exists() else None, "differs": differs,
            "set_aside": sorted(f.name for f in files if f.name.startswith((LAST + ".", "prev.pt.")))}


def list_states(root: Path, current: Mapping[str, dict] | None = None) -> list[dict[str, Any]]:
    """Every kept state under `root/models/*_state/<instance>/<config hash>/`, one dict per configuration:
    stage, instance, path, config_hash, position ("step" or "iteration"), step, bytes (the folder's files,
    set-aside ones included), mtime (of last.pt, else prev.pt), set_aside (names of files set aside as bad) and
    differs: the params keys in which it differs from `current["<stage>/<instance>"]` (or `current["<stage>"]`),
    as "key: kept -> now" ([] = the same params; None = no current record given)."""
    rows = []
    for stage_dir in sorted((Path(root) / MODELS).glob("*_state")):
        stage = stage_dir.name[:-len("_state")]
        for instance_dir in sorted(d for d in stage_dir.iterdir() if d.is_dir()):
            loose = [f for f in instance_dir.iterdir() if f.is_file() and f.name.startswith((LAST, "prev.pt"))]
            if loose:
                rows.append(_folder_row(stage, instance_dir.name, instance_dir, loose, current))
            for folder in sorted(d for d in instance_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
                files = [f for f in folder.rglob("*") if f.is_file()]
                if any(f.parent == folder and f.name.startswith((LAST, "prev.pt")) for f in files):  # not a cache
                    rows.append(_folder_row(stage, instance_dir.name, folder, files, current))
    return rows


def remove_state(root: Path, target: str) -> list[Path]:
    """Delete kept states named by `target`: a config hash (or a unique prefix of 6+ characters) or the path of
    a configuration folder (an instance folder: only its own files, a single-file state or ones set aside).
    Returns the folders removed from; ValueError names what matched nothing or too much."""
    rows = list_states(root)
    path = Path(target)
    if path.exists():
        chosen = [Path(r["path"]) for r in rows if Path(r["path"]).resolve() == path.resolve()]
    elif len(target) >= 6:
        chosen = [Path(r["path"]) for r in rows if r["config_hash"].startswith(target) and r["config_hash"] != "-"]
    else:
        chosen = []
    if not chosen:
        raise ValueError(f"no kept state is {target!r}: give a config hash or a folder that `ctxrepro states` lists")
    if len({p.name for p in chosen}) > 1:
        raise ValueError(f"{target!r} matches states {', '.join(sorted({p.name for p in chosen}))}: give more of it")
    for folder in chosen:
        if any(r["config_hash"] == "-" and Path(r["path"]) == folder for r in rows):
            for f in folder.iterdir():  # an instance folder's own states: its configuration folders stay
                if f.is_file() and f.name.startswith((LAST, "prev.pt")):
                    f.unlink()
        else:
            shutil.rmtree(folder)
    return chosen


def current_records(params_path: Path) -> tuple[dict[str, dict], list[str]]:
    """The params part of each stage's state record under `params_path` (`stages.<stage>.state_records`),
    and a note per stage whose params could not be read."""
    from ctxrepro.config import ParamsError, load_params

    records: dict[str, dict] = {}
    notes = []
    for stage in STAGES_WITH_STATES:
        module = importlib.import_module(f"stages.{stage}")
        try:
            base, params = load_params(params_path, stage, module.Params)
        except (OSError, ParamsError, ValueError) as e:
            notes.append(f"{stage}: params not compared ({e})")
            continue
        records.update(module.state_records(params, base))
    return records, notes


def format_states(rows: list[dict[str, Any]]) -> str:
    """One line per kept state, then the total size."""
    lines = []
    for r in rows:
        if r["differs"] is None:
            status = "not compared"
        else:
            status = "same params as now" if not r["differs"] else "differs: " + "; ".join(r["differs"])
        aside = f"; set aside: {', '.join(r['set_aside'])}" if r["set_aside"] else ""
        lines.append(f"{r['stage']}/{r['instance']} {r['config_hash']}  {r['position']} {r['step']}  "
                     f"{r['bytes'] / 1e6:.1f} MB  {r['path']}  ({status}{aside})")
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} kept state{'' if len(rows) == 1 else 's'}, {total / 1e6:.1f} MB; remove one with "
                 f"`ctxrepro states --remove HASH`")
    return "\n".join(lines)
