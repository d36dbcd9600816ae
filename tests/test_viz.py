"""Tests for ctxrepro.viz: tile geometry, montages, patch pasting, confusion plots and CSVs (Figures 4 and 5)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro import viz


def solid(h, w, colour):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = colour
    return img


def test_to_hwc_accepts_chw_tensors_and_hwc_arrays():
    chw = torch.arange(3 * 2 * 4, dtype=torch.uint8).view(3, 2, 4)
    out = viz.to_hwc(chw)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    assert out[1, 2, 0] == chw[0, 1, 2] and out[1, 2, 2] == chw[2, 1, 2]
    hwc = np.full((5, 6, 3), 7, np.uint8)
    assert np.array_equal(viz.to_hwc(hwc), hwc)
    with pytest.raises(ValueError, match="3-D"):
        viz.to_hwc(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="3 channels"):
        viz.to_hwc(np.zeros((4, 4, 2)))


def test_letterbox_keeps_aspect_and_centres():
    # 10 x 20 (h x w) red image into a 40 px tile: scale 2 -> 20 x 40, rows 10..29 red, others white
    tile = viz.letterbox(solid(10, 20, (255, 0, 0)), 40)
    assert tile.shape == (40, 40, 3)
    red = np.all(tile == (255, 0, 0), axis=2)
    assert red[10:30].all() and not red[:10].any() and not red[30:].any()
    assert np.all(tile[:10] == 255)


def test_frame_draws_only_the_border():
    t = viz.frame(solid(8, 8, (0, 0, 0)), (1, 2, 3), width=2)
    border = np.ones((8, 8), bool)
    border[2:6, 2:6] = False
    assert np.all(t[border] == (1, 2, 3)) and np.all(t[~border] == 0)


def test_grid_places_tiles_with_group_gaps_and_column_centres_agree():
    tiles = [[solid(4, 4, (10 * (r * 3 + c + 1),) * 3) for c in range(3)] for r in range(2)]
    out = viz.grid(tiles, 4, pad=1, group_gaps=[1], gap=5)
    # width: pad + 3 tiles * (4 + pad) + one gap of 5 = 1 + 15 + 5 = 21; height 1 + 2 * 5 = 11
    assert out.shape == (11, 21, 3)
    # column 0 at x=1, column 1 at x = 1 + 5 + 5 = 11, column 2 at x = 16; row 1 at y = 6
    assert out[1, 1, 0] == 10 and out[1, 11, 0] == 20 and out[1, 16, 0] == 30 and out[6, 16, 0] == 60
    assert np.all(out[:, 6:11] == 255)  # the gap before column 1 (plus its pad) is empty
    centres = viz.column_centres(3, 4, pad=1, group_gaps=[1], gap=5)
    assert centres == [3.0, 13.0, 18.0]
    with pytest.raises(ValueError, match="shape"):
        viz.grid([[solid(3, 3, (0, 0, 0))]], 4)


def test_paste_patches_centres_and_clips():
    patch = solid(4, 4, (9, 9, 9))
    # centre (0.5, 0.25) on a 20 x 40 (h x w) canvas -> top-left (x=18, y=3)
    canvas = viz.paste_patches(20, 40, [patch], np.array([[0.5, 0.25]]))
    filled = np.argwhere(np.all(canvas == 9, axis=2))
    assert filled.min(0).tolist() == [3, 18] and filled.max(0).tolist() == [6, 21]
    # a patch centred on the corner keeps only its inner quarter; scale 0.5 halves its side
    corner = viz.paste_patches(10, 10, [patch], np.array([[0.0, 0.0]]))
    assert np.all(np.all(corner == 9, axis=2) == np.pad(np.ones((2, 2), bool), ((0, 8), (0, 8))))
    half = viz.paste_patches(10, 10, [patch], np.array([[0.5, 0.5]]), scale=0.5)
    assert np.all(half == 9, axis=2).sum() == 4


def test_plot_confusion_and_annotated_png(tmp_path):
    counts = np.array([[3, 1], [0, 2]])
    viz.plot_confusion(tmp_path / "c.png", counts, ["a", "b"], "t")
    assert Image.open(tmp_path / "c.png").size == (520, 480)
    with pytest.raises(ValueError, match="labels"):
        viz.plot_confusion(tmp_path / "bad.png", counts, ["a", "b", "c"])
    viz.save_annotated(tmp_path / "a.png", solid(30, 50, (0, 0, 0)), "title", [(25, "col")], header_px=40,
                       footer="f")
    assert Image.open(tmp_path / "a.png").size == (50, 30 + 40 + 22)


def test_write_csv_exact_text_and_field_check(tmp_path):
    viz.write_csv(tmp_path / "x.csv", ["a", "b"], [[1, "p"], [2, "q,r"]])
    assert (tmp_path / "x.csv").read_text() == 'a,b\n1,p\n2,"q,r"\n'
    with pytest.raises(ValueError, match="2 fields"):
        viz.write_csv(tmp_path / "y.csv", ["a", "b", "c"], [[1, 2]])
    assert not (tmp_path / "y.csv").exists()


def test_save_png_roundtrip(tmp_path):
    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    viz.save_png(tmp_path / "p.png", img)
    back = np.asarray(Image.open(tmp_path / "p.png"))
    assert np.array_equal(back, img.permute(1, 2, 0).numpy())
