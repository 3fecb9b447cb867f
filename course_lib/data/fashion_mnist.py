"""Fashion-MNIST (Xiao et al. 2017): 70,000 grey 28x28 garments in ten classes, MIT licensed.

Sources, in order: the folder in $COURSE_DATA_DIR, Debian's package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist/), then torchvision's download (needs internet; never used
by the tests). Files are the original IDX .gz files, read with gzip + numpy. A COURSE_DATA_DIR
that is set is used or is an error (never silently passed over); `source(split)` and the
logger `course_lib.data.fashion_mnist` say which folder was read.
Used by lessons 01-05.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SIZES = {"train": 60000, "test": 10000}
log = logging.getLogger(__name__)


class FashionMNIST(NamedTuple):
    images: torch.Tensor   # (N, 1, 28, 28) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64 in 0..9
    class_names: tuple


class DatasetNotFoundError(FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:   # not gzip, truncated, a folder, unreadable
        raise ValueError(f"{path} is not a readable .gz file ({e}); is it damaged? Delete it and get it again") from e
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if len(data) < 4 or magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    need = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if len(data) != need:
        raise ValueError(f"{path} holds {len(data)} bytes, but its IDX header {dims} needs {need}; is it damaged?")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _folders():
    env = os.environ.get("COURSE_DATA_DIR")
    if env:   # set: the data comes from there (or is downloaded there), never silently from elsewhere
        yield Path(env)
        yield Path(env) / "fashion-mnist"
        yield Path(env) / "FashionMNIST" / "raw"
    else:
        yield DEBIAN_DIR


def _find(split: str):
    for folder in _folders():
        paths = [folder / name for name in FILES[split]]
        if all(p.exists() for p in paths):
            return paths
    return None


def source(split: str = "train") -> Path | None:
    """The folder load(split) reads (None: no source holds the files, so load would try torchvision)."""
    paths = _find(split)
    return None if paths is None else paths[0].parent


def _torchvision(split: str, root: Path):
    from torchvision.datasets import FashionMNIST as TV
    ds = TV(root=str(root), train=(split == "train"), download=True)
    return ds.data.numpy(), ds.targets.numpy()


def _new_folders(root: Path) -> list:
    """The folders a download into root would create (root and its subfolders that do not exist yet)."""
    folders = [root, root / "FashionMNIST", root / "FashionMNIST" / "raw"]
    return [f for f in folders if not f.exists()]


def _remove_empty(folders) -> None:
    for folder in reversed(folders):   # deepest first
        try:
            folder.rmdir()             # only if empty: never a file that was already there
        except OSError:
            pass


def load(split: str = "train", *, download: bool = True, limit: int | None = None) -> FashionMNIST:
    """Fashion-MNIST `split` ("train" or "test") as tensors in [-1, 1], shape (N, 1, 28, 28).

    download: allow torchvision's download as the last resort (needs internet).
    limit: keep only the first `limit` examples.
    """
    if not isinstance(split, str) or split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit must be None (all) or an integer >= 0, got {limit!r}")
    paths = _find(split)
    if paths is not None:
        log.info("Fashion-MNIST %s from %s", split, paths[0].parent)
        images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    else:
        cache = Path(os.environ.get("COURSE_DATA_DIR") or Path.home() / ".cache" / "course_lib")
        error = None
        if download:
            created = _new_folders(cache)
            try:
                images, labels = _torchvision(split, cache)
                log.info("Fashion-MNIST %s downloaded by torchvision into %s", split, cache)
            except Exception as e:  # no internet, no torchvision: fall through to the message
                error = e
                _remove_empty(created)   # a failed download leaves no empty folders behind
        env = os.environ.get("COURSE_DATA_DIR")
        if env and not download:
            raise DatasetNotFoundError(
                f"COURSE_DATA_DIR={env} holds no Fashion-MNIST {split} files ({', '.join(FILES[split])}; looked in "
                f"{env}, {env}/fashion-mnist and {env}/FashionMNIST/raw). Put them there, allow torchvision to "
                "download them there (load(split, download=True)), or unset COURSE_DATA_DIR to use the other sources.")
        if not download or error is not None:
            raise DatasetNotFoundError(
                "Fashion-MNIST was not found. Get it one of three ways:\n"
                "  1. set COURSE_DATA_DIR to a folder holding the four IDX .gz files "
                f"({', '.join(FILES['train'] + FILES['test'])});\n"
                "  2. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                f"(installs them in {DEBIAN_DIR});\n"
                "  3. with internet: torchvision downloads them (load(split, download=True))."
                + (f"\nThe download failed with: {error!r}" if error is not None else ""))
    if images.shape[0] != SIZES[split] or images.shape[1:] != (28, 28) or labels.shape != (SIZES[split],):
        raise ValueError(f"Fashion-MNIST {split} files have unexpected shapes "
                         f"{images.shape}, {labels.shape}; are they damaged?")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return FashionMNIST(x, torch.from_numpy(labels.astype(np.int64)), CLASS_NAMES)
