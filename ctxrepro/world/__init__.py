"""The embedded tiny world: small data sets in the exact on-disk formats of ImageNet, PASCAL VOC 2007/2011
and NYUv2 (docs/DATA.md), deterministic from a seed, so the real fetch code and loaders run everywhere."""

from ctxrepro.world.generate import ARCHIVES, INDEX, generate
from ctxrepro.world.spec import CATEGORIES, WNIDS, WorldSpec

__all__ = ["ARCHIVES", "CATEGORIES", "INDEX", "WNIDS", "WorldSpec", "generate"]
