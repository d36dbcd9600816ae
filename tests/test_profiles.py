"""The smoke profile is the paper profile with smaller counts and offline sources, and nothing else."""

from __future__ import annotations

from pathlib import Path

from ctxrepro.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]

# Every key of profiles/smoke.yaml whose value differs from profiles/paper.yaml: counts (images, steps,
# iterations, samples, processes), data sources and profile notes. A shape key here is a bug.
COUNTS = {
    "base.workers", "resize.workers",
    "fetch.world.imagenet_train_per_class", "fetch.world.imagenet_val", "fetch.world.voc07_trainval",
    "fetch.world.voc07_test", "fetch.world.voc11_trainval", "fetch.world.nyu_images", "fetch.world.nyu_train",
    "pretrain.steps", "pretrain.variants.vgg16.steps", "pretrain.checkpoint_every", "pretrain.log_every",
    "pretrain.heldout_images", "pretrain.workers",
    "convert.fit_images", "convert.heldout_images", "convert.kmeans_samples", "convert.kmeans_iters",
    "convert.calib_crops", "convert.calib_draws", "convert.calib_iters",
    "pretext_eval.n_images", "pretext_eval.pairs_per_image", "pretext_eval.pairs_per_box",
    "pretext_eval.manifest_images",
    "nn.n_queries", "nn.pool_per_image", "nn.show_queries",
    "aberration.train_images", "aberration.test_images", "aberration.patches_per_image", "aberration.steps",
    "aberration.batch", "aberration.figure_images",
    "linear_probe.imagenet_per_class", "linear_probe.batch", "linear_probe.workers", "linear_probe.sgd.batch",
    "linear_probe.sgd.iterations", "linear_probe.sgd.lr_step",
    "mine.n_constellations", "mine.top_k", "mine.set_size", "mine.n_sets", "mine.montage_clusters",
    "mine.html_thumbnails", "mine.eval_constellations", "mine.workers",
    "proposals.workers",
    "detect.iterations", "detect.lr_step", "detect.log_every", "detect.checkpoint_every", "detect.workers",
    "detect.rcnn.max_proposals", "detect.rcnn.iterations", "detect.rcnn.lr_step",
    "normals.kmeans_samples", "normals.steps", "normals.batch", "normals.log_every", "normals.checkpoint_every",
    "normals.eval_batch", "normals.examples",
}
SOURCES = {
    "fetch.imagenet_source", "fetch.voc2007_source", "fetch.voc2011_source", "fetch.nyuv2_source",
    "fetch.world.image_size", "fetch.world.voc_image_size",  # the world rendered at the real data sets' sizes
    "convert.imagenet_weights", "nn.imagenet_weights", "linear_probe.imagenet_weights",
    "proposals.source",
}
NOTES = {f"{s}.profile_note" for s in ("pretext_eval", "nn", "aberration", "linear_probe", "detect")}


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def _profile(name: str) -> dict:
    return _leaves(load_yaml(ROOT / "profiles" / f"{name}.yaml"))


def test_leaves_flatten_nested_sections():
    assert _leaves({"a": {"b": 1, "c": {"d": [2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [2], "e": {}}


def test_smoke_differs_from_paper_only_in_counts_sources_and_notes():
    paper, smoke = _profile("paper"), _profile("smoke")
    added = set(smoke) - set(paper)
    assert added <= COUNTS, f"smoke adds keys that are not counts: {added - COUNTS}"
    assert set(paper) - set(smoke) == set(), "smoke lacks paper keys"
    differing = {k for k in smoke if paper.get(k, object()) != smoke[k]}
    assert differing <= COUNTS | SOURCES | NOTES, f"shape keys differ: {sorted(differing - COUNTS - SOURCES - NOTES)}"


def test_smoke_keeps_the_paper_shapes():
    """The shapes the issue names, read independently of the list above."""
    smoke = _profile("smoke")
    expected = {"pretrain.tower": "alexnet", "pretrain.patch": 96, "pretrain.gap": 48, "pretrain.jitter": 7,
                "pretrain.grid_mode": "grid", "pretrain.input_size": 0, "pretrain.max_patches": 512,
                "pretrain.variants.vgg16.tower": "vgg16", "pretrain.variants.projection.color": "projection",
                "convert.input_side": 227, "convert.conv6b": 1024, "convert.fc7": 4096,
                "detect.scale": 600, "detect.max_size": 1000, "detect.images_per_batch": 2,
                "detect.rois_per_image": 64, "normals.input_height": 480, "normals.input_width": 640}
    assert {k: smoke[k] for k in expected} == expected
    assert smoke["fetch.world.image_size"] * 1.25 <= 500 and smoke["fetch.world.voc_image_size"] * 1.4 <= 500
