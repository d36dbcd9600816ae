"""REPORT.md's tables: the paper's numbers (`ctxrepro.report.paper_numbers`) beside ours, read from metrics/*.json.

Every reproduced number is read from a stage's metrics file when the report is rendered; nothing here is
typed in. A stage without a metrics file shows "not run" and its table keeps the paper's column, so every
table of the paper is always present. Each section says which data sets its numbers come from and whether
they can be compared with the paper's (sections 4.1-4.6, Tables 1 and 2, Figure 9).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ctxrepro.data.voc import VOC_CLASSES
from ctxrepro.detection.table import row_order
from ctxrepro.report import paper_numbers as P

METRICS = Path("metrics")
SINGLE = ("fetch", "resize", "proposals", "mine", "pretext_eval", "nn", "aberration")
FOREACH = ("pretrain", "convert", "detect", "normals")  # metrics/<stage>/<variant or row>.json
STAGES = ("fetch", "resize", "pretrain", "convert", "proposals", "detect", "normals", "mine", "pretext_eval",
          "nn", "aberration")
DATASETS = {"imagenet": "ImageNet", "voc2007": "VOC 2007", "voc2011": "VOC 2011", "nyuv2": "NYUv2"}
NOT_RUN = "not run"
# transfer/imagenet.py: the ImageNet rows start from torchvision's published weights, not the paper's CaffeNet
IMAGENET_NOTE = ("ImageNet rows (init `imagenet`) start from torchvision's published ImageNet weights "
                 "(AlexNet_Weights.IMAGENET1K_V1, VGG16_Weights.IMAGENET1K_V1). torchvision's AlexNet is the "
                 "one-column variant (64-192-384-256-256, no LRN), not the paper's CaffeNet (96-256-384-384-256, "
                 "LRN, two groups): its rows compare with the paper's only approximately. Its VGG-16 is the paper's.")
DASH = "–"


@dataclass(frozen=True)
class RunData:
    """What one run left behind: parsed metrics by key ("pretrain", "detect/ours"), files that could not be
    used and why, the params profile, the commit checked out when the report is written (REPORT.md prints
    the commits the metrics files recorded instead), and each data set's source kind from metrics/fetch.json."""

    metrics: dict[str, dict]
    unreadable: dict[str, str]
    profile: str
    commit: str

    def get(self, key: str) -> dict | None:
        return self.metrics.get(key)

    def inits(self, stage: str) -> list[str]:
        """The foreach items of `stage` that have metrics, in the paper's init order."""
        names = [k.split("/", 1)[1] for k in self.metrics if k.startswith(f"{stage}/")]
        return sorted(names, key=row_order)

    @property
    def sources(self) -> dict[str, str]:
        fetch = self.metrics.get("fetch") or {}
        return {name: str(d.get("source")) for name, d in (fetch.get("datasets") or {}).items()
                if isinstance(d, dict)}


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"unreadable: {e}"
    if not isinstance(data, dict):
        return None, f"unreadable: expected a JSON object, got {type(data).__name__}"
    return data, None


def load_run(root: Path, profile: str, commit: str) -> RunData:
    """Every metrics file the report uses, read once; a file that cannot be parsed is recorded, not fatal."""
    metrics, unreadable = {}, {}
    paths = [(name, root / METRICS / f"{name}.json") for name in SINGLE]
    for stage in FOREACH:
        folder = root / METRICS / stage
        paths += [(f"{stage}/{p.stem}", p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    for key, path in paths:
        if not path.is_file():
            continue
        data, why = _read(path)
        if data is None:
            unreadable[key] = f"{path.relative_to(root)}: {why}"
        else:
            metrics[key] = data
    return RunData(metrics, unreadable, profile, commit)


# --- formatting ---------------------------------------------------------------------------------------------

def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def _over(m: dict, key: str, base: str) -> float | None:
    """m[key] / m[base], or None when either is missing or the base is 0."""
    num, den = _number(m.get(key)), _number(m.get(base))
    return None if num is None or not den else num / den


def pct(x: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal."""
    v = _number(x)
    return DASH if v is None else f"{100 * v:.1f}"


def fixed(x: Any, digits: int = 1) -> str:
    v = _number(x)
    return DASH if v is None else f"{v:.{digits}f}"


def count(x: Any) -> str:
    v = _number(x)
    return DASH if v is None else f"{int(v):,}"


def paper(value: P.PaperValue, digits: int = 1) -> str:
    return "figure only" if value.value is None else f"{value.value:.{digits}f}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def seconds_of(m: dict) -> Any:
    s = m.get("seconds")
    return s.get("total") if isinstance(s, dict) else s


# --- provenance ----------------------------------------------------------------------------------------------

def tiny_world(run: RunData, datasets: Sequence[str]) -> bool:
    return run.profile == "tiny" or any(run.sources.get(d) == "builtin" for d in datasets)


def code_label(m: dict | None) -> str:
    """Which code wrote a metrics file: the commit its stage recorded (`ctxrepro.stage.code_provenance`), and
    whether the stage's code had uncommitted changes then."""
    prov = (m or {}).get("provenance")
    if not isinstance(prov, dict):
        return "commit not recorded"
    if not prov.get("commit"):
        return "commit unknown (ran outside git)"
    clean = prov.get("code_clean")
    state = "" if clean else " with uncommitted code changes" if clean is False else " (cleanliness unknown)"
    return f"`{str(prov['commit'])[:12]}`{state}"


def code_line(run: RunData, stages: Sequence[str]) -> str:
    """The code commits behind the metrics files of `stages`, each once (several when files differ)."""
    labels = sorted({code_label(run.metrics[k]) for s in stages for k in stage_keys(run, s) if k in run.metrics})
    return f"code {'; '.join(labels)}" if labels else f"code {NOT_RUN}"


def code_commits(run: RunData) -> list[str]:
    """Every commit recorded by the metrics files read, sorted (the report's own summary)."""
    return sorted({str(m["provenance"]["commit"]) for m in run.metrics.values()
                   if isinstance(m.get("provenance"), dict) and m["provenance"].get("commit")})


def data_line(run: RunData, datasets: Sequence[str], stages: Sequence[str],
              rendered_world: bool = False) -> str:
    """Which data and code a section's numbers come from, and whether they can be set beside the paper's."""
    srcs = run.sources
    parts = [f"{DATASETS[d]} ({'tiny world' if srcs.get(d) == 'builtin' else srcs.get(d, 'source unknown')})"
             for d in datasets]
    if rendered_world:
        parts.append("scenes rendered by the stage from the tiny world")
    head = f"Data: {', '.join(parts)}; profile `{run.profile}`; {code_line(run, stages)}."
    if rendered_world or tiny_world(run, datasets):
        return head + " **Tiny-world numbers: they cannot be compared with the paper's.**"
    if any(d not in srcs for d in datasets):
        return head + " **Data source unknown (fetch not run): not comparable with the paper's.**"
    if run.profile == "paper":
        return head + " Real data and the paper profile: comparable with the paper."
    return head + " Real data, custom profile: comparable only as far as params.yaml matches profiles/paper.yaml."


def stage_keys(run: RunData, stage: str) -> list[str]:
    if stage in FOREACH:
        bad = sorted(k for k in run.unreadable if k.startswith(f"{stage}/"))
        return [f"{stage}/{i}" for i in run.inits(stage)] + bad
    return [stage] if stage in run.metrics or stage in run.unreadable else []


def stage_status(run: RunData) -> list[str]:
    """One row per metrics file: ok, not run, or why it could not be read."""
    rows = []
    for stage in STAGES:
        keys = stage_keys(run, stage)
        if not keys:
            pattern = f"metrics/{stage}/*.json" if stage in FOREACH else f"metrics/{stage}.json"
            rows.append((stage, f"`{pattern}`", NOT_RUN, DASH, DASH))
        for key in keys:
            m = run.metrics.get(key)
            status = "ok" if m is not None else run.unreadable[key]
            code = code_label(m) if m is not None else DASH
            rows.append((key, f"`metrics/{key}.json`", status, fixed(seconds_of(m or {}), 1), code))
    return md_table(("stage", "metrics file", "status", "seconds", "code"), rows)


def data_sources(run: RunData) -> list[str]:
    fetch = run.get("fetch")
    if fetch is None:
        return [f"Data sources: {NOT_RUN} (`metrics/fetch.json` missing); every number below is unverified."]
    rows = []
    for name, label in DATASETS.items():
        d = (fetch.get("datasets") or {}).get(name) or {}
        kind = d.get("source", DASH)
        rows.append((label, f"{kind} (tiny world)" if kind == "builtin" else kind, count(d.get("images"))))
    return md_table(("data set", "source (metrics/fetch.json)", "images"), rows)


# --- Table 1 --------------------------------------------------------------------------------------------------

def _table1_values(row: str) -> tuple[float, ...]:
    return P.PAPER_TABLE1.get(row) or P.TABLE1_OTHER_ROWS[row]


def _table1_status(run: RunData, row: str, inits: list[str]) -> str:
    init = P.TABLE1_INIT.get(row)
    if init is None:
        return "not reproduced (another method or other data)"
    if init.endswith(("-imagenet", "-imagenet_alexnet", "-imagenet_rescale")) and tiny_world(run, ("imagenet",)):
        return f"skipped: no ImageNet labels in the tiny world (row `{init}`)"
    if init.endswith("-scratch_alexnet") and init not in inits and tiny_world(run, ("imagenet",)):
        return f"skipped in the tiny world: AlexNet on 227 px windows is past its CPU budget (row `{init}`)"
    if init not in inits:
        return f"{NOT_RUN} (row `{init}`)"
    ran_as = run.metrics[f"detect/{init}"].get("paper_row") or "no paper row"
    return f"row `{init}` ran as {ran_as}"


def table1(run: RunData) -> list[str]:
    """Table 1: every row's mAP, ours beside the row it reproduces; then per-class AP of our runs."""
    inits = run.inits("detect")
    lines = ["## Table 1: VOC 2007 test detection (section 4.3)", "",
             data_line(run, ("imagenet", "voc2007"), ("pretrain", "convert", "detect")), ""]
    rows = []
    for row in P.TABLE1_ORDER:
        claimed = [i for i in inits if run.metrics[f"detect/{i}"].get("paper_row") == row]
        paper_map = fixed(_table1_values(row)[-1])
        if not claimed:
            rows.append((row, paper_map, _table1_status(run, row, inits), DASH, DASH))
        for init in claimed:
            m = run.metrics[f"detect/{init}"]
            rows.append((row, paper_map, f"`{init}`: {m.get('protocol', DASH)}", pct(m.get("map")),
                         count(len(m.get("ap") or {}))))
    lines += md_table(("Table 1 row", "paper mAP (20 classes)", "reproduced by (protocol)", "ours mAP",
                       "our classes"), rows)
    lines += ["", "Each row names the protocol it ran (`detect.protocol`, per init). The paper's R-CNN rows "
              "(Scratch-R-CNN, Scratch-Ours, Ours-projection, Ours-color-dropping, ImageNet-R-CNN) used R-CNN without "
              "box regression: ours run \"R-CNN: warped windows, fc7 SVMs\" (fine-tuning on windows warped to the "
              "network's input with context padding, then one linear SVM per class on fc7 with hard-negative mining). "
              "ImageNet-R-CNN and Scratch-R-CNN use torchvision's one-column AlexNet, the closest published stand-in "
              "for CaffeNet, with its own fc6 and fc7. A row marked \"Fast R-CNN training, R-CNN-style rows\" ran "
              "the earlier substitution. The rescale rows use the paper's CaffeNet-shaped network (conv layers copied "
              "with BN folded, RoI grid 6x6, VGG 7x7, fc6-fc8 by k-means, then rescaled) and Fast R-CNN with box "
              "regression."]
    lines += ["", "Our mAP averages the classes we evaluated (column 'our classes'); the paper's averages all 20. "
              "Per class:", ""]
    lines += _table1_per_class(run, inits)
    return lines + ["", IMAGENET_NOTE]


def _table1_per_class(run: RunData, inits: list[str]) -> list[str]:
    if not inits:
        return [f"Per-class AP: {NOT_RUN} (`metrics/detect/*.json` missing; `dvc repro detect`)."]
    runs = {i: run.metrics[f"detect/{i}"] for i in inits}
    classes = [c for c in VOC_CLASSES if any(c in (m.get("ap") or {}) for m in runs.values())]
    rows = []
    for init, m in runs.items():
        row = m.get("paper_row")
        if row in P.PAPER_TABLE1:
            values = P.PAPER_TABLE1[row]
            rows.append((f"{row} (paper)", *(fixed(values[VOC_CLASSES.index(c)]) for c in classes),
                         fixed(values[-1])))
        ap = m.get("ap") or {}
        rows.append((f"`{init}` (ours)", *(pct(ap.get(c)) for c in classes), pct(m.get("map"))))
    return md_table(("AP (%)", *classes, "mAP"), rows)


# --- Table 2 --------------------------------------------------------------------------------------------------

def table2(run: RunData) -> list[str]:
    """Table 2: NYUv2 surface normals, each paper row followed by the run that reproduces it."""
    inits = run.inits("normals")
    lines = ["## Table 2: NYUv2 surface normals (section 4.4)", "",
             data_line(run, ("imagenet", "nyuv2"), ("pretrain", "convert", "normals")), ""]
    keys = (*P.TABLE2_COLUMNS, "rmse")
    rows = []
    for label, values in P.PAPER_TABLE2:
        rows.append((f"{label} (paper)", *(fixed(v) for v in values), DASH))
        init = P.TABLE2_INIT.get(label)
        if init is None:
            rows.append((f"{label} (ours)", "not reproduced (another method)", *[DASH] * 5))
        elif init in inits:
            m = run.metrics[f"normals/{init}"]
            rows.append((f"`{init}` (ours)", *(fixed(m.get(k)) for k in keys)))
        elif init.endswith("-imagenet") and tiny_world(run, ("imagenet",)):
            rows.append((f"`{init}` (ours)", "skipped: no ImageNet labels in the tiny world", *[DASH] * 5))
        else:
            rows.append((f"`{init}` (ours)", NOT_RUN, *[DASH] * 5))
    for init in inits:
        if init not in P.TABLE2_INIT.values():
            m = run.metrics[f"normals/{init}"]
            rows.append((f"`{init}` (ours, no paper row)", *(fixed(m.get(k)) for k in keys)))
    head = ("NYUv2", "mean (°, lower better)", "median (°)", "≤11.25° (%)", "≤22.5° (%)", "≤30° (%)",
            "RMSE (°)")
    return lines + md_table(head, rows) + ["", normals_protocol(run, inits), "", IMAGENET_NOTE]


def normals_protocol(run: RunData, inits: Sequence[str]) -> str:
    """Each run's ground truth and codebook, from its metrics: the paper's protocol is `fair` with `vocab`."""
    def one(init: str) -> str:
        m = run.metrics[f"normals/{init}"]
        if "gt_source" not in m or "codebook" not in m:
            return f"`{init}`: not recorded"
        size = count(m.get("codebook_size"))
        return f"`{init}`: ground truth `{m['gt_source']}`, codebook `{m['codebook']}` ({size})"
    runs = "; ".join(one(init) for init in inits) or NOT_RUN
    return ("Ground truth and codebook (Table 2's protocol: the FAIR benchmark's normals `fair` and its vocab40.mat "
            f"`vocab`): {runs}.")


# --- section 4.6 ----------------------------------------------------------------------------------------------

def pretraining(run: RunData) -> list[str]:
    """One column per pretraining variant (metrics/pretrain/<variant>.json)."""
    variants = run.inits("pretrain")
    lines = ["## Pretraining (section 3)", "", data_line(run, ("imagenet",), ("pretrain",)), ""]
    if not variants:
        return lines + [f"pretrain: {NOT_RUN} (`metrics/pretrain/*.json` missing; `dvc repro pretrain`)."]
    s, ms = P.PRETRAINING, [run.metrics[f"pretrain/{v}"] for v in variants]

    def days(m: dict) -> str:
        seconds = _number(m.get("seconds"))
        return DASH if seconds is None else f"{seconds / 86400:.4f}"

    rows = [("training steps", count(s["steps"].value), *(count(m.get("steps")) for m in ms)),
            ("training time (days)", fixed(s["days"].value, 0), *(days(m) for m in ms)),
            ("final training accuracy (%)", "no paper number", *(pct(m.get("train_accuracy")) for m in ms)),
            ("held-out accuracy (%)", "see section 4.6", *(pct(m.get("heldout_accuracy")) for m in ms)),
            ("pairs per second", "no paper number", *(fixed(m.get("pairs_per_second"), 0) for m in ms)),
            ("stopped by", DASH, *(str(m.get("stopped_by", DASH)) for m in ms))]
    head = ("pretraining", "paper", *(f"ours: `{v}`" for v in variants))
    return lines + md_table(head, rows) + ["", f"Sections 4.1-4.6 and Table 2 use `{P.MAIN_VARIANT}`."]
