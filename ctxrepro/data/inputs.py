"""The archives a profile needs, checked before anything is fetched or trained.

Each data set has required archives (registry.ARCHIVES) and optional ones. Some optional archives become
required by the protocol the params choose:
- ILSVRC2012_devkit_t12.tar.gz (ImageNet's validation labels) when `linear_probe.networks` lists a network;
- nyuv2_surfacenormal_metadata.zip (the FAIR benchmark's ground truth and its vocab40.mat codebook) when
  `normals.gt_source` is `fair` or `normals.codebook` is `vocab` (Table 2's protocol, section 4.4);
- selective_search_data.tgz (Fast R-CNN's boxes) when `proposals.source` is `mat` (section 4.3).

`fetch` refuses to start when one of them is missing from its source, so a run never stops after weeks of
pretraining for want of a label file. `required_inputs` lists every archive the params need with where it is
looked for and whether it is there (`ctxrepro check` reports it).

The builtin world writes every archive of its data sets except two: ImageNet's labels come from its index
(data/raw/world_index.json, which linear_probe reads), and it has no Fast R-CNN boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ctxrepro.data.registry import IMAGENET_HELP, Archive, archives_for

DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
FAIR_NORMALS = "nyuv2_surfacenormal_metadata.zip"
SELECTIVE_SEARCH = "selective_search_data.tgz"
DATASETS = ("imagenet", "voc2007", "voc2011", "nyuv2")  # fetch.<name>_source
WORLD_LACKS = {SELECTIVE_SEARCH}
WORLD_INDEX_GIVES = {DEVKIT: "the builtin world's labels (data/raw/world_index.json)"}
HOW_TO_GET = {
    DEVKIT: "download ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (login; the ILSVRC2012 "
            "'Development kit (Task 1 & 2)') into the folder fetch.imagenet_source names",
    FAIR_NORMALS: "download https://dl.fbaipublicfiles.com/fair_self_supervision_benchmark/"
                  "nyuv2_surfacenormal_metadata.zip into the folder fetch.nyuv2_source names (or use official)",
    SELECTIVE_SEARCH: "download Fast R-CNN's https://dl.dropboxusercontent.com/s/orrt7o6bp6ae0tc/"
                      "selective_search_data.tgz into the folder fetch.voc2007_source names (or use official), "
                      "or set proposals.source: opencv",
}


@dataclass(frozen=True)
class Need:
    """An optional archive that the chosen protocol needs: which, of which data set, and which params ask."""

    archive: str
    dataset: str
    reason: str


@dataclass(frozen=True)
class RequiredInput:
    """One archive a run needs. `present` is None for URL sources: fetch learns it when it downloads."""

    name: str
    dataset: str
    needed_by: str
    where: str
    present: bool | None
    how_to_get: str

    def line(self) -> str:
        """One line for a person: the archive, who needs it, where it was looked for, how to get it."""
        return (f"{self.name} ({self.dataset}, needed by {self.needed_by}) is not in {self.where}: "
                f"{self.how_to_get}")


def protocol_needs(params: Mapping) -> tuple[Need, ...]:
    """The optional archives that the params' protocol makes required (params: params.yaml as loaded)."""
    probe = (params.get("linear_probe") or {}).get("networks") or ()
    normals = params.get("normals") or {}
    proposals = params.get("proposals") or {}
    needs = []
    if probe:
        needs.append(Need(DEVKIT, "imagenet", "linear_probe.networks (ImageNet validation labels)"))
    table2 = [f"normals.{k}: {normals.get(k)}" for k, v in (("gt_source", "fair"), ("codebook", "vocab"))
              if normals.get(k) == v]
    if table2:
        needs.append(Need(FAIR_NORMALS, "nyuv2", " and ".join(table2)))
    if proposals.get("source") == "mat":
        needs.append(Need(SELECTIVE_SEARCH, "voc2007", "proposals.source: mat"))
    return tuple(needs)


def needed_archives(dataset: str, source: str, needs: tuple[Need, ...]) -> dict[str, str]:
    """{archive: reason} of `needs` that fetch must place for `dataset` from `source` (the builtin world's
    index stands in for the devkit)."""
    return {n.archive: n.reason for n in needs
            if n.dataset == dataset and not (source == "builtin" and n.archive in WORLD_INDEX_GIVES)}


def _how(archive: Archive) -> str:
    if archive.name in HOW_TO_GET:
        return HOW_TO_GET[archive.name]
    if archive.dataset == "imagenet":
        return IMAGENET_HELP
    return f"download {archive.url} (or set the data set's fetch source to official)" if archive.url else archive.note


def _present(archive: Archive, source: str, root: Path) -> tuple[str, bool | None]:
    """(where it is looked for, whether it is there) for one archive of a fetch source."""
    if source == "builtin":
        if archive.name in WORLD_INDEX_GIVES:
            return WORLD_INDEX_GIVES[archive.name], True
        return "the builtin world", archive.name not in WORLD_LACKS
    if source == "official":
        return ("its official URL", None) if archive.url else ("the registry's official URLs (it has none)", False)
    if source.lower().startswith(("http://", "https://")):
        return source, None
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_file():
        return str(path), path.name == archive.name
    return str(path), (path / archive.name).is_file() or (path / archive.extracts_to).exists()


def inputs_for(sources: Mapping[str, str], needs: tuple[Need, ...], root: Path) -> list[RequiredInput]:
    """Every required archive of each data set, and each needed optional one, with its presence."""
    out = []
    for dataset, source in sources.items():
        reasons = {n.archive: n.reason for n in needs if n.dataset == dataset}
        for archive in archives_for(dataset):
            if not (archive.required or archive.name in reasons):
                continue
            where, present = _present(archive, source, root)
            needed_by = reasons.get(archive.name, "fetch (a required archive)")
            out.append(RequiredInput(archive.name, dataset, needed_by, where, present, _how(archive)))
    return out


def required_inputs(params: Mapping, root: Path = Path(".")) -> list[RequiredInput]:
    """Every archive that a run of `params` (params.yaml as loaded) needs, with where fetch looks for it and
    whether it is there; relative local sources are taken from `root` (the repository)."""
    fetch = params.get("fetch") or {}
    sources = {name: str(fetch.get(f"{name}_source", "builtin")) for name in DATASETS}
    return inputs_for(sources, protocol_needs(params), Path(root))
