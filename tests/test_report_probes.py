"""REPORT.md's "Linear probes" section (ctxrepro.report.probes): our rows from the stage's metrics, published row."""

from __future__ import annotations

import json

from ctxrepro.report.probes import probes_section
from ctxrepro.report.tables import RunData


def test_probe_table_rows_and_published_numbers(tmp_path):
    folder = tmp_path / "metrics" / "linear_probe"
    folder.mkdir(parents=True)
    layers = {"conv1": 0.25, "conv2": 0.5, "conv3": 0.125, "conv4": 0.0, "conv5": 1.0, "fc6": 0.75}
    (folder / "random.json").write_text(json.dumps({"imagenet_top1": layers, "voc07_map": {"conv1": 0.5},
                                                    "features_per_second": 12.0}))
    (folder / "color_dropping.json").write_text(json.dumps({"imagenet_top1": layers, "voc07_map": layers}))
    (folder / "broken.json").write_text("{")
    lines = probes_section(tmp_path, RunData({}, {}, "tiny", "abc"))
    text = "\n".join(lines)
    assert "| color_dropping | 25.0 | 50.0 | 12.5 | 0.0 | 100.0 | 75.0 |" in text
    assert text.index("| color_dropping |") < text.index("| random |")  # pretext variants first
    assert "| random | 50.0 | – | – | – | – | – |" in text  # VOC row: only conv1 was measured
    assert "| 16.2 | 23.3 | 30.2 | 31.7 | 29.6 | not published |" in text  # Zhang et al. 2017, Table 2
    assert "Tiny world" in text and "random 12" in text
    assert "metrics/linear_probe/broken.json: unreadable" in text


def test_probe_table_without_runs_keeps_the_published_row(tmp_path):
    text = "\n".join(probes_section(tmp_path, RunData({}, {}, "paper", "abc")))
    assert "not run" in text and "16.2" in text and "Tiny world" not in text


def test_imagenet_row_says_where_its_weights_came_from(tmp_path):
    folder = tmp_path / "metrics" / "linear_probe"
    folder.mkdir(parents=True)
    top1 = {"conv1": 0.5, "conv5": 0.75}
    source = {"weights": "AlexNet_Weights.IMAGENET1K_V1", "url": "https://x", "arch": "alexnet",
              "imagenet_weights": "torchvision"}
    for name in ("random", "imagenet", "color_dropping"):
        (folder / f"{name}.json").write_text(json.dumps({"imagenet_top1": top1, "weights_source": source}))
    text = "\n".join(probes_section(tmp_path, RunData({}, {}, "paper", "abc")))
    row = "| imagenet (supervised, torchvision AlexNet IMAGENET1K_V1) | 50.0 | – | – | – | 75.0 | – |"
    assert row in text
    assert text.index("| color_dropping |") < text.index("| imagenet (") < text.index("| random |")
    stand_in = {"random": "alexnet", "seed": 0, "arch": "alexnet", "imagenet_weights": "random:alexnet"}
    (folder / "imagenet.json").write_text(json.dumps({"imagenet_top1": top1, "weights_source": stand_in}))
    text = "\n".join(probes_section(tmp_path, RunData({}, {}, "paper", "abc")))
    assert "| imagenet (torchvision AlexNet, random init: a stand-in, not ImageNet-trained) |" in text


def test_published_rows_beside_ours_and_the_protocol_line(tmp_path):
    folder = tmp_path / "metrics" / "linear_probe"
    folder.mkdir(parents=True)
    dims = {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216, "fc6": 4096}
    (folder / "color_dropping.json").write_text(json.dumps({
        "imagenet_top1": {"conv1": 0.5}, "imagenet_iterations": 140000, "imagenet_passes": 27.97, "dims": dims,
        "imagenet_images_per_second": 1234.0}))
    text = "\n".join(probes_section(tmp_path, RunData({}, {}, "paper", "abc")))
    assert "| 19.3 | 36.3 | 44.2 | 48.3 | 50.5 | not published |" in text  # ImageNet labels, beside `imagenet`
    assert "| 11.6 | 17.1 | 16.9 | 16.3 | 14.1 | not published |" in text  # Gaussian, beside `random`
    assert "Ours: 140,000 iterations, 27.97 fresh crop-and-flip views per training image, 4,096-9,600 dims" in text
    assert "ImageNet heads trained online, images/s: color_dropping 1234." in text
