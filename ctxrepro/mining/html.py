"""Pictures of mined clusters (paper section 4.5): Figure-7-style montages, the offline ranking page,
and the purity-coverage plot of Figure 9.

A cluster is drawn as its query constellation followed by the raw crops of its top verified matches
(Figure 7: "For all clusters, we show the raw top 7 matches that verified geometrically"), each crop
the bounding box of the four matched patches. The ranking page is one self-contained HTML file (thumbnails
inlined as JPEG data URIs), so it opens offline and travels as a single DVC output.
"""

from __future__ import annotations

import base64
import html
import io
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctxrepro import viz
from ctxrepro.data.images import read_rgb
from ctxrepro.io import atomic_write_bytes, atomic_write_text
from ctxrepro.mining.constellations import MiningResult

QUERY_FRAME = (60, 110, 220)  # the query constellation's border, so it reads apart from its matches


class ImageCache:
    """Decoded images by path, the `size` most recently used kept (clusters revisit the same images)."""

    def __init__(self, size: int = 256):
        self.size = size
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, path: str) -> np.ndarray:
        if path in self._images:
            self._images.move_to_end(path)
            return self._images[path]
        image = read_rgb(path)
        self._images[path] = image
        if len(self._images) > self.size:
            self._images.popitem(last=False)
        return image


def constellation_box(centers: np.ndarray, sides: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the union of four patches (centres (4, 2), sides (4,)), clipped to the image."""
    half = np.asarray(sides, dtype=np.float64)[:, None] / 2
    lo = np.floor((np.asarray(centers) - half).min(axis=0))
    hi = np.ceil((np.asarray(centers) + half).max(axis=0))
    x0, y0 = max(0, int(lo[0])), max(0, int(lo[1]))
    x1, y1 = min(width, int(hi[0])), min(height, int(hi[1]))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _crop(result: MiningResult, image: int, patches: np.ndarray, tile: int, cache: ImageCache) -> np.ndarray:
    rgb = cache(result.bank.paths[image])
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = constellation_box(result.bank.centers[image, patches], result.bank.sides[image, patches], w, h)
    return viz.letterbox(rgb[y0:y1, x0:x1], tile)


def cluster_tiles(result: MiningResult, j: int, n_matches: int, tile: int, cache: ImageCache) -> list[np.ndarray]:
    """[query constellation (framed), then up to n_matches verified matches in score order]."""
    row = result.constellations[j]
    tiles = [viz.frame(_crop(result, int(row[0]), row[1:], tile, cache), QUERY_FRAME, 3)]
    cand = result.candidates
    for t in np.flatnonzero(result.verified[j])[:n_matches]:
        tiles.append(_crop(result, int(cand.images[j, t]), cand.patches[j, t], tile, cache))
    return tiles


def label_tile(lines: Sequence[str], tile: int) -> np.ndarray:
    """A white tile with `lines` of text centred on it (the rank beside each Figure 7 row)."""
    im = Image.new("RGB", (tile, tile), viz.WHITE)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(10, tile // 5))
    text = "\n".join(lines)
    box = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    xy = ((tile - (box[2] - box[0])) / 2 - box[0], (tile - (box[3] - box[1])) / 2 - box[1])
    draw.multiline_text(xy, text, fill=(0, 0, 0), font=font, align="center")
    return np.asarray(im)


def write_montages(out_dir: Path, result: MiningResult, clusters: Sequence[int], *, per_page: int,
                   n_matches: int, tile: int, title: str, cache: ImageCache | None = None) -> list[Path]:
    """Figure-7 pages `clusters_NN.png`: per row the cluster's rank and verified count, its query and
    its top verified matches. `clusters` are constellation indices in display order."""
    cache = cache or ImageCache()
    rank_of = np.empty(len(result.ranking), np.int64)
    rank_of[result.ranking] = np.arange(1, len(result.ranking) + 1)
    k = result.candidates.images.shape[1]
    written = []
    for page, start in enumerate(range(0, len(clusters), per_page), start=1):
        rows = []
        for j in clusters[start:start + per_page]:
            label = label_tile([f"#{rank_of[j]}", f"{int(result.verified[j].sum())}/{k}"], tile)
            tiles = cluster_tiles(result, j, n_matches, tile, cache)
            rows.append([label, *tiles, *[None] * (n_matches + 1 - len(tiles))])
        image = viz.grid(rows, tile, group_gaps=(1, 2))
        xs = viz.column_centres(n_matches + 2, tile, group_gaps=(1, 2))
        path = Path(out_dir) / f"clusters_{page:02d}.png"
        viz.save_annotated(path, image, f"{title} (page {page})",
                           labels=[(xs[0], "rank"), (xs[1], "query"),
                                   ((xs[2] + xs[-1]) / 2, f"top {n_matches} verified matches")])
        written.append(path)
    return written


def _data_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _row(result: MiningResult, rank: int, j: int, names: Sequence[str], strip: str) -> str:
    cons = result.constellations[j]
    ok = result.verified[j]
    strength = float(np.where(ok, result.candidates.scores[j], 0.0).sum())
    centre = result.bank.centers[cons[0], cons[1:]].mean(axis=0)
    side = float(result.bank.sides[cons[0], cons[1]])
    img = f'<img src="{strip}" alt="cluster {rank}">' if strip else ""
    return (f"<tr><td>{rank}</td><td>{int(ok.sum())}/{ok.size}</td><td>{strength:.2f}</td>"
            f"<td>{html.escape(names[cons[0]])}</td><td>({centre[0]:.0f}, {centre[1]:.0f})</td>"
            f"<td>{side:.0f}</td><td>{img}</td></tr>")


def write_ranking_html(path: Path, result: MiningResult, names: Sequence[str], *, thumbnails: int,
                       n_matches: int, tile: int, title: str, summary: dict, cache: ImageCache | None = None) -> None:
    """The whole ranking as one offline HTML page; the first `thumbnails` clusters carry their picture."""
    cache = cache or ImageCache()
    rows = []
    for rank, j in enumerate(result.ranking, start=1):
        strip = ""
        if rank <= thumbnails:
            tiles = cluster_tiles(result, int(j), n_matches, tile, cache)
            strip = _data_uri(np.concatenate(tiles, axis=1))
        rows.append(_row(result, rank, int(j), names, strip))
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:middle}} img{{display:block}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Constellations of four adjacent patches ranked by how many of their top matches verify geometrically
(paper section 4.5). Picture: the query constellation (blue frame), then its top verified matches.</p>
<ul>{facts}</ul>
<table><thead><tr><th>rank</th><th>verified</th><th>score</th><th>image</th><th>centre (x, y)</th>
<th>patch px</th><th>query and verified matches</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    atomic_write_text(path, page)


def plot_purity_coverage(path: Path, curve: Sequence[Sequence[float]], auc: float, auc_half: float,
                         label: str) -> None:
    """Figure 9: mean purity against coverage, AUC (and AUC up to coverage 0.5) in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = np.asarray(curve, dtype=np.float64).reshape(-1, 2)
    if len(pts):  # P_1 holds from coverage 0 to C_1
        pts = np.concatenate([[[0.0, pts[0, 1]]], pts])
    ax.plot(pts[:, 0], pts[:, 1], drawstyle="steps-pre", label=f"{label} {auc:.3f} ({auc_half:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage")
    ax.set_ylabel("purity")
    ax.legend(loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
