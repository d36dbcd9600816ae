"""REPORT.md on a tiny fake run: every table present, numbers read from the metrics files, the tiny-world
disclaimer, "not run" for missing stages, offline plots, and what changed from `dvc metrics diff` (stubbed,
plus one real two-commit git + dvc repository)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxrepro.detection.table import paper_row
from ctxrepro.report import paper_numbers as P
from ctxrepro.report import plots as RP
from ctxrepro.report import writer as R

CLASSES = ("bus", "car", "diningtable", "horse", "motorbike", "sofa", "train", "tvmonitor")
PARAMS = "base:\n  seed: 0\n"


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _detect(init: str, row: str | None, map_: float) -> dict:
    # per-class APs 0.10, 0.20, ... so the mean is not the map written (the report must print the file's map)
    return {"init": init, "paper_row": row, "protocol": "Fast R-CNN training, R-CNN-style rows (no box regression)", "ap": {c: 0.1 * (i + 1) for i, c in enumerate(CLASSES)}, "map": map_,
            "seconds": {"train": 1.0, "test": 2.0, "total": 3.5}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fake tiny-profile run: params equal to profiles/tiny.yaml, every metrics file, the plot inputs."""
    root = tmp_path / "run"
    _text(root / "params.yaml", PARAMS)
    _text(root / "profiles/tiny.yaml", PARAMS)
    _text(root / "profiles/paper.yaml", "base:\n  seed: 1\n")
    m = root / "metrics"
    _json(m / "fetch.json", {"datasets": {d: {"source": "builtin", "images": 7} for d in
                                          ("imagenet", "voc2007", "voc2011", "nyuv2")}, "seconds": 1.5})
    _json(m / "pretrain/color_dropping.json", {"steps": 1234, "seconds": 86.4, "train_accuracy": 0.4567, "chance": 0.125,
                                "heldout_accuracy": 0.3789, "heldout_pairs": 2048, "pairs_per_second": 99.0,
                                "stopped_by": "steps"})
    _json(m / "detect/projection-ours.json", _detect("ours", "Ours-projection", 0.4321))
    _json(m / "detect/color_dropping-scratch.json", _detect("scratch", "Scratch-Ours", 0.2468))
    _json(m / "normals/color_dropping-ours.json", {"mean": 27.36, "median": 21.06, "rmse": 33.33, "within_11.25": 12.34,
                                    "within_22.5": 45.67, "within_30": 67.89, "gt_source": "fair",
                                    "codebook": "vocab", "codebook_size": 40})
    _json(m / "pretext_eval.json", {
        "accuracy": 0.3137, "n_images": 120, "n_pairs": 30720, "chance": 0.125, "accuracy_in_boxes": 0.2871,
        "n_pairs_in_boxes": 512, "min_box_side": 120, "accuracy_per_class": {"car": 0.6049, "bus": 0.1111},
        "n_pairs_per_class": {"car": 256, "bus": 256}, "accuracy_train_images": 0.4242,
        "n_pairs_train_images": 1000, "accuracy_heldout_images": 0.3536, "n_pairs_heldout_images": 900})
    _json(m / "aberration.json", {"rmse_top10": 0.1412, "rmse_chance": 0.3319, "rmse_top10_projected": 0.2718,
                                  "rmse_all": 0.2999, "rmse_all_projected": 0.3101, "rmse_top10_control": 0.2827,
                                  "top_fraction": 0.1, "source": "world"})
    _json(m / "mine.json", {"auc": 0.6543, "auc_at_0.5": 0.3456, "chance_auc": 0.5012, "chance_auc_at_0.5": 0.25,
                            "n_clusters_selected": 40, "eval_n_constellations": 512})
    _json(m / "nn.json", {"k": 10, "precision_at_k": {"pretrained": 0.4444, "random": 0.2222},
                          "precision_at_k_objects": {"pretrained": 0.5556, "random": 0.3333},
                          "precision_chance": 0.1999, "precision_chance_objects": 0.1, "notes": {}})
    curves = root / "dvclive/pretrain/color_dropping/plots/metrics/train"
    _text(curves / "loss.tsv", "step\tloss\n0\t2.08\n10\t1.9\n20\t1.7\n")
    _text(curves / "accuracy.tsv", "step\taccuracy\n0\t0.12\n10\t0.2\n20\t0.3\n")
    _text(root / "plots/detect/projection-ours/loss.csv", "iteration,loss,loss_cls,loss_box\n20,1.5,1.0,0.5\n40,1.2,0.8,0.4\n")
    _text(root / "plots/pretext_eval/confusion.csv", "actual,predicted\n0,0\n0,1\n7,7\n3,3\n3,3\n")
    _text(root / "plots/mine/purity_coverage.csv", "coverage,purity\n0.1,1.0\n0.4,0.8\n0.7,0.6\n")
    Image.new("RGB", (4, 4)).save(root / "plots/detect/projection-ours/x.png")
    (root / "plots/nn").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "plots/nn/montage.png")
    return root


@pytest.fixture
def no_plots(monkeypatch):
    """For tests about the tables only: skip drawing the PNGs (about 2 s per report on 2 cores)."""
    monkeypatch.setattr(R, "render_plots", lambda root, run, out: dict.fromkeys(RP.PLOTS, "skipped in this test"))


def _stub(rows=(), status="ok", message="stub diff against HEAD~1"):
    return lambda root, against, timeout: R.MetricsDiff(status, message, tuple(rows))


def _report(root: Path, **kw) -> tuple[str, dict]:
    summary = R.write_report(root, diff_fn=kw.pop("diff_fn", _stub()), **kw)
    return (root / "REPORT.md").read_text(), summary


def test_every_table_present_with_numbers_from_the_metrics_files(run_dir):
    text, summary = _report(run_dir)
    for heading in ("## Pretraining", "## Table 1", "## Table 2", "## Section 4.6", "## Section 4.2",
                    "## Figure 9", "## Section 4.1", "## Figures", "## What changed", "## Provenance"):
        assert heading in text
    # Table 1: the file's map (0.4321), not the mean of its APs (0.45); the paper's 45.7 beside it
    rcnn = "Fast R-CNN training, R-CNN-style rows (no box regression)"
    assert f"| Ours-projection | 45.7 | `projection-ours`: {rcnn} | 43.2 | 8 |" in text
    assert f"| Scratch-Ours | 39.8 | `color_dropping-scratch`: {rcnn} | 24.7 | 8 |" in text
    assert "| Ours-color-dropping | 46.3 | not run (row `color_dropping-ours`) |" in text
    assert "| Ours-rescale | 51.1 | not run (row `color_dropping-ours_rescale`) |" in text
    assert "| ImageNet-rescale | 56.5 | skipped: no ImageNet labels in the tiny world (row " \
           "`color_dropping-imagenet_rescale`) |" in text
    assert "| DPM-v5[17] | 33.7 | not reproduced (another method or other data) |" in text
    assert "not this configuration" not in text
    # per-class: paper row (bus 58.5, car 68.5) then ours (0.2 -> 20.0 for car, the 2nd of CLASSES)
    assert "| Ours-projection (paper) | 58.5 | 68.5 |" in text
    assert "| `projection-ours` (ours) | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 | 70.0 | 80.0 | 43.2 |" in text
    assert "| Ours (paper) | 33.2 | 21.3 | 36.0 | 51.2 | 57.8 | – |" in text
    assert "| `color_dropping-ours` (ours) | 27.4 | 21.1 | 12.3 | 45.7 | 67.9 | 33.3 |" in text
    assert "| `color_dropping-scratch` (ours) | not run |" in text
    assert ("Ground truth and codebook (Table 2's protocol: the FAIR benchmark's normals `fair` and its vocab40.mat "
            "`vocab`): `color_dropping-ours`: ground truth `fair`, codebook `vocab` (40).") in text
    assert "| `color_dropping-imagenet` (ours) | skipped: no ImageNet labels in the tiny world |" in text
    assert "| VOC 2007: 120 images (paper 500 x 256 pairs) | 38.4 | 31.4 | 30,720 |" in text
    assert "| inside boxes >= 120 px (paper 240) | 39.2 | 28.7 | 512 |" in text
    assert "| inside car boxes only | 45.6 | 60.5 | 256 |" in text
    assert "| ImageNet validation (held-out) images | 40.3 | 35.4 | 900 |" in text
    assert "| held-out accuracy at the end of pretraining (pretrain stage) | no paper number | 37.9 | 2,048 |" in text
    assert "| best 10% of images (paper 10%), raw | 0.255 | 0.141 |" in text
    assert "| best 10%, after colour projection | 0.321 | 0.272 |" in text
    assert "| AUC, ours | 0.87 | 0.654 |" in text
    assert "| AUC up to coverage 0.5, ours | figure only | 0.346 |" in text
    assert "| pretrained | 0.444 | 0.556 |" in text
    assert "| pretraining | paper | ours: `color_dropping` |" in text
    assert "| training steps | 1,700,000 | 1,234 |" in text
    assert "| detect/projection-ours | `metrics/detect/projection-ours.json` | ok | 3.5 |" in text
    assert summary["metrics_files"] == 9 and summary["metrics_unreadable"] == 0
    assert summary["not_run"] == ["resize", "convert", "proposals"]


def test_changing_a_metric_changes_the_report(run_dir, no_plots):
    before, _ = _report(run_dir)
    _json(run_dir / "metrics/detect/projection-ours.json", _detect("ours", "Ours-projection", 0.55))
    m = json.loads((run_dir / "metrics/aberration.json").read_text())
    _json(run_dir / "metrics/aberration.json", {**m, "rmse_top10": 0.2})
    after, _ = _report(run_dir)
    assert "| Ours-projection | 45.7 | `projection-ours`: Fast R-CNN training, R-CNN-style rows (no box regression) " \
           "| 55.0 | 8 |" in after
    assert "| best 10% of images (paper 10%), raw | 0.255 | 0.200 |" in after
    # ratios to each run's own chance: paper .255/.371 and .321/.371; ours .1412/.3319 -> .2/.3319, .2718/.3319
    assert "| best 10%, raw | 0.69 | 0.43 |" in before and "| best 10%, raw | 0.69 | 0.60 |" in after
    assert "| best 10%, after colour projection | 0.87 | 0.82 |" in after
    assert "43.2" in before and "43.2" not in after


def test_tiny_world_disclaimer_and_comparable_real_data(run_dir, no_plots):
    text, _ = _report(run_dir)
    assert "> **Tiny world.**" in text and "cannot be compared with the paper's numbers" in text
    assert text.count("**Tiny-world numbers: they cannot be compared with the paper's.**") == 7
    # the paper profile on real data: no disclaimer; sections say they are comparable
    shutil.copy(run_dir / "profiles/paper.yaml", run_dir / "params.yaml")
    _json(run_dir / "metrics/fetch.json", {"datasets": {d: {"source": "external", "images": 9} for d in
                                                        ("imagenet", "voc2007", "voc2011", "nyuv2")}})
    m = json.loads((run_dir / "metrics/aberration.json").read_text())
    _json(run_dir / "metrics/aberration.json", {**m, "source": "images"})
    text, summary = _report(run_dir)
    assert summary["profile"] == "paper"
    assert "Tiny" not in text and "tiny world" not in text
    assert text.count("Real data and the paper profile: comparable with the paper.") == 7


def test_missing_stages_say_not_run(run_dir):
    shutil.rmtree(run_dir / "metrics/normals")
    (run_dir / "metrics/mine.json").unlink()
    (run_dir / "plots/mine/purity_coverage.csv").unlink()
    text, summary = _report(run_dir)
    assert "| `color_dropping-ours` (ours) | not run |" in text
    assert "| normals | `metrics/normals/*.json` | not run | – |" in text
    assert "| mine | `metrics/mine.json` | not run | – |" in text
    assert "mine: not run (`metrics/mine.json` missing; `dvc repro mine`)." in text
    assert "| AUC, ours | 0.87 | – |" in text  # the paper's value stays, ours is absent
    assert "- Purity-coverage (Figure 9, section 4.5.1): not run: missing plots/mine/purity_coverage.csv" in text
    assert "normals" in summary["not_run"] and "mine" in summary["not_run"]


def test_unreadable_metrics_file_is_reported_not_fatal(run_dir, no_plots):
    (run_dir / "metrics/nn.json").write_text("{not json")
    _json(run_dir / "metrics/detect/bad.json", [1, 2])
    text, summary = _report(run_dir)
    assert summary["metrics_unreadable"] == 2
    assert "| nn | `metrics/nn.json` | metrics/nn.json: unreadable:" in text
    assert "| detect/bad | `metrics/detect/bad.json` | metrics/detect/bad.json: unreadable: expected a JSON " \
           "object, got list |" in text


def test_offline_plots_written_and_linked(run_dir):
    text, summary = _report(run_dir)
    assert summary["figures"] == 4
    for name in RP.PLOTS:
        with Image.open(run_dir / "plots/report" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
        assert f"](plots/report/{name})" in text
    assert "[plots/nn/montage.png](plots/nn/montage.png)" in text
    assert "Figure 5: absolute (x, y) from chromatic aberration (section 4.2): not run" in text


def test_confusion_counts_from_the_recorded_pairs(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("actual,predicted\n0,0\n0,1\n7,7\n3,3\n3,3\n")
    counts = RP.read_confusion(path)
    expected = np.zeros((8, 8), np.int64)
    expected[0, 0], expected[0, 1], expected[7, 7], expected[3, 3] = 1, 1, 1, 2
    np.testing.assert_array_equal(counts, expected)
    path.write_text("actual,predicted\n0,8\n")
    with pytest.raises(RP.PlotInputError, match="c.csv"):
        RP.read_confusion(path)


def test_bad_plot_input_skips_that_figure_with_the_reason(run_dir):
    _text(run_dir / "plots/mine/purity_coverage.csv", "coverage,purity\n0.1\n")
    text, summary = _report(run_dir)
    assert summary["figures"] == 3
    assert "unreadable input: " in text and "purity_coverage.csv: line 2 has a different number of fields" in text


def test_what_changed_table_from_a_stubbed_diff(run_dir, no_plots):
    data = {"metrics/report.json": {"figures": {"old": 3, "new": 4, "diff": 1}},
            "metrics/pretext_eval.json": {"accuracy": {"old": 0.3, "new": 0.3137, "diff": 0.0137}},
            "metrics/detect/ours.json": {"map": {"old": None, "new": 0.4321}}}
    rows = R.parse_diff(data)
    assert rows == (("metrics/detect/ours.json", "map", None, 0.4321, None),
                    ("metrics/pretext_eval.json", "accuracy", 0.3, 0.3137, 0.0137))
    text, _ = _report(run_dir, diff_fn=_stub(rows))
    assert "| `metrics/pretext_eval.json` | `accuracy` | 0.3 | 0.3137 | 0.0137 |" in text
    assert "| `metrics/detect/ours.json` | `map` | – | 0.4321 | – |" in text
    text, _ = _report(run_dir, diff_fn=_stub(rows), max_diff_rows=1)
    assert "1 more changed metrics not shown" in text
    text, _ = _report(run_dir, diff_fn=_stub(status="no_revision", message="there is no revision `HEAD~1`"))
    assert "Not compared: there is no revision `HEAD~1`." in text


def _git_dvc_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t.invalid", GIT_CONFIG_NOSYSTEM="1", HOME=str(home), DVC_NO_ANALYTICS="1",
               DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"), DVC_SITE_CACHE_DIR=str(home / "dvc-site"))
    return env


@pytest.mark.skipif(R._dvc() is None, reason="dvc is not installed")
def test_metrics_diff_in_a_real_git_dvc_repo(tmp_path, monkeypatch):
    root, home = tmp_path / "repo", tmp_path / "home"
    root.mkdir()
    for key, value in _git_dvc_env(home).items():
        monkeypatch.setenv(key, value)

    def run(*argv):
        subprocess.run(list(argv), cwd=root, check=True, capture_output=True)

    run("git", "init", "-q")
    assert R.metrics_diff(root, "HEAD~1").status == "no_revision"  # no commit at all yet
    _text(root / "README", "one\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "one")
    assert R.metrics_diff(root, "HEAD~1").status == "no_revision"  # a single commit: no HEAD~1
    _text(root / "README", "two\n")
    run("git", "commit", "-qam", "two")
    run(str(Path(R._dvc())), "init", "-q")
    _text(root / "dvc.yaml", "metrics: 5\n")  # invalid: dvc still exits 0, with a warning
    warned = R.metrics_diff(root, "HEAD~1")
    assert warned.status == "ok" and warned.rows == ()
    assert any("dvc.yaml" in w for w in warned.warnings), warned.warnings
    assert "dvc warned, so some metrics may be missing" in "\n".join(R.diff_section(warned, 10))
    _text(root / "dvc.yaml", "metrics:\n  - metrics/a.json\n")
    _json(root / "metrics/a.json", {"acc": 0.25, "n": 10, "same": 1})
    run("git", "add", "-A")
    run("git", "commit", "-qm", "three")
    _json(root / "metrics/a.json", {"acc": 0.5, "n": 10, "same": 1})
    run("git", "commit", "-qam", "four")
    _json(root / "metrics/a.json", {"acc": 0.75, "n": 12, "same": 1})  # the workspace, as during dvc repro
    diff = R.metrics_diff(root, "HEAD~1")
    assert diff.status == "ok", diff.message
    assert diff.rows == (("metrics/a.json", "acc", 0.25, 0.75, 0.5), ("metrics/a.json", "n", 10, 12, 2))
    assert R.metrics_diff(root, "").status == "disabled"


def test_metrics_diff_failures_become_a_status(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    for key, value in _git_dvc_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for message in ("one", "two"):
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", message], cwd=root, check=True)
    fake = tmp_path / "fake-dvc"
    fake.write_text("#!/bin/sh\necho 'ERROR: something broke' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(R, "_dvc", lambda: str(fake))
    diff = R.metrics_diff(root, "HEAD~1")
    assert diff.status == "failed"
    assert diff.message == "`dvc metrics diff HEAD~1` failed (3): ERROR: something broke"
    fake.write_text("#!/bin/sh\necho 'not json'\n")
    assert "printed no JSON" in R.metrics_diff(root, "HEAD~1").message
    monkeypatch.setattr(R, "_dvc", lambda: None)
    assert R.metrics_diff(root, "HEAD~1").message == "dvc is not installed here, so metrics could not be compared"


def test_report_stage_writes_metrics(run_dir):
    import logging

    from ctxrepro.config import BaseParams
    from ctxrepro.stage import StageContext
    from stages import report as stage

    ctx = StageContext(base=BaseParams(), device="cpu", log=logging.getLogger("test"), root=run_dir)
    stage.run(stage.Params(), ctx)  # run_dir is no git repository: the what-changed section says so
    metrics = json.loads((run_dir / "metrics/report.json").read_text())
    assert metrics == {"metrics_files": 9, "metrics_unreadable": 0, "stages_not_run": 3, "figures": 4,
                       "diff_rows": 0}
    assert "is not a git repository" in (run_dir / "REPORT.md").read_text()


def test_report_command(run_dir):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(R.report_command)
    result = CliRunner().invoke(app, ["--root", str(run_dir), "--against", ""])
    assert result.exit_code == 0, result.output
    assert "4 figures" in result.output and "not run: resize, convert, proposals" in result.output
    assert "Not compared: no revision to compare against" in (run_dir / "REPORT.md").read_text()


def test_paper_numbers_are_consistent():
    # each Table 1 row's mAP is the mean of its 20 APs, up to the paper's rounding to 0.1
    for name, row in {**P.PAPER_TABLE1, **P.TABLE1_OTHER_ROWS}.items():
        assert len(row) == 21, name
        assert abs(sum(row[:20]) / 20 - row[20]) <= 0.051, name
    assert set(P.TABLE1_ORDER) == set(P.PAPER_TABLE1) | set(P.TABLE1_OTHER_ROWS)
    assert {label for label, _ in P.PAPER_TABLE2} >= set(P.TABLE2_INIT)


@pytest.mark.parametrize("profile", ["paper", "tiny"])
def test_every_row_the_profile_builds_is_labelled_with_its_table_row(profile):
    """The paper profile builds every Table 1 / Table 2 row of our method or an ImageNet network, each named in
    TABLE1_INIT / TABLE2_INIT; the detect stage labels each with that row (tower and colour of its variant)."""
    from stages.pretrain import Params as PretrainParams
    from stages.pretrain import resolve_variant

    from ctxrepro.config import load_yaml, parse_dataclass

    params = load_yaml(Path(__file__).parents[1] / "profiles" / f"{profile}.yaml")
    pre = parse_dataclass(PretrainParams, params["pretrain"], "pretrain")
    rows = params["convert"]["rows"]
    table1 = set()
    for name, r in rows.items():
        variant = resolve_variant(pre, r["variant"])
        label = paper_row(r["init"], variant.tower, variant.color)
        if label is None:  # Table 2's ImageNet row: torchvision's conv layers under Figure 6's head
            assert r["init"] == "imagenet" and name in P.TABLE2_INIT.values(), name
            continue
        assert P.TABLE1_INIT[label] == name, name
        table1.add(name)
    # the tiny world has no ImageNet weights, and AlexNet on 227 px windows is past its CPU budget
    skipped = {r for r in P.TABLE1_INIT.values() if "imagenet" in r or "alexnet" in r}
    assert (table1 if profile == "paper" else table1 | skipped) == set(P.TABLE1_INIT.values())
    normals = set(params["normals"]["rows"])
    assert normals <= set(rows)
    assert normals == (set(P.TABLE2_INIT.values()) if profile == "paper" else
                       {r for r in P.TABLE2_INIT.values() if "imagenet" not in r})
