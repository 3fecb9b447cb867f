"""The Fashion-MNIST loader: the Debian copy, COURSE_DATA_DIR, and the error that names every way
to get the data. Nothing is downloaded: torchvision's download is replaced where it could run."""
import gzip

import numpy as np
import pytest
import torch

from course_lib.data import fashion_mnist

DEBIAN_DIR = fashion_mnist.DEBIAN_DIR  # the real one, before any test replaces it


def _write_idx(path, array):
    """An IDX file: magic 0x0000 08 ndim (unsigned bytes), the dims as big-endian int32, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_test_split(folder, n=10000, pixel=255, label=3):
    folder.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = fashion_mnist.FILES["test"]
    _write_idx(folder / images_name, np.full((n, 28, 28), pixel))
    _write_idx(folder / labels_name, np.full((n,), label))


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """No COURSE_DATA_DIR, an empty Debian folder, and a torchvision that must not be reached."""
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "empty")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline(split, root):
        raise RuntimeError("no internet in tests")

    monkeypatch.setattr(fashion_mnist, "_torchvision", offline)
    return tmp_path


debian = pytest.mark.skipif(not (DEBIAN_DIR / fashion_mnist.FILES["test"][0]).exists(),
                            reason="needs the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


@debian
def test_load_test_split(monkeypatch):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    d = fashion_mnist.load("test")
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.images.min() == -1.0 and d.images.max() == 1.0
    assert d.labels.shape == (10000,) and d.labels.dtype == torch.int64
    assert torch.equal(d.labels.unique(), torch.arange(10))
    assert torch.equal(torch.bincount(d.labels), torch.full((10,), 1000))  # the test set is balanced
    assert d.class_names == fashion_mnist.CLASS_NAMES and len(d.class_names) == 10
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    # pixel values are k / 127.5 - 1 for bytes k: 256 levels
    levels = (d.images[:100] + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


@debian
def test_limit(monkeypatch):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    d = fashion_mnist.load("test", limit=5)
    assert d.images.shape == (5, 1, 28, 28) and d.labels.shape == (5,)
    assert torch.equal(d.images, fashion_mnist.load("test").images[:5])


@pytest.mark.parametrize("sub", [".", "fashion-mnist", "FashionMNIST/raw"])
def test_course_data_dir_comes_first(no_sources, monkeypatch, sub):
    root = no_sources / "mine"
    _fake_test_split(root / sub)
    monkeypatch.setenv("COURSE_DATA_DIR", str(root))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", DEBIAN_DIR)  # present or not, ours must win
    d = fashion_mnist.load("test", download=False)
    assert d.images.shape == (10000, 1, 28, 28)
    assert bool((d.images == 1.0).all()) and bool((d.labels == 3).all())  # ours, not Debian's


def test_missing_dataset_names_all_three_ways(no_sources):
    with pytest.raises(fashion_mnist.DatasetNotFoundError) as info:
        fashion_mnist.load("test", download=False)
    message = str(info.value)
    assert "COURSE_DATA_DIR" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "torchvision" in message
    assert "t10k-images-idx3-ubyte.gz" in message
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_is_reported(no_sources):
    with pytest.raises(fashion_mnist.DatasetNotFoundError, match="(?s)COURSE_DATA_DIR.*no internet in tests"):
        fashion_mnist.load("train", download=True)


def test_wrong_sizes_are_an_error(no_sources, monkeypatch):
    _fake_test_split(no_sources / "small", n=100)
    monkeypatch.setenv("COURSE_DATA_DIR", str(no_sources / "small"))
    with pytest.raises(ValueError, match="unexpected shapes"):
        fashion_mnist.load("test", download=False)


def test_not_an_idx_file(no_sources, monkeypatch):
    folder = no_sources / "bad"
    _fake_test_split(folder, n=10000)
    with gzip.open(folder / fashion_mnist.FILES["test"][0], "wb") as f:
        f.write(bytes([0, 0, 0x0D, 3]) + b"\0" * 12)  # 0x0D: float, not unsigned bytes
    monkeypatch.setenv("COURSE_DATA_DIR", str(folder))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        fashion_mnist.load("test", download=False)


@pytest.mark.parametrize("split", ["val", "Train", ""])
def test_bad_split(split):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fashion_mnist.load(split)
