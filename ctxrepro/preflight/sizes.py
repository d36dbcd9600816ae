"""Disk and peak host memory of a stage instance: the estimate record and the sizes per item it uses.

A model: each term is a count from the params or the data (images, steps' shapes, parameters counted on
the meta device) times a size per item. Sizes per item are either exact (float32 weights, optimizer
slots) or measured where stated (bench/README.md, or the committed tiny run's files for the small CSVs).
tests/test_preflight.py holds every instance of the tiny run to within a factor of 3 of what dvc.lock
records and the run's total to within 1.5x, and the smoke run's measured models, cache and peak disk to
within 1.5x.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1 << 20
# A stage process after importing torch and the library: bench/README.md "Memory at real scale" measured
# 800..930 MB peak RSS before any data.
BASE_MEMORY = 900 * MB
# One DataLoader / pool worker: a forked interpreter touching its own copy of what it decodes. Not measured:
# most of a fork's pages stay shared; 250 MB is a conservative figure per process.
WORKER_MEMORY = 250 * MB
MANIFEST_ROW = 256  # bench/README.md: the resize manifest grows 0.25 KB per image
ROIDB_IMAGE = 64 * 1024  # bench/README.md: the roidb holds 64 KB per image (2,000 boxes)
Q95_444 = 1.65  # bench/README.md chroma table: q95 4:4:4 JPEGs take 1.65x the bytes of q90 4:2:0
NYU_FRAME = 2_972_037_809 / 1449  # nyu_depth_v2_labeled.mat bytes per frame (registry size / frames)
# Unknown in the registry: VOC 2011 trainval (1.7 GB as the VOC site lists it) and the devkit (about 2.5 MB).
UNSIZED = {"VOCtrainval_25-May-2011.tar": 1_700_000_000, "ILSVRC2012_devkit_t12.tar.gz": 2_500_000}
# Small CSV and JSON outputs, bytes per row as the committed tiny run wrote them (dvc.lock sizes / rows).
PAIR_ROW, MATCH_ROW, DETECTION_BYTES, CONSTELLATION_ROW = 205, 342, 712, 270
PROPOSAL_BOXES = 2000  # Fast R-CNN's selective search: about 2,000 boxes per VOC image, all used


@dataclass(frozen=True)
class Estimate:
    cached: int = 0  # outputs DVC caches: a second copy under cache.type copy
    uncached: int = 0  # cache: false outputs and persist resume states
    kept: int = 0  # files outside the DVC outputs that stay: kept downloads, feature caches
    scratch: int = 0  # temporary files while it runs (a state written beside the old one, a world in the making)
    memory: int = BASE_MEMORY

    @property
    def outs(self) -> int:
        """Bytes of its DVC outputs (what dvc.lock records as their sizes)."""
        return self.cached + self.uncached

    def lasting(self, cache_copies: bool) -> int:
        """Bytes that stay after it ran: outputs, their cache copies, and kept files."""
        return self.cached * (2 if cache_copies else 1) + self.uncached + self.kept

    def disk(self, cache_copies: bool) -> int:
        """Bytes it needs while it runs."""
        return self.lasting(cache_copies) + self.scratch


def slots(section: dict) -> int:
    """Optimizer slots per weight: Adam keeps two moments, SGD one momentum buffer (none at momentum 0)."""
    if section.get("optimizer") == "adam":
        return 2
    return 1 if section.get("momentum", 0) else 0


