"""fc7 of an image's windows, streamed in batches and cached per image (R-CNN's feature cache, section 4.3).

Windows are warped (`warp`) and run through the network `batch` at a time, so no split-wide tensor is ever
built. With a cache folder each image's features are stored as `<image id>.npy` (float16, written atomically)
under a `key.json` naming the network weights and window settings: a rerun or a resumed run reads them back; a
different key empties the folder first. Features are rounded to float16 whether cached or not, so a cached and
an uncached run compute the same SVMs. Disk: images x (gt boxes + proposals) x fc7 x 2 bytes.

The forward runs under `amp` autocast (ctxrepro.pretext.precision): bf16's 8-bit mantissa rounds fc7 about as
coarsely as the float16 store does (11 bits), and the SVMs read the features as float32 and score in float64.
The cache key names the precision, so fc7 from another amp is recomputed.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.detection.rcnn.warp import warp_windows
from ctxrepro.detection.roidb import Entry, read_rgb
from ctxrepro.io import atomic_write_bytes, atomic_write_json
from ctxrepro.pretext.precision import autocast
from ctxrepro.progress import track


@torch.no_grad()
def window_features(net: WindowNet, rgb: np.ndarray, boxes: np.ndarray, pad: int, batch: int,
                    device: str | torch.device, amp: str = "none") -> np.ndarray:
    """(N, fc7) float16 features of one image's boxes, `batch` windows per forward pass under `amp` autocast."""
    out = [np.zeros((0, net.fc7.out_features), dtype=np.float16)]
    for start in range(0, len(boxes), batch):
        windows = warp_windows(rgb, boxes[start:start + batch], net.side, pad, net.fill)
        with autocast(device, amp):
            fc7 = net.fc7_features(torch.from_numpy(windows).to(device))
        out.append(fc7.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


class FeatureCache:
    """Per-image feature files under `folder`, valid for one `key` (module docstring)."""

    def __init__(self, folder: Path, key: dict, log: logging.Logger):
        self.folder = Path(folder)
        key_file = self.folder / "key.json"
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != key:
            stale = sorted(self.folder.glob("*.npy")) if self.folder.is_dir() else []
            if stale:
                log.warning("%s: %d cached feature files belong to other weights or settings: removed",
                            self.folder, len(stale))
            for p in stale:
                p.unlink()
            atomic_write_json(key_file, key)

    def get(self, image_id: str, rows: int) -> np.ndarray | None:
        path = self.folder / f"{image_id}.npy"
        if not path.is_file():
            return None
        feats = np.load(path)
        return feats if len(feats) == rows else None  # another proposal count: recompute

    def put(self, image_id: str, feats: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, feats)
        atomic_write_bytes(self.folder / f"{image_id}.npy", buf.getvalue())


def stream_features(net: WindowNet, entries: Sequence[Entry], boxes_of: Callable[[Entry], np.ndarray], pad: int,
                    batch: int, device: str | torch.device, cache: FeatureCache | None, log: logging.Logger,
                    desc: str, amp: str = "none") -> Iterator[tuple[Entry, np.ndarray, np.ndarray, bool]]:
    """(entry, its boxes, their float32 fc7, computed here (not read from the cache)) per image, in order."""
    net.eval()
    for e in track(entries, desc=desc, unit="img", log=log):
        boxes = boxes_of(e)
        feats = cache.get(e.image_id, len(boxes)) if cache is not None else None
        computed = feats is None
        if computed:
            feats = window_features(net, read_rgb(e.path, e.height, e.width), boxes, pad, batch, device, amp)
            if cache is not None:
                cache.put(e.image_id, feats)
        yield e, boxes, feats.astype(np.float32), computed
