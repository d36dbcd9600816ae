"""The smoke profile end to end: `ctxrepro profile smoke && dvc repro` in a fresh clone, every stage at the paper's
shapes (AlexNet/VGG-16 towers on 96-px patches, 227-px convert, 600-px Fast R-CNN, 480x640 normals) with a few
steps each, on the CPU. About 21 minutes on 2 cores: it runs in `make test` (CI), not in `make test-fast`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import clone_tree, run_in

ROOT = Path(__file__).resolve().parents[1]


def _json(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


@pytest.mark.slow
@pytest.mark.smoke
def test_smoke_profile_runs_every_stage_at_the_papers_shapes(tmp_path):
    repo = clone_tree(ROOT, tmp_path)
    shutil.rmtree(repo / "metrics")  # the committed tiny run's: every file checked below must be written anew
    run_in(["ctxrepro", "profile", "smoke"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    repro = run_in(["dvc", "repro"], repo, threads=None)
    log = repro.stdout + repro.stderr
    assert json.loads(run_in(["dvc", "status", "--json"], repo).stdout) == {}
    stages = run_in(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert sorted(locked) == sorted(stages)  # every stage instance ran

    world = _json(repo, "metrics/fetch.json")["world"]
    assert world["nyuv2"]["images"] == params["fetch"]["world"]["nyu_images"]
    for variant in params["pretrain"]["variants"]:
        m = _json(repo, f"metrics/pretrain/{variant}.json")
        assert m["steps"] == (1 if variant == "vgg16" else params["pretrain"]["steps"]), variant
    rows = params["convert"]["rows"]
    assert len(rows) == 10  # Table 1's rows, the ImageNet ones from random-init torchvision networks
    for row, spec in rows.items():
        convert, detect = _json(repo, f"metrics/convert/{row}.json"), _json(repo, f"metrics/detect/{row}.json")
        assert convert["init"] == spec["init"] and 0.0 <= detect["map"] <= 1.0, row
        assert convert["conv5_stride"] == 16, row
        if convert["network"] == "caffenet":  # RoI pooling to CaffeNet's 6x6 (AlexNet) or VGG-16's 7x7
            assert convert["pool5_side"] == {"color_dropping": 6, "vgg16": 7}[spec["variant"]], row
        elif spec["init"] != "imagenet":  # Figure 6: 227-px input, pool5 7x7
            assert convert["pool5_side"] == 7, row
    for row in params["normals"]["rows"]:
        assert f"models/convert/{row}.pt: 480x640 input" in log, row
        m = _json(repo, f"metrics/normals/{row}.json")  # Table 2's protocol, from the world's FAIR-format zip
        assert (m["gt_source"], m["codebook"], m["codebook_size"]) == ("fair", "vocab", 40), row
    for network in params["linear_probe"]["networks"]:
        m = _json(repo, f"metrics/linear_probe/{network}.json")
        assert set(m["imagenet_top1"]) == set(m["voc07_map"]) == set(params["linear_probe"]["layers"]), network
    assert "Table 1" in (repo / "REPORT.md").read_text()
