"""Per-instance params (issue 22): each foreach instance of dvc.yaml depends on its section's shared keys and
its own entry, never on the hand-run selector or on the other instances' entries, so editing one variant or
adding one row leaves every other instance's results valid."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import yaml

from ctxrepro.config import load_yaml
from tests.helpers import BIN, clone_tree, run_in

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("tiny", "smoke", "paper")
# Keys an instance does not read as a param: the hand-run selector (dvc.yaml's cmd sets it per instance) and
# the foreach collection itself (an instance reads its own entry, named below, not the other entries).
NOT_READ = {"pretrain": {"variant", "variants"}, "convert": {"row", "rows"}, "detect": {"row"},
            "normals": {"init", "rows"}, "linear_probe": {"network", "networks"}}
ENTRY = {"pretrain": "pretrain.variants.${key}", "convert": "convert.rows.${key}"}


def _foreach_params() -> dict[str, list[str]]:
    """Each foreach stage of dvc.yaml -> the params keys its `do:` block names (file-qualified lists merged)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            continue
        keys = []
        for item in stage["do"].get("params", []):
            keys.extend([item] if isinstance(item, str) else [k for v in item.values() for k in v])
        out[name] = keys
    return out


def test_every_foreach_stage_is_known():
    assert sorted(_foreach_params()) == sorted(NOT_READ)


@pytest.mark.parametrize("section", sorted(NOT_READ))
def test_instance_params_cover_every_shared_key(section):
    """A key added to a section (its Params, or any profile) must be in dvc.yaml's list, or no change of it
    would ever rerun the stage; a selector or the whole section must not be there."""
    declared = _foreach_params()[section]
    own = {k.split(".", 1)[1] for k in declared if k.startswith(f"{section}.") and "${" not in k}
    fields = {f.name for f in dataclasses.fields(importlib.import_module(f"stages.{section}").Params)}
    in_profiles = set().union(*(load_yaml(ROOT / "profiles" / f"{p}.yaml")[section] for p in PROFILES))
    missing = sorted((fields | in_profiles) - NOT_READ[section] - own)
    assert not missing, f"dvc.yaml {section}'s params miss {', '.join(f'{section}.{k}' for k in missing)}"
    assert own <= fields, f"dvc.yaml {section} names keys its Params lacks: {sorted(own - fields)}"
    assert not own & NOT_READ[section], f"dvc.yaml {section} depends on {sorted(own & NOT_READ[section])}"
    assert section not in declared, f"dvc.yaml {section} depends on its whole section"
    entries = [k for k in declared if "${" in k]
    assert entries == ([ENTRY[section]] if section in ENTRY else []), entries


# --- `dvc status` in a clone -------------------------------------------------------------------------------


def _lock_params_from_workspace(repo: Path) -> None:
    """Rewrite the params of every instance in the clone's dvc.lock with the values params.yaml holds now, as
    `dvc repro` would record them: `dvc status` then reports only what a later edit changes (the clone has
    no data or models, so its deps and outs are stale whatever the params)."""
    code = (
        "import yaml\n"
        "from pathlib import Path\n"
        "from dvc.repo import Repo\n"
        "from dvc.dependency.param import ParamsDependency\n"
        "lock = yaml.safe_load(Path('dvc.lock').read_text())\n"
        "with Repo('.') as repo:\n"
        "    for stage in repo.index.stages:\n"
        "        if stage.name in lock['stages']:\n"
        "            lock['stages'][stage.name]['params'] = {d.def_path: d.read_params() for d in stage.deps\n"
        "                                                     if isinstance(d, ParamsDependency)}\n"
        "Path('dvc.lock').write_text(yaml.safe_dump(lock, sort_keys=False))\n")
    run_in([str(BIN / "python"), "-c", code], repo)


def _params_changes(repo: Path) -> dict[str, object]:
    """`dvc status --json`'s params entries only: instance -> {key: state}, or 'new' for an instance that
    was never run."""
    status = json.loads(run_in([str(BIN / "dvc"), "status", "--json"], repo).stdout or "{}")
    out = {}
    for name, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and "params.yaml" in entry.get("changed deps", {}):
                out[name] = entry["changed deps"]["params.yaml"]
    return out


def _edit(repo: Path, change) -> None:
    data = load_yaml(repo / "params.yaml")
    change(data)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def locked_clone(tmp_path_factory) -> Path:
    repo = clone_tree(ROOT, tmp_path_factory.mktemp("params"))
    _lock_params_from_workspace(repo)
    assert _params_changes(repo) == {}  # the baseline: params match the lock everywhere
    run_in(["git", "commit", "-qam", "lock params"], repo)
    return repo


@pytest.fixture
def clone(locked_clone):
    yield locked_clone
    run_in(["git", "checkout", "-q", "--", "params.yaml"], locked_clone)


def _set(*path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


@pytest.mark.slow
def test_one_variants_key_invalidates_only_that_variant(clone):
    steps = load_yaml(clone / "params.yaml")["pretrain"]["variants"]["vgg16"]["steps"]
    _edit(clone, _set("pretrain", "variants", "vgg16", "steps", value=steps + 1))
    assert _params_changes(clone) == {"pretrain@vgg16": {"pretrain.variants.vgg16": "modified"}}


@pytest.mark.slow
def test_a_new_row_leaves_the_other_rows_valid(clone):
    _edit(clone, _set("convert", "rows", "vgg16-ours", value={"variant": "vgg16", "init": "ours"}))
    assert _params_changes(clone) == {"convert@vgg16-ours": "new", "detect@vgg16-ours": "new"}


@pytest.mark.slow
def test_a_new_normals_row_leaves_the_other_rows_valid(clone):
    rows = load_yaml(clone / "params.yaml")["normals"]["rows"]
    _edit(clone, _set("normals", "rows", value=[*rows, "color_dropping-ours_rescale"]))
    assert _params_changes(clone) == {"normals@color_dropping-ours_rescale": "new"}


@pytest.mark.slow
@pytest.mark.parametrize("section,key,instances", [
    ("pretrain", "lr", "pretrain@"), ("convert", "batch", "convert@"), ("detect", "lr", "detect@"),
    ("normals", "lr", "normals@"), ("linear_probe", "dims", "linear_probe@")])
def test_a_shared_key_invalidates_every_instance_of_its_stage(clone, section, key, instances):
    data = load_yaml(clone / "params.yaml")
    _edit(clone, _set(section, key, value=data[section][key] * 2))
    expected = {s: {f"{section}.{key}": "modified"}
                for s in yaml.safe_load((clone / "dvc.lock").read_text())["stages"] if s.startswith(instances)}
    assert len(expected) >= 2
    assert _params_changes(clone) == expected


@pytest.mark.slow
@pytest.mark.parametrize("section,key,value", [
    ("pretrain", "variant", "vgg16"), ("convert", "row", "vgg16-ours_rescale"), ("detect", "row", "vgg16-ours_rescale"),
    ("normals", "init", "color_dropping-scratch"), ("linear_probe", "network", "random")])
def test_a_hand_run_selector_invalidates_nothing(clone, section, key, value):
    assert load_yaml(clone / "params.yaml")[section][key] != value
    _edit(clone, _set(section, key, value=value))
    assert _params_changes(clone) == {}
