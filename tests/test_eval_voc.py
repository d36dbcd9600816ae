"""Tests for ctxrepro.metrics.voc (`ctxrepro eval voc`): the devkit's VOCevaldet on hand-computed cases.

Boxes use the devkit's +1 convention: [1, 1, 10, 10] is 10 x 10 = 100 pixels.
"""

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ctxrepro.metrics.voc import THRESHOLDS, VocEvalError, eleven_point_ap, evaluate, matlab_colon, voc_command

GT_BOX = (1, 1, 10, 10)  # area 100


def write_devkit(root, images, imageset="test"):
    """images: {image_id: [(class, (x1, y1, x2, y2), difficult), ...]} -> a VOC2007-style folder."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in images.items():
        objs = "".join(
            f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b, d in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>100</width><height>100</height><depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets" / "Main" / f"{imageset}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def write_results(folder, cls, lines, imageset="test"):
    folder.mkdir(exist_ok=True)
    (folder / f"comp4_det_{imageset}_{cls}.txt").write_text("".join(line + "\n" for line in lines))
    return folder


def run_case(tmp_path, images, lines, cls="car"):
    devkit = write_devkit(tmp_path / "VOC2007", images)
    results = write_results(tmp_path / "results", cls, lines)
    return evaluate(devkit, "test", results, classes=(cls,))[cls]


def test_detection_at_exactly_iou_half_is_a_true_positive(tmp_path):
    # [1,1,10,20]: 200 px, intersection 100, union 200 -> IoU exactly 0.5, which the devkit counts (>=)
    r = run_case(tmp_path, {"000001": [("car", GT_BOX, False)]}, ["000001 0.9 1 1 10 20"])
    assert (r.tp, r.fp, r.npos) == (1, 0, 1)
    assert r.ap == 1.0


def test_detection_just_below_half_is_a_false_positive(tmp_path):
    # [1,1,10,21]: 210 px, union 210 -> IoU 100/210 = 0.476 < 0.5
    r = run_case(tmp_path, {"000001": [("car", GT_BOX, False)]}, ["000001 0.9 1 1 10 21"])
    assert (r.tp, r.fp) == (0, 1)
    assert r.ap == 0.0


def test_duplicate_detection_is_a_false_positive(tmp_path):
    images = {"000001": [("car", GT_BOX, False)], "000002": [("car", GT_BOX, False)]}
    lines = ["000001 0.9 1 1 10 10", "000001 0.8 1 1 10 11", "000002 0.7 1 1 10 10"]
    r = run_case(tmp_path, images, lines)
    # tp = [1,0,1], fp = [0,1,0] -> rec = [.5,.5,1], prec = [1,.5,2/3]
    # t = 0..0.5 (6 thresholds): max prec 1; t = 0.6..1 (5): only rec 1 -> 2/3
    assert (r.tp, r.fp) == (2, 1)
    assert r.ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-12)


def test_difficult_match_is_ignored_and_not_counted_in_npos(tmp_path):
    images = {"000001": [("car", (50, 50, 60, 60), True), ("car", GT_BOX, False)]}
    lines = ["000001 0.9 50 50 60 60", "000001 0.8 1 1 10 10"]
    r = run_case(tmp_path, images, lines)
    # the difficult hit is neither TP nor FP: tp = [0,1], fp = [0,0]; npos = 1 -> rec [0, 1], prec [nan, 1]
    assert (r.tp, r.fp, r.npos) == (1, 0, 1)
    assert r.ap == 1.0


def test_best_overlap_wins_even_when_it_is_difficult(tmp_path):
    # detection [1,1,10,12]: IoU with the difficult [1,1,10,12] = 1, with the normal [1,1,10,10] = 100/120
    images = {"000001": [("car", GT_BOX, False), ("car", (1, 1, 10, 12), True)]}
    lines = ["000001 0.9 1 1 10 12", "000001 0.8 1 1 10 10"]
    r = run_case(tmp_path, images, lines)
    assert (r.tp, r.fp) == (1, 0)  # matching the normal box first would make the second a duplicate FP


@pytest.mark.parametrize("first_is_tp, expected", [(False, 1 / 31), (True, 1.0)])
def test_equal_scores_keep_file_order(tmp_path, first_is_tp, expected):
    # 31 detections with one score: 30 FPs (image 2 has no car) and the TP, first or last in the file.
    images = {"000001": [("car", GT_BOX, False)], "000002": []}
    tp_line, fp_lines = "000001 0.5 1 1 10 10", [f"000002 0.5 1 1 {10 + k} 10" for k in range(30)]
    lines = [tp_line, *fp_lines] if first_is_tp else [*fp_lines, tp_line]
    r = run_case(tmp_path, images, lines)
    # TP last: recall 1 only at the end, with precision 1/31 -> every threshold 1/31; TP first: 1
    assert r.ap == pytest.approx(expected, abs=1e-15)


def test_eleven_point_ap_by_hand():
    rec = np.array([0.2, 0.4, 0.4, 0.6, 0.8])
    prec = np.array([1.0, 1.0, 2 / 3, 0.75, 0.8])
    # t = 0, .1, .2, .3, .4 -> 1 (5 thresholds); .5 .. .8 -> 0.8 (4); .9, 1 -> none reaches: 0
    assert eleven_point_ap(rec, prec) == pytest.approx((5 * 1.0 + 4 * 0.8) / 11, abs=1e-15)


def test_thresholds_are_matlabs_colon_values():
    # MathWorks: 0:0.1:0.3 differs from (0:0.1:0.4)(1:4) by [0 0 -0.2776e-16 -0.5551e-16]
    short, long_ = np.array(matlab_colon(0, 0.1, 0.3)), np.array(matlab_colon(0, 0.1, 0.4))[:4]
    assert np.allclose(short - long_, [0, 0, -0.2776e-16, -0.5551e-16], rtol=0, atol=1e-20)
    assert THRESHOLDS[3] == 3 * 0.1 != 0.3 and THRESHOLDS[6] == 0.6 and THRESHOLDS[7] == 0.7
    assert len(THRESHOLDS) == 11 and THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 1.0


@pytest.mark.parametrize("hits, expected", [(3, 3), (6, 7), (7, 8)])
def test_recall_on_a_tenth_reaches_the_devkit_thresholds(hits, expected):
    # npos = 10, every detection a TP: rec = k/10. 3/10 stops short of 3*0.1; 6/10 reaches MATLAB's 0.6
    # (np.arange's 0.6000000000000001 would not); 7/10 reaches 1 - 3*0.1.
    tp = np.ones(hits)
    rec, prec = np.cumsum(tp) / 10, np.ones(hits)
    assert eleven_point_ap(rec, prec) == pytest.approx(expected / 11, abs=1e-15)


def test_class_without_positives_scores_zero(tmp_path):
    r = run_case(tmp_path, {"000001": [("dog", GT_BOX, False)]}, ["000001 0.9 1 1 10 10"])
    assert (r.npos, r.tp, r.fp, r.ap) == (0, 0, 1, 0.0)


def test_missing_results_file_names_it(tmp_path):
    devkit = write_devkit(tmp_path / "VOC2007", {"000001": []})
    (tmp_path / "results").mkdir()
    with pytest.raises(VocEvalError, match=r"comp4_det_test_car\.txt: results file not found"):
        evaluate(devkit, "test", tmp_path / "results", classes=("car",))


@pytest.mark.parametrize("bad, message", [
    ("000009 0.5 1 1 10 10", r"line 2: image id '000009' is not in the image set"),
    ("000001 0.5 1 1 10", r"line 2: expected '<image_id> <score>"),
    ("000001 high 1 1 10 10", r"line 2: score and box must be numbers"),
    ("000001 nan 1 1 10 10", r"line 2: score and box must be finite"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    devkit = write_devkit(tmp_path / "VOC2007", {"000001": [("car", GT_BOX, False)]})
    results = write_results(tmp_path / "results", "car", ["000001 0.9 1 1 10 10", bad])
    with pytest.raises(VocEvalError, match=r"comp4_det_test_car\.txt " + message):
        evaluate(devkit, "test", results, classes=("car",))


def _app():
    app = typer.Typer()
    app.command()(voc_command)
    return app


def test_command_prints_table_and_writes_ap_json(tmp_path):
    images = {"000001": [("car", GT_BOX, False), ("bus", GT_BOX, False)], "000002": [("car", GT_BOX, False)]}
    devkit = write_devkit(tmp_path / "VOC2007", images)
    results = write_results(tmp_path / "results", "car", ["000001 0.9 1 1 10 10"])
    write_results(results, "bus", ["000001 0.3 1 1 10 10", "000002 0.6 1 1 10 10"])
    out = tmp_path / "m.json"
    res = CliRunner().invoke(_app(), ["--devkit", str(devkit), "--imageset", "test", "--results", str(results),
                                      "--classes", "car,bus", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    # car: 1 of 2 found, prec 1 -> t 0..0.5 -> 6/11. bus: FP (0.6) then TP -> prec [0, .5] -> 0.5
    assert data == {"ap": {"car": pytest.approx(6 / 11), "bus": 0.5}, "map": pytest.approx((6 / 11 + 0.5) / 2)}
    assert "car" in res.output and "mAP" in res.output


def test_command_error_exits_2_with_message(tmp_path):
    devkit = write_devkit(tmp_path / "VOC2007", {"000001": []})
    (tmp_path / "results").mkdir()
    res = CliRunner().invoke(_app(), ["--devkit", str(devkit), "--results", str(tmp_path / "results"),
                                      "--classes", "car"])
    assert res.exit_code == 2  # bad input: 2, as for params and the other eval commands (issue 26)
    assert "results file not found" in res.output
