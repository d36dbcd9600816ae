"""Tests for bench/gpu_check.py and bench/gpu_check.sh (issue 16): the dry run prints every row of the table, its
numbers are positive, its extrapolations follow from the rates it prints, rows that need CUDA say so on the CPU;
the configuration it reads from profiles/paper.yaml is the one the pretrain and detect stages build; the synthetic
detection data is valid."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxrepro.config import load_params
from ctxrepro.detection.roidb import check_boxes

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "profiles" / "paper.yaml"
PRETRAIN_STEPS = 1_700_000  # the released README's ~1.7M iterations
DETECT_ITERATIONS = 40_000  # Fast R-CNN's VOC 2007 solver
CUDA_ONLY = ("pretrain-device", "pretrain-worker-compile", "pretrain-device-compile")
RAN = ("pretrain-worker", "recipe", "detect-figure6", "detect-caffenet")


@pytest.fixture(scope="module")
def bench(request):
    """bench/profile_sections.py and bench/synthetic.py as modules (bench/ is no package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    request.addfinalizer(lambda: sys.path.remove(str(ROOT / "bench")))
    return importlib.import_module("profile_sections"), importlib.import_module("synthetic")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The wrapper's dry run on the CPU: (stdout, table rows by name, $OUT)."""
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) == {"|", "-"}
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|"))))
        rows[cells["row"]] = cells
    return proc.stdout, rows, out


def number(cell: str) -> float:
    return float(cell.rstrip("%").replace(",", ""))


def test_dry_run_prints_every_row_and_writes_the_table_to_out(dry_run):
    stdout, rows, out = dry_run
    assert set(rows) == set(CUDA_ONLY + RAN)
    assert (out / "gpu_check.md").read_text().strip() in stdout
    assert (out / "gpu_check.json").is_file()


def test_cpu_rows_ran_the_profiles_precision_and_only_cuda_features_are_skipped(dry_run):
    """The rows that ran on the CPU ran the paper profile's amp as this CPU resolves it (bf16 autocast and
    channels_last where it has native bf16, else float32 NCHW): the GPU path's numerics, not a float32 stand-in.
    Only the rows that need a CUDA feature (the GPU decoder, torch.compile in this check) are skipped."""
    from ctxrepro.pretext.precision import describe, use_channels_last
    from stages.detect import Params as DetectParams
    from stages.pretrain import Params as PretrainParams

    _, rows, _ = dry_run
    params = load_params(PAPER, "pretrain", PretrainParams)[1]
    detect_amp = load_params(PAPER, "detect", DetectParams)[1].amp
    layout = "channels_last" if use_channels_last("cpu", params.amp, params.channels_last) else "NCHW"
    for name in RAN + CUDA_ONLY:
        want = describe("cpu", detect_amp) if name.startswith("detect") else f"{describe('cpu', params.amp)}, {layout}"
        assert rows[name]["config"].endswith(want), (name, rows[name]["config"], want)
    for name in RAN:
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["peak GPU MiB"] == "n/a (CPU)"
    for name in CUDA_ONLY:
        assert "decode device" in rows[name]["config"] or "compile on" in rows[name]["config"], name
        assert rows[name]["status"] == "skipped (no CUDA)" and rows[name]["hours"] == "-", name


def test_numbers_are_positive_and_hours_follow_from_the_printed_rate(dry_run):
    _, rows, _ = dry_run
    for name in RAN:
        rate, hours = number(rows[name]["steps/s (detect: it/s)"]), number(rows[name]["hours"])
        target = DETECT_ITERATIONS if name.startswith("detect") else PRETRAIN_STEPS
        assert rows[name]["extrapolated to"] == f"{target:,} {'iterations' if target == DETECT_ITERATIONS else 'steps'}"
        assert rate > 0 and hours > 0
        # both printed to at least 4 significant digits: each rounding moves the ratio by at most 5e-4
        assert hours == pytest.approx(target / rate / 3600, rel=2e-3), name
        if name != "pretrain-worker":  # the throughput rows report no loss
            assert number(rows[name]["loss start"]) > 0 and number(rows[name]["loss end"]) > 0
    for name in ("pretrain-worker", "recipe"):
        assert number(rows[name]["pairs/s"]) > 0
    assert 0 <= number(rows["pretrain-worker"]["data wait"]) <= 100
    assert rows["pretrain-worker"]["data wait"].endswith("%")
    assert 0 < number(rows["recipe"]["fc8 live (min)"]) <= 1


def test_the_check_builds_the_stages_configs_from_the_paper_profile(bench):
    """The check cannot import stages/ on the GPU machine (the CLI's packages are missing there), so
    bench/profile_sections.py maps the sections itself: both mappings must agree, with the paper's shapes."""
    from stages.detect import Params as DetectParams
    from stages.pretrain import Params as PretrainParams
    from stages.pretrain import resolve_variant, train_config

    profile_sections, _ = bench
    sec = profile_sections.sections(PAPER)
    base, p = load_params(PAPER, "pretrain", PretrainParams)
    cfg = profile_sections.train_config(sec["pretrain"], base.seed)
    assert cfg == train_config(resolve_variant(p, p.variant), base.seed)
    shape = (cfg.tower, cfg.data.patch, cfg.data.gap, cfg.data.jitter, cfg.data.mode, cfg.data.max_patches,
             cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.loss, cfg.amp, cfg.channels_last, cfg.steps)
    assert shape == ("alexnet", 96, 48, 7, "grid", 512, "sgd", 1e-5, 0.0, "sum", "bf16", True, PRETRAIN_STEPS)
    assert cfg.min_live_fraction == 0.05
    _, d = load_params(PAPER, "detect", DetectParams)
    solver, sampling = profile_sections.detect_configs(sec["detect"])
    assert (solver, sampling) == (d.solver(), d.sampling())
    assert (solver.scale, solver.max_size, solver.images_per_batch, sampling.rois_per_image, solver.iterations) == (
        600, 1000, 2, 64, DETECT_ITERATIONS)


def test_synthetic_detection_boxes_lie_inside_their_images(bench, tmp_path):
    _, synthetic = bench
    for e in synthetic.detect_roidb(tmp_path, 3, (60, 80), 50, seed=1):
        check_boxes(e.gt_boxes, e.height, e.width, "gt")
        check_boxes(e.proposals, e.height, e.width, "proposals")
        assert len(e.proposals) == 50 and 1 <= len(e.gt_boxes) <= 3 and e.gt_classes.min() >= 1
