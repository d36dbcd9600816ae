"""NYU Depth v2 layout: nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5), splits.mat (v5), and the FAIR
self-supervision benchmark's surface normal zip (paper section 4.2, Table 2; docs/DATA.md).

h5py shows MATLAB arrays with their axes reversed, so an H x W x 3 x N MATLAB `images` reads as
(N, 3, 640, 480): the writer stores each frame transposed, exactly as the real file reads.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.io

from ctxrepro.io import atomic_write_bytes
from ctxrepro.world.archives import atomic_path, gzip_bytes, write_zip
from ctxrepro.world.rooms import LABEL_NAMES, render_room
from ctxrepro.world.spec import NYU, NYU_HEIGHT, NYU_WIDTH, WorldSpec, stream

LABELED_MAT, SPLITS_MAT, NORMALS_ZIP = "nyu_depth_v2_labeled.mat", "splits.mat", "nyuv2_surfacenormal_metadata.zip"
_DATE = "Tue Nov  6 00:00:00 2007"  # fixed "Created on" so the .mat headers are reproducible


def mat73_header() -> bytes:
    """The 512-byte MATLAB v7.3 user block: text, subsystem offset, version 0x0200, endian 'IM'."""
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {_DATE} HDF5 schema 1.00 ."
    head = text.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    return head.ljust(512, b"\x00")


def _matlab_class(obj, name: str) -> None:
    obj.attrs.create("MATLAB_class", np.bytes_(name))


def _cellstr(f: h5py.File, key: str, strings: list) -> None:
    """A MATLAB cell array of char row vectors (N x 1 in MATLAB, (1, N) in h5py) as v7.3 stores it."""
    refs = f.require_group("#refs#")
    ds = f.create_dataset(key, (1, len(strings)), dtype=h5py.ref_dtype, track_times=False)
    for j, s in enumerate(strings):
        item = refs.create_dataset(f"{key}_{j}", data=np.array([[ord(c)] for c in s], np.uint16), track_times=False)
        _matlab_class(item, "char")
        item.attrs.create("MATLAB_int_decode", np.int32(2))
        ds[0, j] = item.ref
    _matlab_class(ds, "cell")


_DATASETS = (("images", (3, NYU_WIDTH, NYU_HEIGHT), np.uint8, "uint8"),
             ("depths", (NYU_WIDTH, NYU_HEIGHT), np.float32, "single"),
             ("rawDepths", (NYU_WIDTH, NYU_HEIGHT), np.float32, "single"),
             ("labels", (NYU_WIDTH, NYU_HEIGHT), np.uint16, "uint16"))


def _write_labeled(path: Path, rooms: Iterator) -> tuple:
    """nyu_depth_v2_labeled.mat (images, depths, rawDepths, labels, names, scenes, sceneTypes), written
    frame by frame as `rooms` renders; returns (normals, valid masks, scene types) for the normals zip."""
    normals, valid, scene_types = [], [], []
    gz = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "track_times": False}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=512, libver="earliest") as f:
            n = len(rooms)
            for key, shape, dtype, mclass in _DATASETS:
                _matlab_class(f.create_dataset(key, (n, *shape), dtype=dtype, chunks=(1, *shape), **gz), mclass)
            for i, room in enumerate(rooms):
                f["images"][i] = room.image.transpose(2, 1, 0)
                f["depths"][i] = room.depth.T
                f["rawDepths"][i] = room.raw_depth.T
                f["labels"][i] = room.labels.T
                normals.append(room.normals)
                valid.append(room.raw_depth > 0)
                scene_types.append(room.scene_type)
            _cellstr(f, "names", list(LABEL_NAMES))
            _cellstr(f, "scenes", [f"{s}_{i + 1:04d}" for i, s in enumerate(scene_types)])
            _cellstr(f, "sceneTypes", scene_types)
        with open(tmp, "r+b") as raw:
            raw.write(mat73_header())
    return np.stack(normals), np.stack(valid), scene_types


def _savemat_bytes(mdict: dict) -> bytes:
    """A v5 .mat in memory with a fixed header date (scipy writes the current time there)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, mdict, format="5", oned_as="column")
    data = bytearray(buf.getvalue())
    text = f"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: {_DATE}".encode("ascii").ljust(116, b" ")
    data[:116] = text
    return bytes(data)


def fibonacci_directions(k: int) -> np.ndarray:
    """k unit vectors spread over the hemisphere facing the camera (z < 0 in the camera frame)."""
    i = np.arange(k) + 0.5
    z = -i / k
    r = np.sqrt(1.0 - z ** 2)
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def normal_codebook(normals: np.ndarray, k: int = 40, iters: int = 10) -> np.ndarray:
    """Spherical k-means of sampled normals (as vocab40.mat holds), seeded on a Fibonacci hemisphere;
    a cluster left empty keeps its seed direction, so the codebook always has k unit rows."""
    centres = fibonacci_directions(k)
    for _ in range(iters):
        assign = np.argmax(normals @ centres.T, axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, normals)
        norms = np.linalg.norm(sums, axis=1)
        full = norms > 0
        centres[full] = sums[full] / norms[full, None]
    return centres


def _vocab_mat(codebook: np.ndarray) -> bytes:
    """vocab40.mat as the benchmark's readers index it: loadmat(f)['vocabs'][0][0]['normals'][0][0]."""
    struct = np.empty((1, 1), dtype=[("normals", object)])
    struct[0, 0]["normals"] = codebook.astype(np.float64)
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = struct
    return _savemat_bytes({"vocabs": cell})


def _split_json(indices: np.ndarray) -> bytes:
    """train_SN40.json / test_SN40.json: records like the benchmark's, keyed by the 1-based NYU index."""
    records = [{"img": f"{i:06d}_rgb.jpg", "segm": f"{i:06d}_SN40.png", "height": NYU_HEIGHT, "width": NYU_WIDTH}
               for i in indices]
    return json.dumps(records, indent=1).encode()


def _write_normals_zip(path: Path, normals: np.ndarray, valid: np.ndarray, train: np.ndarray, test: np.ndarray,
                       rng: np.random.Generator) -> None:
    payload = {"all_normals": normals, "all_valid_depth_masks": valid,
               "all_filenames": [f"{i:06d}" for i in range(1, len(normals) + 1)]}
    pklz = gzip_bytes(pickle.dumps(payload, protocol=4), level=1)
    # the codebook from a sample of valid training pixels (the benchmark clustered training normals)
    pool = np.concatenate([normals[i - 1][valid[i - 1]] for i in train])
    sample = pool[rng.choice(len(pool), size=min(len(pool), 50000), replace=False)].astype(np.float64)
    folder = "surfacenormal_metadata/"
    write_zip(path, [
        (folder, b"", False),
        (folder + "all_normals.pklz", pklz, False),
        (folder + "test_SN40.json", _split_json(test), True),
        (folder + "train_SN40.json", _split_json(train), True),
        (folder + "vocab40.mat", _vocab_mat(normal_codebook(sample)), True),
    ])


class _Rooms:
    """The rooms of the world, rendered lazily in index order (only one frame is held at a time)."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return (render_room(stream(self.seed, NYU, 1, i)) for i in range(self.n))


def write_nyu(out_dir: Path, spec: WorldSpec, seed: int) -> dict:
    """Render the rooms and write the three NYUv2 files; returns summary counts."""
    perm = stream(seed, NYU, 0).permutation(spec.nyu_images) + 1  # 1-based, as MATLAB indexes
    train, test = np.sort(perm[: spec.nyu_train]), np.sort(perm[spec.nyu_train:])
    normals, valid, _ = _write_labeled(out_dir / LABELED_MAT, _Rooms(seed, spec.nyu_images))
    atomic_write_bytes(out_dir / SPLITS_MAT, _savemat_bytes({
        "trainNdxs": train.astype(np.float64).reshape(-1, 1), "testNdxs": test.astype(np.float64).reshape(-1, 1)}))
    _write_normals_zip(out_dir / NORMALS_ZIP, normals, valid, train, test, stream(seed, NYU, 2))
    return {"images": spec.nyu_images, "train": int(train.size), "test": int(test.size),
            "raw_depth_hole_fraction": round(float(1.0 - valid.mean()), 4)}
