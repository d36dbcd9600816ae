"""Purity-coverage (paper section 4.5.1, issue 9's exact rule): a hand-computed curve, stable sorting,
clipping at coverage 0.5, the errors, and the Typer command."""

import json
from fractions import Fraction as Fr

import pytest
import typer
from typer.testing import CliRunner

from ctxrepro.metrics.purity import PurityError, chance_reference, purity_command, purity_coverage, set_purity

# N = 6 images; d holds two categories, so a set can be pure for either.
LABELS = {"a": ["bus"], "b": ["bus"], "c": ["horse"], "d": ["horse", "sofa"], "e": ["sofa"], "f": ["train"]}
# purities: A 2/3 (bus), B 1 (sofa), C 1/3, D 2/3 (sofa: d, e). A and D tie: stability puts A first.
SETS = [["a", "b", "c"], ["d", "e"], ["c", "f", "a"], ["e", "f", "d"]]


def hand_curve():
    """Order B, A, D, C. Unions: {d,e}, +{a,b,c}, +{f}, +{} -> C = 2/6, 5/6, 1, 1;
    P = 1, (1 + 2/3)/2 = 5/6, (1 + 2/3 + 2/3)/3 = 7/9, (1 + 2/3 + 2/3 + 1/3)/4 = 2/3."""
    return [(Fr(2, 6), Fr(1)), (Fr(5, 6), Fr(5, 6)), (Fr(1), Fr(7, 9)), (Fr(1), Fr(2, 3))]


def test_set_purity_by_hand():
    assert set_purity(["a", "b", "c"], LABELS) == pytest.approx(2 / 3)
    assert set_purity(["c", "d"], LABELS) == 1.0  # both hold horse
    assert set_purity(["c", "f", "a"], LABELS) == pytest.approx(1 / 3)
    assert set_purity(["x"], {"x": []}) == 0.0  # an image with no category makes nothing pure


def test_curve_and_areas_by_hand():
    out = purity_coverage(SETS, LABELS)
    expected = hand_curve()
    assert [v for point in out["curve"] for v in point] == pytest.approx([float(v) for cp in expected for v in cp])
    # AUC = 1 * 2/6 + 5/6 * (5/6 - 2/6) + 7/9 * (1 - 5/6) + 2/3 * 0 = 95/108
    assert out["auc"] == pytest.approx(95 / 108)
    # clipped at 0.5: 1 * 2/6 + 5/6 * (1/2 - 2/6) = 17/36, the later steps add nothing
    assert out["auc_at_0.5"] == pytest.approx(17 / 36)
    # the same number from the definition, in exact arithmetic
    auc, prev = Fr(0), Fr(0)
    for c, p in expected:
        auc, prev = auc + p * (c - prev), c
    assert out["auc"] == pytest.approx(float(auc))


def test_sort_is_stable_and_order_matters():
    # Swapping A and D in the input puts D first among the equal purities: D covers only f at step 2.
    out = purity_coverage([SETS[3], SETS[1], SETS[2], SETS[0]], LABELS)
    # B {d,e} 2/6; D adds f -> 3/6 with P 5/6; A adds a,b,c -> 1 with P 7/9:
    # AUC = 1 * 2/6 + 5/6 * 1/6 + 7/9 * 3/6 = 31/36
    assert [c for c, _ in out["curve"]] == pytest.approx([2 / 6, 3 / 6, 1, 1])
    assert out["auc"] == pytest.approx(31 / 36)


def test_coverage_counts_the_whole_labelled_set():
    labels = {**LABELS, "g": ["bus"], "h": []}  # N = 8: unlabelled-by-any-set images still count
    out = purity_coverage([["a", "b"]], labels)
    assert out["curve"] == [[0.25, 1.0]] and out["auc"] == 0.25 and out["auc_at_0.5"] == 0.25


def test_no_sets_give_zero_area():
    assert purity_coverage([], LABELS) == {"auc": 0.0, "auc_at_0.5": 0.0, "curve": []}


def test_errors_name_the_id():
    with pytest.raises(PurityError, match=r"set 1: image id 'zz' is not in the labels"):
        purity_coverage([["a"], ["b", "zz"]], LABELS)
    with pytest.raises(PurityError, match=r"set 2 is empty"):
        purity_coverage([["a"], ["b"], []], LABELS)


def test_chance_reference():
    # one category everywhere: every set is pure; the first set covers 3/4, the second adds the fourth image
    # unless it repeats the first: each draw's AUC is 1 or 3/4
    labels = {k: ["bus"] for k in "wxyz"}
    out = chance_reference(labels, 2, 3, seed=0, draws=20)
    assert 0.75 <= out["auc"] <= 1.0 and out["auc_at_0.5"] == 0.5
    assert chance_reference(labels, 2, 3, seed=0, draws=20) == out  # seeded
    # two categories split 2/2: a set of 2 is pure with chance 1/3 (2 of the 6 pairs): a single set's AUC is
    # purity * 2/4, so the mean over many draws is near (1/3 * 1 + 2/3 * 1/2) / 2 = 1/3
    split = {"w": ["bus"], "x": ["bus"], "y": ["sofa"], "z": ["sofa"]}
    assert chance_reference(split, 1, 2, seed=1, draws=3000)["auc"] == pytest.approx(1 / 3, abs=0.02)
    assert chance_reference(split, 0, 2, seed=1) == {"auc": 0.0, "auc_at_0.5": 0.0}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("purity-coverage")(purity_command)
    app.command("unused")(lambda: None)  # two commands keep the sub-command name, as in `ctxrepro eval`
    return app


def test_command_writes_metrics(tmp_path):
    (tmp_path / "sets.json").write_text(json.dumps(SETS))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    out = tmp_path / "m.json"
    res = CliRunner().invoke(_app(), ["purity-coverage", "--sets", str(tmp_path / "sets.json"),
                                      "--labels", str(tmp_path / "labels.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written["auc"] == pytest.approx(95 / 108) and len(written["curve"]) == 4
    printed = CliRunner().invoke(_app(), ["purity-coverage", "--sets", str(tmp_path / "sets.json"),
                                          "--labels", str(tmp_path / "labels.json")])
    assert json.loads(printed.stdout)["auc_at_0.5"] == pytest.approx(17 / 36)


def test_command_error_names_file_and_id(tmp_path):
    (tmp_path / "sets.json").write_text(json.dumps([["a", "nope"]]))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    res = CliRunner().invoke(_app(), ["purity-coverage", "--sets", str(tmp_path / "sets.json"),
                                      "--labels", str(tmp_path / "labels.json")])
    assert res.exit_code == 2
    assert "sets.json" in res.output and "'nope'" in res.output
    res = CliRunner().invoke(_app(), ["purity-coverage", "--sets", str(tmp_path / "missing.json"),
                                      "--labels", str(tmp_path / "labels.json")])
    assert res.exit_code == 2 and "missing.json: sets file not found" in res.output
