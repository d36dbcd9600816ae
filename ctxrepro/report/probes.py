"""REPORT.md's "Linear probes" section: the `linear_probe` stage's per-layer numbers, networks as rows, layers as
columns, with the published numbers for this paper's network where a later publication printed them.

The paper (2015) has no linear probes. Zhang, Isola, Efros (CVPR 2017, split-brain autoencoders) Table 2 gives
ImageNet linear top-1 from conv1..conv5 of Doersch et al.'s network (frozen, features resized to 9,216-9,600
dims), and of the supervised ("ImageNet labels") and randomly initialised ("Gaussian") CaffeNet: printed beside
our color_dropping / projection, imagenet and random rows; no fc6 value is printed there. Goyal et al. (ICCV
2019) do not evaluate Doersch et al.'s network, so the VOC07 SVM column has no published value for it.

The `imagenet` row (when metrics/linear_probe/imagenet.json exists) is an ImageNet-supervised network probed the
same way: Zhang et al.'s upper reference. Its label says where the weights came from (the metrics'
`weights_source`), so a smoke run's randomly initialised stand-in is never read as supervised.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctxrepro.report.tables import DASH, NOT_RUN, RunData, md_table, pct, tiny_world

METRICS = Path("metrics/linear_probe")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")
IMAGENET = "imagenet"
ORDER = ("color_dropping", "projection", "vgg16", IMAGENET, "random")
NOT_PUBLISHED = "not published"
# Zhang, Isola, Efros 2017, Table 2 ("Task Generalization on ImageNet Classification"), row "Doersch et al. [8]".
ZHANG_2017_TABLE2 = {"conv1": 16.2, "conv2": 23.3, "conv3": 30.2, "conv4": 31.7, "conv5": 29.6}
# The same table's reference rows: "ImageNet labels" (supervised CaffeNet) and "Gaussian" (random init).
ZHANG_2017_LABELS = {"conv1": 19.3, "conv2": 36.3, "conv3": 44.2, "conv4": 48.3, "conv5": 50.5}
ZHANG_2017_GAUSSIAN = {"conv1": 11.6, "conv2": 17.1, "conv3": 16.9, "conv4": 16.3, "conv5": 14.1}
PUBLISHED = (("Doersch et al., published (Zhang et al. 2017, Table 2): beside color_dropping / projection",
              ZHANG_2017_TABLE2),
             ("ImageNet labels, CaffeNet (Zhang et al. 2017, Table 2): beside imagenet", ZHANG_2017_LABELS),
             ("Gaussian init (Zhang et al. 2017, Table 2): beside random", ZHANG_2017_GAUSSIAN))


def read_probes(root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """{network: metrics} from metrics/linear_probe/*.json, and {file: why} for files that cannot be read."""
    found, bad = {}, {}
    folder = root / METRICS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            bad[str(path.relative_to(root))] = f"unreadable: {e}"
            continue
        if isinstance(data, dict):
            found[path.stem] = data
        else:
            bad[str(path.relative_to(root))] = "unreadable: not a JSON object"
    order = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {n: found[n] for n in order}, bad


def label(name: str, metrics: dict) -> str:
    """The row's name; for `imagenet`, what its weights are (torchvision's published ones, a seeded random init
    of torchvision's architecture, or a file)."""
    source = metrics.get("weights_source")
    if name != IMAGENET or not isinstance(source, dict):
        return name
    arch = {"alexnet": "AlexNet", "vgg16": "VGG-16"}.get(source.get("arch"), str(source.get("arch", "?")))
    if "weights" in source:
        return f"{IMAGENET} (supervised, torchvision {arch} {str(source['weights']).split('.')[-1]})"
    if "random" in source:
        return f"{IMAGENET} (torchvision {arch}, random init: a stand-in, not ImageNet-trained)"
    return f"{IMAGENET} ({arch} from {source.get('path', '?')})"


def protocol(probes: dict[str, dict]) -> str:
    """The ImageNet protocol in one line, with this run's iterations, passes and feature sizes."""
    runs = [m for m in probes.values() if isinstance(m.get("imagenet_iterations"), int)]
    ours = "not run"
    if runs:
        m = runs[0]
        dims = [d for d in (m.get("dims") or {}).values() if isinstance(d, int)]
        ours = (f"{m['imagenet_iterations']:,} iterations, {m.get('imagenet_passes')} fresh crop-and-flip views "
                f"per training image, {min(dims, default=0):,}-{max(dims, default=0):,} dims per layer")
    return ("Protocol: frozen trunk; per layer a linear softmax on standardised, average-pooled features, trained "
            "online on a fresh random crop and flip of each image at every pass; top-1 on val's centre crop. "
            f"Ours: {ours}. Zhang et al. 2017: 227-px crops, 9,216-9,600 dims (conv1-conv5), SGD as Goyal et al.'s "
            "released config (140k iterations of 256, lr 0.01 x0.1 every 40k).")


def _row(label: str, values: dict | None) -> list[str]:
    values = values if isinstance(values, dict) else {}
    return [label] + [pct(values.get(layer)) if layer in values else DASH for layer in LAYERS]


def probes_section(root: Path, run: RunData) -> list[str]:
    """The "Linear probes" section of REPORT.md."""
    probes, bad = read_probes(root)
    lines = ["## Linear probes (frozen features; not in the paper)", "",
             "Linear classifiers on each layer's frozen features, average-pooled to at most `linear_probe.dims` "
             "(`linear_probe` stage): ImageNet top-1 of a softmax layer trained with SGD (Zhang et al. 2016/2017), "
             "and VOC07 classification mAP of per-class linear SVMs, cost by 3-fold cross-validation "
             "(Goyal et al. 2019). Numbers in %.", "", protocol(probes)]
    if tiny_world(run, ("imagenet", "voc2007")):
        lines += ["", "> **Tiny world**: the 8 world classes of the tiny ImageNet and VOC07, a scaled-down protocol "
                      "(`linear_probe.profile_note`); these numbers cannot be compared with the published ones."]
    head = ["network", *LAYERS]
    imagenet = [_row(label(n, m), m.get("imagenet_top1")) for n, m in probes.items()]
    imagenet += [[name, *[f"{row[k]:.1f}" if k in row else NOT_PUBLISHED for k in LAYERS]] for name, row in PUBLISHED]
    voc = [_row(label(n, m), m.get("voc07_map")) for n, m in probes.items()]
    voc.append(["Doersch et al., published", *[NOT_PUBLISHED] * len(LAYERS)])
    lines += ["", "ImageNet linear top-1:", ""] + md_table(head, imagenet)
    lines += ["", "VOC07 classification mAP (linear SVMs; VOC07 11-point AP):", ""] + md_table(head, voc)
    if not probes:
        lines += ["", f"Our rows: {NOT_RUN} (no metrics/linear_probe/*.json)."]
    speed = [f"{n} {m['features_per_second']:.0f}" for n, m in probes.items()
             if isinstance(m.get("features_per_second"), (int, float))]
    if speed:
        lines += ["", "VOC07 feature extraction, images/s: " + ", ".join(speed) + "."]
    online = [f"{n} {m['imagenet_images_per_second']:.0f}" for n, m in probes.items()
              if isinstance(m.get("imagenet_images_per_second"), (int, float))]
    if online:
        lines += ["", "ImageNet heads trained online, images/s: " + ", ".join(online) + "."]
    lines += [f"- {name}: {why}" for name, why in sorted(bad.items())]
    return lines
