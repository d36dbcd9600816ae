"""REPORT.md's sections on what the paper learns about the representation (4.6 pretext accuracy, 4.2 chromatic
aberration, 4.5.1 / Figure 9 mining, 4.1 nearest neighbours): our numbers beside the paper's, read from
metrics/*.json. The shared formatting lives in `ctxrepro.report.tables`.
"""

from __future__ import annotations


from ctxrepro.report import paper_numbers as P
from ctxrepro.report.tables import DASH, NOT_RUN, _number, _over, count, data_line, fixed, md_table, paper, pct, RunData


def section_4_6(run: RunData) -> list[str]:
    """Pretext accuracy on VOC 2007, inside boxes, on cars, and on training vs held-out images."""
    m = run.get("pretext_eval")
    lines = ["## Section 4.6: accuracy on the relative-position task", "",
             data_line(run, ("imagenet", "voc2007"), ("pretrain", "pretext_eval")), ""]
    if m is None:
        lines += [f"pretext_eval: {NOT_RUN} (`metrics/pretext_eval.json` missing; `dvc repro pretext_eval`).", ""]
        m = {}
    per_class, per_class_n = m.get("accuracy_per_class") or {}, m.get("n_pairs_per_class") or {}
    s = P.SECTION_4_6
    box = m.get("min_box_side", DASH)
    rows = [(f"VOC 2007: {count(m.get('n_images'))} images (paper {s['n_images'].value} x "
             f"{s['pairs_per_image'].value} pairs)",
             paper(s["accuracy"]), pct(m.get("accuracy")), count(m.get("n_pairs"))),
            (f"inside boxes >= {box} px (paper {s['min_box_side'].value})", paper(s["accuracy_in_boxes"]),
             pct(m.get("accuracy_in_boxes")), count(m.get("n_pairs_in_boxes"))),
            ("inside car boxes only", paper(s["accuracy_car"]), pct(per_class.get("car")),
             count(per_class_n.get("car"))),
            ("ImageNet training images", paper(s["accuracy_train_images"]), pct(m.get("accuracy_train_images")),
             count(m.get("n_pairs_train_images"))),
            ("ImageNet validation (held-out) images", paper(s["accuracy_heldout_images"]),
             pct(m.get("accuracy_heldout_images")), count(m.get("n_pairs_heldout_images"))),
            ("chance", paper(s["chance"]), pct(m.get("chance")), DASH)]
    pre = run.get(f"pretrain/{P.MAIN_VARIANT}")
    rows.append(("held-out accuracy at the end of pretraining (pretrain stage)", "no paper number",
                 pct(pre.get("heldout_accuracy")) if pre else NOT_RUN, count((pre or {}).get("heldout_pairs"))))
    lines += md_table(("measurement", "paper (%)", "ours (%)", "our pairs"), rows)
    if per_class:
        lines += ["", "Inside boxes, per class (the paper reports only cars):", ""]
        lines += md_table(("class", "ours (%)", "pairs"),
                          [(c, pct(a), count(per_class_n.get(c))) for c, a in sorted(per_class.items())])
    return lines


# --- section 4.2 ----------------------------------------------------------------------------------------------

def section_4_2(run: RunData) -> list[str]:
    """Chromatic aberration: RMSE of the absolute (x, y) regressor on its best images, raw and projected."""
    m = run.get("aberration")
    world = (m or {}).get("source") == "world"
    lines = ["## Section 4.2: learnability of chromatic aberration", "",
             data_line(run, () if world else ("imagenet",), ("aberration",), rendered_world=world), ""]
    if m is None:
        lines += [f"aberration: {NOT_RUN} (`metrics/aberration.json` missing; `dvc repro aberration`).", ""]
        m = {}
    s = P.SECTION_4_2
    top = _number(m.get("top_fraction"))
    best = DASH if top is None else f"{100 * top:g}%"
    rows = [(f"best {best} of images (paper 10%), raw", paper(s["rmse_top10"], 3), fixed(m.get("rmse_top10"), 3)),
            ("chance: always the image centre", paper(s["rmse_chance"], 3), fixed(m.get("rmse_chance"), 3)),
            (f"best {best}, after colour projection", paper(s["rmse_top10_projected"], 3),
             fixed(m.get("rmse_top10_projected"), 3)),
            ("all images, raw", "no paper number", fixed(m.get("rmse_all"), 3)),
            ("all images, after projection", "no paper number", fixed(m.get("rmse_all_projected"), 3)),
            (f"best {best}, control without aberration", "no paper number", fixed(m.get("rmse_top10_control"), 3))]
    lines += md_table(("RMSE of (x, y) in [0, 1] image coordinates", "paper", "ours"), rows)
    lines += ["", "Each RMSE over its own chance (always the centre): our images' chance differs from the paper's "
              "(.371), so only these ratios compare; 1 = no better than chance.", ""]
    lines += md_table(("RMSE / chance", "paper", "ours"), [
        (f"best {best}, {kind}", f"{s[key].value / s['rmse_chance'].value:.2f}", fixed(_over(m, key, "rmse_chance"), 2))
        for kind, key in (("raw", "rmse_top10"), ("after colour projection", "rmse_top10_projected"))])
    if m.get("control_note"):
        lines += ["", f"Control: {m['control_note']}."]
    return lines


# --- Figure 9 (section 4.5.1) ---------------------------------------------------------------------------------

def figure_9(run: RunData) -> list[str]:
    """Purity-coverage AUC of the mined clusters on the VOC 2007 subset."""
    m = run.get("mine")
    lines = ["## Figure 9: purity-coverage of mined clusters (section 4.5.1)", "",
             data_line(run, ("imagenet", "voc2007"), ("pretrain", "mine")), ""]
    if m is None:
        lines += [f"mine: {NOT_RUN} (`metrics/mine.json` missing; `dvc repro mine`).", ""]
        m = {}
    elif "auc" not in m:
        lines += ["mine ran without the evaluation (`mine.evaluate: false`): no purity-coverage.", ""]
    f, s = P.FIGURE_9, P.SECTION_4_5_1
    rows = [("AUC, ours", paper(f["auc"], 2), fixed(m.get("auc"), 3)),
            ("AUC up to coverage 0.5, ours", paper(f["auc_at_0.5"], 2), fixed(m.get("auc_at_0.5"), 3)),
            ("AUC, ECCV 2014 baseline [12]", paper(f["baseline_auc"], 2), "not reproduced"),
            ("AUC, random sets of the same size", "no paper number", fixed(m.get("chance_auc"), 3)),
            ("AUC up to 0.5, random sets", "no paper number", fixed(m.get("chance_auc_at_0.5"), 3)),
            ("sets selected", count(s["n_clusters_selected"].value), count(m.get("n_clusters_selected"))),
            ("initial clusters", count(s["eval_n_constellations"].value), count(m.get("eval_n_constellations")))]
    return lines + md_table(("purity-coverage", "paper", "ours"), rows)


# --- section 4.1 and pretraining ---------------------------------------------------------------------------------

def section_4_1(run: RunData) -> list[str]:
    """Nearest neighbours: the paper shows them (Figure 4) without a number; ours gives precision@k."""
    m = run.get("nn")
    lines = ["## Section 4.1: nearest neighbours (Figure 4)", "",
             data_line(run, ("imagenet", "voc2007"), ("pretrain", "nn")), "",
             "The paper reports no number for this experiment; precision@k (a neighbour counts when it carries the "
             "query's box label) is ours.", ""]
    if m is None:
        return lines + [f"nn: {NOT_RUN} (`metrics/nn.json` missing; `dvc repro nn`)."]
    k, objects = m.get("k", DASH), m.get("precision_at_k_objects") or {}
    rows = [(name, fixed(v, 3), fixed(objects.get(name), 3)) for name, v in (m.get("precision_at_k") or {}).items()]
    rows.append(("label base rate (chance)", fixed(m.get("precision_chance"), 3),
                 fixed(m.get("precision_chance_objects"), 3)))
    lines += md_table(("feature source", f"precision@{k}", f"precision@{k}, object queries"), rows)
    notes = m.get("notes") or {}
    return lines + ([""] + [f"- {name}: {note}" for name, note in sorted(notes.items())] if notes else [])
