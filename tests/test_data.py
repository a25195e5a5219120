"""Data sets: the generated glyphs, bundled digits, image folders and offline errors."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cltool.data import GLYPH_CLASSES, ImageSet, load_dataset
from cltool.errors import CLToolError
from cltool.recipe import DataConfig

GLYPHS = DataConfig(dataset="glyphs", image_size=24, num_train=2000, num_test=500)


@pytest.fixture(scope="module")
def glyphs() -> ImageSet:
    return load_dataset(GLYPHS)


def test_glyphs_shapes_and_dtypes(glyphs: ImageSet) -> None:
    assert glyphs.train_x.shape == (2000, 1, 24, 24)
    assert glyphs.test_x.shape == (500, 1, 24, 24)
    assert glyphs.train_x.dtype == glyphs.test_x.dtype == torch.uint8
    assert glyphs.train_y.dtype == glyphs.test_y.dtype == torch.int64
    assert glyphs.num_classes == GLYPH_CLASSES == 10
    assert len(glyphs.mean) == len(glyphs.std) == 1
    expected_mean = glyphs.train_x.double().mean().item() / 255
    assert glyphs.mean[0] == pytest.approx(expected_mean, abs=1e-9)
    assert glyphs.std[0] == pytest.approx(glyphs.train_x.double().std().item() / 255, rel=1e-3)


def test_glyphs_every_class_in_both_splits(glyphs: ImageSet) -> None:
    assert set(glyphs.train_y.tolist()) == set(range(10))
    assert set(glyphs.test_y.tolist()) == set(range(10))


def test_glyphs_deterministic_per_seed(glyphs: ImageSet) -> None:
    again = load_dataset(GLYPHS)
    assert torch.equal(again.train_x, glyphs.train_x)
    assert torch.equal(again.test_y, glyphs.test_y)
    other = load_dataset(replace(GLYPHS, data_seed=1))
    assert not torch.equal(other.train_x, glyphs.train_x)


def test_glyphs_prefix_stable_across_sizes(glyphs: ImageSet) -> None:
    smaller = load_dataset(replace(GLYPHS, num_train=300, num_test=50))
    assert torch.equal(smaller.train_x, glyphs.train_x[:300])
    assert torch.equal(smaller.test_x, glyphs.test_x[:50])


def test_glyphs_train_and_test_are_different_draws(glyphs: ImageSet) -> None:
    train = glyphs.train_x.flatten(1).float()
    test = glyphs.test_x.flatten(1).float()
    closest = torch.cdist(test, train).min(dim=1).values
    assert (closest > 0).all()


def test_glyphs_defeat_raw_pixels_but_carry_signal(glyphs: ImageSet) -> None:
    """Cosine 1-NN on raw pixels: measured ~0.33-0.36 over seeds 0-3 (chance is 0.10)."""
    train = F.normalize(glyphs.train_x.flatten(1).float(), dim=1)
    test = F.normalize(glyphs.test_x.flatten(1).float(), dim=1)
    predicted = glyphs.train_y[(test @ train.T).argmax(dim=1)]
    accuracy = (predicted == glyphs.test_y).float().mean().item()
    print(f"raw-pixel cosine 1-NN accuracy on glyphs: {accuracy:.3f}")
    assert 0.2 < accuracy < 0.5


def test_glyphs_resized_natively() -> None:
    data = load_dataset(replace(GLYPHS, image_size=32, num_train=64, num_test=16))
    assert data.train_x.shape == (64, 1, 32, 32)


def test_digits_shapes_labels_and_caps() -> None:
    full = load_dataset(DataConfig(dataset="digits", image_size=16, num_train=0, num_test=0))
    assert full.train_x.shape == (1438, 1, 16, 16)
    assert full.test_x.shape == (359, 1, 16, 16)
    assert full.num_classes == 10
    assert set(full.test_y.tolist()) == set(range(10))
    assert full.train_x.max() > 200  # 0..16 was scaled up to 0..255
    capped = load_dataset(DataConfig(dataset="digits", image_size=16, num_train=100, num_test=30))
    assert len(capped.train_y) == 100 and len(capped.test_y) == 30
    again = load_dataset(DataConfig(dataset="digits", image_size=16, num_train=100, num_test=30))
    assert torch.equal(capped.train_x, again.train_x)


def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(0, 20, (20, 30, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def test_imagefolder_splits_80_20(tmp_path: Path) -> None:
    for label, name in enumerate(["cat", "dog"]):
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", 40 + 150 * label)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=12)
    data = load_dataset(cfg)
    assert data.train_x.shape == (16, 3, 12, 12) and data.test_x.shape == (4, 3, 12, 12)
    assert data.num_classes == 2
    bright = data.train_x.float().mean(dim=(1, 2, 3)) > 120
    assert torch.equal(bright, data.train_y == 1)  # labels follow the sorted folder names
    assert len(data.mean) == 3


def test_imagefolder_uses_train_and_test_folders(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("test", 2)):
        for name in ("a", "b", "c"):
            for i in range(count):
                _write_png(tmp_path / split / name / f"{i}.png", 10 * i)
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert len(data.train_y) == 9 and len(data.test_y) == 6
    assert data.num_classes == 3


def test_imagefolder_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CLToolError, match="nowhere"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(missing)))


def test_imagefolder_without_images_names_it(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(CLToolError, match=str(tmp_path)):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_cifar10_missing_without_download_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "cifar-home"
    with pytest.raises(CLToolError) as caught:
        load_dataset(DataConfig(dataset="cifar10", root=str(root), download=False))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cifar10: not found under {root}/")
    assert "data.download = true" in message
    assert "cifar-10-python.tar.gz" in message and f"{root}/cifar-10-batches-py/" in message
    assert not root.exists()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name resolution fails as it does offline, on torchvision's real download path.

    Made to fail on purpose so a machine with network does not fetch 170 MB.
    """

    def no_name(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)


@pytest.mark.usefixtures("offline")
def test_cifar10_failed_download_is_one_line_naming_the_archive_and_folder(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data" / "cifar-home"
    with pytest.raises(CLToolError) as caught:
        load_dataset(DataConfig(dataset="cifar10", root=str(root), download=True))
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    assert message.startswith(f"cifar10: not found under {root}/ and the download failed")
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"put it in {root}/" in message and f"{root}/cifar-10-batches-py/" in message
    assert "data.root" in message
    assert list(tmp_path.iterdir()) == []  # neither data/ nor data/cifar-home/ is left


@pytest.mark.usefixtures("offline")
def test_failed_download_into_an_existing_folder_keeps_only_what_was_there(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CLToolError):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), download=True))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
