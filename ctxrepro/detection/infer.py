"""Fast R-CNN testing and the devkit's results files (paper section 4.3, Table 1; docs/DATA.md).

Per test image: every proposal is scored (softmax over fc8); with box regression each class gets its own
decoded box, clipped to the image, else the proposal itself. Per class: detections scoring above
`score_thresh`, non-maximum suppression at IoU 0.3 (torchvision's batched_nms on boxes in the +1 pixel
convention, suppressing IoU > 0.3 as Fast R-CNN's nms), then at most `max_per_class` per image. Results go
to `comp4_det_<imageset>_<class>.txt`, lines `<id> <score> <x1> <y1> <x2> <y2>` in 1-based pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ctxrepro.data.voc import VOC_CLASSES
from ctxrepro.detection.boxes import clip, decode
from ctxrepro.detection.model import BOX_STDS, FastRCNN, unnormalise
from ctxrepro.detection.roidb import Entry
from ctxrepro.detection.loader import load_image, to_tensor
from ctxrepro.io import atomic_write_text
from ctxrepro.metrics.voc import results_path
from ctxrepro.pretext.precision import autocast
from ctxrepro.progress import track

Detections = dict[int, np.ndarray]  # class index (1..20) -> (n, 5) [x1 y1 x2 y2 score], 0-based, score-descending


@dataclass(frozen=True)
class TestConfig:
    """Fast R-CNN's test settings (docs/DATA.md "Fast R-CNN defaults"): one scale, NMS 0.3 per class, at most 100 per class per image."""

    scale: int = 600
    max_size: int = 1000
    score_thresh: float = 0.05  # py-faster-rcnn's TEST threshold; lower only adds low-precision tail
    nms: float = 0.3
    max_per_class: int = 100
    roi_chunk: int = 1000  # RoIs per head pass (bounds memory: conv6 runs once per RoI)
    amp: str = "none"  # autocast of the network (ctxrepro.pretext.precision); scores and boxes are float32


@torch.no_grad()
def score_image(model: FastRCNN, entry: Entry, cfg: TestConfig, device: str | torch.device) -> tuple[Tensor, Tensor]:
    """(probabilities (P, C), boxes (P, 4C) in the image's own 0-based pixels) for every proposal."""
    props = torch.from_numpy(entry.proposals).double()
    if len(props) == 0:
        c = model.num_classes
        return torch.zeros(0, c), torch.zeros(0, 4 * c)
    rgb, factor = load_image(entry, False, cfg.scale, cfg.max_size)
    with autocast(device, cfg.amp):
        fmap = model.conv5(to_tensor(rgb, device))
    scores, deltas = [], []
    for chunk in torch.split((props * factor).float().to(device), cfg.roi_chunk):
        with autocast(device, cfg.amp):
            out = model.head(model.roi_pool(fmap, chunk))
        scores.append(torch.softmax(out.scores.float(), dim=1).cpu())
        if out.deltas is not None:
            deltas.append(out.deltas.float().cpu())
    probs = torch.cat(scores).double()
    if not deltas:
        return probs, props.repeat(1, model.num_classes)
    # Deltas are scale-invariant: decode them on the unscaled proposals (Fast R-CNN's im_detect)
    boxes = decode(props, unnormalise(torch.cat(deltas).double(), BOX_STDS))
    return probs, clip(boxes, entry.height, entry.width)


def nms_per_class(probs: Tensor, boxes: Tensor, score_thresh: float, nms: float, max_per_class: int) -> Detections:
    """Class-wise NMS of one image's scored boxes (module docstring); background (class 0) is skipped."""
    rows, cls = torch.nonzero(probs[:, 1:] > score_thresh, as_tuple=True)
    cls = cls + 1
    if len(rows) == 0:
        return {}
    cand = torch.stack([boxes[rows, 4 * cls + k] for k in range(4)], dim=1)
    scores = probs[rows, cls]
    # x2 + 1, y2 + 1: torchvision's continuous IoU then equals the +1-convention IoU of inclusive boxes
    keep = batched_nms(cand + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=cand.dtype), scores, cls, nms)
    out = {}
    for c in torch.unique(cls[keep]).tolist():
        k = keep[cls[keep] == c][:max_per_class]  # keep is in decreasing score order
        out[int(c)] = torch.cat([cand[k], scores[k, None]], dim=1).numpy()
    return out


def detect_all(model: FastRCNN, entries: Sequence[Entry], cfg: TestConfig, device: str | torch.device,
               log: logging.Logger) -> dict[str, Detections]:
    model.eval()
    out = {}
    for e in track(entries, desc="detect", unit="img", log=log):
        probs, boxes = score_image(model, e, cfg, device)
        out[e.image_id] = nms_per_class(probs, boxes, cfg.score_thresh, cfg.nms, cfg.max_per_class)
    return out


def results_lines(dets: dict[str, Detections], image_ids: Sequence[str], class_index: int) -> str:
    """One class's results file: images in image-set order, each image's boxes by descending score, 1-based."""
    lines = []
    for image_id in image_ids:
        for x1, y1, x2, y2, score in dets.get(image_id, {}).get(class_index, np.zeros((0, 5))):
            lines.append(f"{image_id} {score:.6f} {x1 + 1:.1f} {y1 + 1:.1f} {x2 + 1:.1f} {y2 + 1:.1f}")
    return "".join(line + "\n" for line in lines)


def write_results(out_dir: Path, dets: dict[str, Detections], image_ids: Sequence[str], imageset: str,
                  comp: str = "comp4") -> list[Path]:
    """All 20 classes' results files (the devkit expects one per class, even an empty one)."""
    paths = []
    for index, cls in enumerate(VOC_CLASSES, start=1):
        path = results_path(out_dir, comp, imageset, cls)
        atomic_write_text(path, results_lines(dets, image_ids, index))
        paths.append(path)
    return paths
