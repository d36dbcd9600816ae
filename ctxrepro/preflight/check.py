"""`ctxrepro check` and the check each `ctxrepro stage` runs for its own instance before it loads any data.

The whole check: the instances `dvc repro` would run (DVC's status, plus what is downstream of it), every
external input they need and its state, and per instance the disk it will write and its peak host memory,
against the free disk. It fails (exit 2) when a needed input is missing or the disk will not hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ctxrepro.preflight import inputs, repo
from ctxrepro.preflight.inputs import Input
from ctxrepro.preflight.plan import Instance, counts, instance_of, instances
from ctxrepro.preflight.sizes import Estimate

_log = logging.getLogger("ctxrepro.preflight")


class PreflightError(RuntimeError):
    """An input a stage needs is missing, or its disk will not hold: the message says which and how much."""


@dataclass
class Report:
    stages: dict[str, dict]
    runs: dict[str, list[str]]
    inputs: list[Input]
    missing: list[str]
    disk_free_bytes: int
    disk_needed_bytes: int
    cache: dict
    states: list[tuple[str, int]] = field(default_factory=list)
    profile: str = "custom"

    @property
    def code(self) -> int:
        return 2 if self.missing else 0

    def to_json(self) -> dict:
        return {"profile": self.profile, "stages": self.stages, "missing": self.missing,
                "disk_free_bytes": self.disk_free_bytes, "disk_needed_bytes": self.disk_needed_bytes,
                "cache": self.cache, "inputs": [i.to_dict() for i in self.inputs],
                "resume_states": [{"path": p, "bytes": b} for p, b in self.states]}


def gb(n: int | float) -> str:
    return f"{n / 1e9:,.1f} GB" if abs(n) >= 1e8 else f"{n / 1e6:,.1f} MB"


def _disk(root: Path, running: dict[str, Estimate], cache_dir: Path, copies: bool) -> tuple[dict, list[str]]:
    """Bytes needed against free bytes, for the repo's file system and (when elsewhere) the cache's."""
    outs = sum(e.cached + e.uncached + e.kept for e in running.values())
    copy = sum(e.cached for e in running.values()) if copies else 0
    scratch = max((e.scratch for e in running.values()), default=0)  # stages run one at a time
    free_repo, free_cache = repo.free_bytes(root), repo.free_bytes(cache_dir)
    shared = repo.same_device(root, cache_dir)
    need = {"outputs_bytes": outs, "cache_copies_bytes": copy, "scratch_peak_bytes": scratch,
            "repo_free_bytes": free_repo, "cache_free_bytes": free_cache, "same_file_system": shared}
    short = []
    if shared and outs + copy + scratch > free_repo:
        short.append(f"disk: needs {gb(outs + copy + scratch)}, {gb(free_repo)} free for the repository and its "
                     f"DVC cache (cache.type hardlink or symlink saves {gb(copy)})" if copy else
                     f"disk: needs {gb(outs + scratch)}, {gb(free_repo)} free for the repository")
    if not shared and outs + scratch > free_repo:
        short.append(f"disk: needs {gb(outs + scratch)}, {gb(free_repo)} free on {repo.existing(root)}")
    if not shared and copy > free_cache:
        short.append(f"DVC cache: needs {gb(copy)}, {gb(free_cache)} free on {repo.existing(cache_dir)}")
    return need, short


def _problems(found: list[Input], running: set[str]) -> list[str]:
    lines = []
    for item in found:
        if item.problem and running & set(item.needed_by):
            users = ", ".join(n for n in item.needed_by if n in running)
            lines.append(f"{item.name} ({item.kind}, needed by {users}): {item.status} at {item.where}"
                         + (f"; {item.detail}" if item.detail else ""))
    return lines


def run_check(root: Path, p: dict, profile: str = "custom") -> Report:
    """The whole preflight for params `p` (every section, resolved) in the checkout at `root`."""
    from ctxrepro.preflight import estimate  # counts networks with torch: not at `ctxrepro --help`

    names = instances(p)
    stale, why = repo.dvc_status(root)
    runs = repo.would_run(root, [i.name for i in names], stale, why)
    found = inputs.required_inputs(p, root, fetched="fetch" not in runs)
    c = counts(p)
    cache_dir, cache_type, copies = repo.cache_setup(root)
    est = {i.name: estimate.instance(p, c, i) for i in names}
    stages = {}
    for i in names:
        e = est[i.name]
        stages[i.name] = {"disk_bytes": e.disk(copies), "memory_bytes": e.memory, "runs": i.name in runs,
                          "why": runs.get(i.name, []), "outputs_bytes": e.outs, "kept_bytes": e.kept,
                          "scratch_bytes": e.scratch,
                          "inputs": [f"{x.name}: {x.status}" for x in inputs.for_instance(found, i.name)]}
    need, short = _disk(root, {n: est[n] for n in runs}, cache_dir, copies)
    missing = _problems(found, set(runs)) + short
    cache = {"dir": str(cache_dir), "type": cache_type, "copies": copies, **need}
    total = need["outputs_bytes"] + need["cache_copies_bytes"] + need["scratch_peak_bytes"]
    return Report(stages, runs, found, missing, need["repo_free_bytes"], total, cache, repo.kept_states(root),
                  profile)


def _stage_inputs(p: dict, root: Path, inst: Instance) -> list[Input]:
    """What one instance reads from outside the pipeline: fetch reads the sources; later stages read what
    fetch placed in data/raw (or the world generated), plus their own files and weights."""
    if inst.stage == "fetch":
        return [i for i in inputs.archive_inputs(p, root, fetched=False) if inst.name in i.needed_by]
    own = inputs.weights_inputs(p)
    placed = inputs.archive_inputs(p, root, fetched=True)
    late = [i if i.status in ("fetched", "generated") else
            Input(i.name, i.kind, i.where, "missing", i.needed_by, i.required,
                  f"not in data/raw: fetch did not place it. {i.detail}".strip())
            for i in placed if inst.name in i.needed_by]
    return [i for i in own if inst.name in i.needed_by] + late


def stage_check(root: Path, stage: str, p: dict) -> Instance:
    """The check `ctxrepro stage` runs before loading data: this instance's inputs, and its disk against the
    free disk. Raises PreflightError naming what is missing or how much disk is needed."""
    from ctxrepro.preflight import estimate

    inst = instance_of(stage, p[stage])
    problems = _problems(_stage_inputs(p, root, inst), {inst.name})
    try:
        e = estimate.instance(p, counts(p), inst)
    except (KeyError, TypeError, ValueError) as err:  # a custom params file without a key the estimate reads
        _log.warning("%s: disk estimate skipped (params: %s)", inst.name, err)
        e = None
    if e is not None:
        _, copies = repo.cache_setup(root)[1:]
        need, free = e.disk(copies), repo.free_bytes(root)
        if need > free:
            problems.append(f"disk: {inst.name} needs {gb(need)}, {gb(free)} free on {repo.existing(root)}")
    if problems:
        raise PreflightError(f"{inst.name} cannot start: " + " | ".join(problems))
    return inst


def _input_line(i: Input) -> str:
    flag = "MISSING" if i.problem else ("optional" if not i.required and i.status in inputs.PROBLEMS else "ok")
    return f"  {flag:8s} {i.name:36s} {i.status:12s} {i.where}"


def format_report(r: Report) -> str:
    """The report as `ctxrepro check` prints it."""
    lines = [f"profile: {r.profile}", f"dvc repro would run {len(r.runs)} of {len(r.stages)} stage instances:"]
    width = max((len(n) for n in r.stages), default=10)
    for name, s in r.stages.items():
        if s["runs"]:
            why = s["why"][0] + (f" (+{len(s['why']) - 1} more)" if len(s["why"]) > 1 else "")
            sizes = f"disk {gb(s['disk_bytes']):>10s}  memory {gb(s['memory_bytes']):>9s}"
            lines.append(f"  {name:{width}s}  {sizes}  {why}")
    lines.append("inputs:")
    lines += [_input_line(i) for i in r.inputs]
    c = r.cache
    lines.append(f"disk: needs {gb(r.disk_needed_bytes)} = outputs {gb(c['outputs_bytes'])} + DVC cache copies "
                 f"{gb(c['cache_copies_bytes'])} (cache.type {c['type']}) + scratch peak {gb(c['scratch_peak_bytes'])}")
    where = "repo and cache" if c["same_file_system"] else f"repo; {gb(c['cache_free_bytes'])} free for the cache"
    lines.append(f"free: {gb(r.disk_free_bytes)} ({where})")
    peak = max(r.stages.items(), key=lambda kv: kv[1]["memory_bytes"] if kv[1]["runs"] else -1, default=None)
    if peak is not None and peak[1]["runs"]:
        lines.append(f"peak host memory: {gb(peak[1]['memory_bytes'])} ({peak[0]})")
    if r.states:
        lines.append("kept resume states (removed only by hand):")
        lines += [f"  {path}  {gb(size)}" for path, size in r.states]
    if r.missing:
        lines.append(f"cannot run: {len(r.missing)} problem(s)")
        lines += [f"  - {m}" for m in r.missing]
    else:
        lines.append("ok: every needed input is present or downloadable, and the disk holds")
    return "\n".join(lines)
