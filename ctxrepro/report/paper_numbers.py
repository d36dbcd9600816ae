"""The paper's numbers, each with the table, section or figure it comes from.

They are printed beside ours in REPORT.md and never used to compute anything. Table 1's ConvNet rows
live with the detect stage's own table (`ctxrepro.detection.table`), Table 2's with the normals stage's
(`ctxrepro.normals.table`); both are re-exported here, and neither imports torch. The rest come from the
text of sections 4.2, 4.5.1 and 4.6, and from docs/METHOD.md "Headline numbers" (which quotes them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctxrepro.detection.table import PAPER_TABLE1
from ctxrepro.normals.table import PAPER_TABLE2, TABLE2_COLUMNS

__all__ = ["PAPER_TABLE1", "PAPER_TABLE2", "TABLE1_OTHER_ROWS", "TABLE1_ORDER", "TABLE1_INIT", "TABLE2_INIT",
           "TABLE2_COLUMNS", "MAIN_VARIANT", "PaperValue", "SECTION_4_6", "SECTION_4_2", "FIGURE_9", "SECTION_4_5_1",
           "PRETRAINING"]


@dataclass(frozen=True)
class PaperValue:
    """One number of the paper (None: the paper shows it only in a figure) and where it is stated."""

    value: float | None
    where: str


# Table 1 rows that are not ConvNets we can initialise (other methods), and the Yahoo 100M pretraining,
# whose data we do not have: shown with their mAP, never reproduced. 20 per-class APs in the devkit's
# class order, then the 20-class mAP, as in PAPER_TABLE1.
TABLE1_OTHER_ROWS: dict[str, tuple[float, ...]] = {
    "DPM-v5[17]": (33.2, 60.3, 10.2, 16.1, 27.3, 54.3, 58.2, 23.0, 20.0, 24.1, 26.7, 12.7, 58.1, 48.2, 43.2, 12.0,
                   21.1, 36.1, 46.0, 43.5, 33.7),
    "[8] w/o context": (52.6, 52.6, 19.2, 25.4, 18.7, 47.3, 56.9, 42.1, 16.6, 41.4, 41.9, 27.7, 47.9, 51.5, 29.9,
                        20.0, 41.1, 36.4, 48.6, 53.2, 38.5),
    "Regionlets[58]": (54.2, 52.0, 20.3, 24.0, 20.1, 55.5, 68.7, 42.6, 19.2, 44.2, 49.1, 26.6, 57.0, 54.5, 43.4,
                       16.4, 36.6, 37.7, 59.4, 52.3, 41.7),
    "Ours-Yahoo100m": (56.2, 63.9, 29.8, 27.8, 23.9, 57.4, 69.8, 35.6, 23.7, 47.4, 43.0, 29.5, 52.9, 62.0, 48.7,
                       28.4, 45.1, 33.6, 49.0, 55.5, 44.2),
}

# Table 1's row order in the paper.
TABLE1_ORDER = ("DPM-v5[17]", "[8] w/o context", "Regionlets[58]", "Scratch-R-CNN", "Scratch-Ours",
                "Ours-projection", "Ours-color-dropping", "Ours-Yahoo100m", "ImageNet-R-CNN", "K-means-rescale",
                "Ours-rescale", "ImageNet-rescale", "VGG-K-means-rescale", "VGG-Ours-rescale",
                "VGG-ImageNet-rescale")

# The pretraining variant whose network the paper describes in sections 4.1-4.6 (metrics/pretrain/<variant>.json).
MAIN_VARIANT = "color_dropping"

# The detect row (convert.rows key '<variant>-<init>': models/convert/<row>.pt, metrics/detect/<row>.json) that
# reproduces a Table 1 row in the paper profile. Rows absent here are other papers' methods or other data;
# Scratch-R-CNN (Agrawal et al.) and ImageNet-R-CNN run torchvision's AlexNet through R-CNN (inits scratch_alexnet,
# imagenet_alexnet).
TABLE1_INIT = {"Scratch-R-CNN": "color_dropping-scratch_alexnet", "Scratch-Ours": "color_dropping-scratch",
               "Ours-projection": "projection-ours",
               "Ours-color-dropping": "color_dropping-ours", "ImageNet-R-CNN": "color_dropping-imagenet_alexnet",
               "K-means-rescale": "color_dropping-kmeans_rescale", "Ours-rescale": "color_dropping-ours_rescale",
               "ImageNet-rescale": "color_dropping-imagenet_rescale", "VGG-K-means-rescale": "vgg16-kmeans_rescale",
               "VGG-Ours-rescale": "vgg16-ours_rescale", "VGG-ImageNet-rescale": "vgg16-imagenet_rescale"}

# The normals row (a convert row) that reproduces each Table 2 row ("Unsup. Tracking" is Wang & Gupta [57]'s).
TABLE2_INIT = {"Scratch": "color_dropping-scratch", "Ours": "color_dropping-ours",
               "ImageNet Labels": "color_dropping-imagenet"}

# Section 4.6: pretext accuracy in %, keyed like the pretext_eval metrics they sit beside.
SECTION_4_6 = {
    "accuracy": PaperValue(38.4, "section 4.6: 500 random VOC 2007 images x 256 pairs"),
    "accuracy_in_boxes": PaperValue(39.2, "section 4.6: patches inside boxes >= 240 px, not truncated/occluded/"
                                          "difficult"),
    "accuracy_car": PaperValue(45.6, "section 4.6: the same, cars only"),
    "accuracy_train_images": PaperValue(39.5, "section 4.6: ImageNet training images"),
    "accuracy_heldout_images": PaperValue(40.3, "section 4.6: ImageNet validation images"),
    "chance": PaperValue(12.5, "section 4.6: chance, 8 positions"),
    "n_images": PaperValue(500, "section 4.6"),
    "pairs_per_image": PaperValue(256, "section 4.6"),
    "min_box_side": PaperValue(240, "section 4.6"),
}

# Section 4.2: (x, y) regression RMSE, coordinates normalised to [0, 1].
SECTION_4_2 = {
    "rmse_top10": PaperValue(0.255, "section 4.2: best 10% of images"),
    "rmse_chance": PaperValue(0.371, "section 4.2: always predicting the image centre"),
    "rmse_top10_projected": PaperValue(0.321, "section 4.2: best 10% after colour projection"),
    "top_fraction": PaperValue(0.1, "section 4.2"),
}

# Figure 9 (section 4.5.1): purity-coverage area under the curve.
FIGURE_9 = {
    "auc": PaperValue(0.87, "Figure 9 legend: ours"),
    "auc_at_0.5": PaperValue(None, "Figure 9 legend (in parentheses); not stated in the text"),
    "baseline_auc": PaperValue(0.83, "Figure 9 legend: Doersch et al. ECCV 2014 [12]"),
}

# Section 4.5.1: the evaluation's sizes.
SECTION_4_5_1 = {
    "n_clusters_selected": PaperValue(1000, "section 4.5.1: 1000 sets"),
    "set_size": PaperValue(10, "section 4.5.1: 10 images each"),
    "eval_n_constellations": PaperValue(16384, "section 4.5.1: 16,384 initial clusters"),
}

# docs/METHOD.md "Network": the scale of the pretraining run.
PRETRAINING = {
    "steps": PaperValue(1_700_000, "docs/METHOD.md: the released code's README, about 1.7M iterations"),
    "days": PaperValue(28, "docs/METHOD.md: about 4 weeks on one K40"),
}
