"""NYU Depth v2 (labeled subset) and its surface-normal ground truth, read in their published formats.

Used for the surface-normal transfer experiment (paper section 4.4, Table 2). docs/DATA.md "Layouts":
- `nyu_depth_v2_labeled.mat` is MATLAB v7.3 = HDF5; h5py shows MATLAB's shapes reversed: `images`
  (1449, 3, 640, 480), `depths` / `rawDepths` (1449, 640, 480). Swapping the last two axes gives
  H x W = 480 x 640. Depths are metres; `rawDepths` is 0 where the sensor read nothing.
- `splits.mat` is an older (v5) .mat with 1-based `trainNdxs` (795) and `testNdxs` (654).
- The FAIR normals `all_normals.pklz` is a gzip pickle holding the whole set at once.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

LABELED_NAME = "nyu_depth_v2_labeled.mat"
SHAPE_HW = (480, 640)


class NyuLabeled:
    """Lazy reader of nyu_depth_v2_labeled.mat: the file opens once (per process) and each call reads
    one image, so memory stays at one frame however many are read.

    The handle is reopened after a fork (DataLoader workers), since HDF5 handles must not be shared.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._pid = None
        missing = [k for k in ("images", "depths", "rawDepths") if k not in self._h5()]
        if missing:
            raise KeyError(f"{self.path}: no dataset {', '.join(missing)} (not nyu_depth_v2_labeled.mat?)")
        n = self._h5()["images"].shape
        if len(n) != 4 or n[1:] != (3, SHAPE_HW[1], SHAPE_HW[0]):
            raise ValueError(f"{self.path}: 'images' has shape {n}, expected (N, 3, 640, 480) as h5py shows it")

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return int(self._h5()["images"].shape[0])

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: image {i} out of range (0..{n - 1})")
        return i % n

    def image(self, i: int) -> np.ndarray:
        """RGB image i (0-based) as (480, 640, 3) uint8."""
        raw = self._h5()["images"][self._index(i)]  # (3, 640, 480): channel, x, y
        return np.ascontiguousarray(raw.transpose(2, 1, 0), dtype=np.uint8)

    def _plane(self, name: str, i: int) -> np.ndarray:
        raw = self._h5()[name][self._index(i)]  # (640, 480): x, y
        return np.ascontiguousarray(raw.T, dtype=np.float32)

    def depth(self, i: int) -> np.ndarray:
        """In-painted depth of image i in metres, (480, 640) float32."""
        return self._plane("depths", i)

    def raw_depth(self, i: int) -> np.ndarray:
        """Sensor depth of image i in metres, (480, 640) float32; 0 where the sensor read nothing."""
        return self._plane("rawDepths", i)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> "NyuLabeled":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_images(path: Path) -> int:
    with NyuLabeled(path) as nyu:
        return len(nyu)


def read_splits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) 0-based int64 index arrays from splits.mat (stored 1-based, as MATLAB indexes)."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    out = []
    for key in ("trainNdxs", "testNdxs"):
        if key not in mat:
            raise KeyError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
        idx = np.asarray(mat[key]).astype(np.int64).ravel()
        if idx.size and idx.min() < 1:
            raise ValueError(f"{path}: {key} holds {idx.min()}, but MATLAB indices start at 1")
        out.append(idx - 1)
    if np.intersect1d(out[0], out[1]).size:
        raise ValueError(f"{path}: trainNdxs and testNdxs overlap")
    return out[0], out[1]


NORMALS_MEMBER = "surfacenormal_metadata/all_normals.pklz"
NORMALS_KEYS = ("all_normals", "all_valid_depth_masks", "all_filenames")
# What unpickling may construct: numpy arrays and dtypes (old and new module paths), nothing else,
# so a tampered pickle cannot run code.
_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
_ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
             ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}  # bytes in protocol-2 pickles


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a normals pickle")
        return super().find_class(module, name)


def load_normals(path: Path) -> dict[str, np.ndarray]:
    """The FAIR normals ground truth from `all_normals.pklz` or from the zip that holds it.

    Memory: a pickle cannot be read in parts, so this holds the whole set: `all_normals` alone is
    1449 x 480 x 640 x 3 values (5.3 GB as float32, 10.7 GB as float64), and unpickling briefly needs
    about twice that. Call it once, in the stage that needs normals, and keep the result (or save the
    arrays with np.save and reopen them with mmap_mode="r" for a flat footprint).
    """
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf, zf.open(NORMALS_MEMBER) as member:
            return _unpickle(member, path)
    with open(path, "rb") as f:
        return _unpickle(f, path)


def _unpickle(raw, origin: Path) -> dict[str, np.ndarray]:
    with gzip.GzipFile(fileobj=raw) as gz:
        # latin1: the file may come from Python 2, whose pickled numpy buffers are byte strings.
        data = _NumpyOnlyUnpickler(gz, encoding="latin1").load()
    if not isinstance(data, dict) or not all(k in data for k in NORMALS_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise KeyError(f"{origin}: expected a dict with {', '.join(NORMALS_KEYS)}, found {found}")
    normals = np.asarray(data["all_normals"])
    if normals.ndim != 4 or normals.shape[1:] != (*SHAPE_HW, 3):
        raise ValueError(f"{origin}: all_normals has shape {normals.shape}, expected (N, 480, 640, 3)")
    return {"all_normals": normals, "all_valid_depth_masks": np.asarray(data["all_valid_depth_masks"]),
            "all_filenames": np.asarray(data["all_filenames"])}
