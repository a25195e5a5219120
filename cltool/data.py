"""Data sets, loaded whole into memory as uint8 tensors.

Every data set comes back as one :class:`ImageSet`: square uint8 images of ``data.image_size``
with int64 labels, split into train and test, plus the per-channel mean and std that
normalisation needs. Holding everything in memory keeps the trainer's input pipeline a plain
tensor index (the augmentations run batched on tensors, see :mod:`cltool.augment`), and the
small sets this tool is built around fit easily. Nothing is cached on disk: the only files ever
written are those torchvision downloads.

``glyphs``, the default, is generated here from a seed and needs neither network nor files; it
is built so that raw pixels classify it poorly while a small CNN does well, so a run on it shows
whether contrastive pre-training learned anything beyond pixel overlap.
"""

from __future__ import annotations

import math
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cltool.errors import InputError
from cltool.recipe import DataConfig


@dataclass(frozen=True)
class ImageSet:
    """An in-memory labelled image set split into train and test."""

    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of train_x / 255, for normalisation
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])


def load_dataset(cfg: DataConfig) -> ImageSet:
    """Load ``cfg.dataset`` resized to ``cfg.image_size`` and capped to num_train / num_test."""
    loaders: dict[str, Callable[[DataConfig], _Splits]] = {
        "glyphs": _load_glyphs,
        "digits": _load_digits,
        "cifar10": _load_torchvision,
        "cifar100": _load_torchvision,
        "stl10": _load_torchvision,
        "imagefolder": _load_imagefolder,
    }
    if cfg.dataset not in loaders:
        raise InputError(
            f"data.dataset = {cfg.dataset!r} is unknown: choose one of {', '.join(loaders)}"
        )
    train_x, train_y, test_x, test_y, num_classes = loaders[cfg.dataset](cfg)
    train_x, train_y = _subsample(train_x, train_y, cfg.num_train, cfg.data_seed, salt=0)
    test_x, test_y = _subsample(test_x, test_y, cfg.num_test, cfg.data_seed, salt=1)
    train_x = resize(train_x, cfg.image_size)
    test_x = resize(test_x, cfg.image_size)
    mean, std = channel_stats(train_x)
    return ImageSet(cfg.dataset, train_x, train_y, test_x, test_y, num_classes, mean, std)


# --------------------------------------------------------------------------------------------
# Shared helpers


class _Splits(NamedTuple):
    """What a loader returns: both splits at their native size, before capping and resizing."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def _subsample(
    x: torch.Tensor, y: torch.Tensor, cap: int, seed: int, salt: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a seeded random ``cap`` of the images (all when cap is 0 or not smaller).

    The kept indices are sorted so a subsample keeps the source order, which makes runs on the
    same seed but different caps easy to compare by eye.
    """
    if cap == 0 or cap >= len(y):
        return x, y
    rng = np.random.default_rng([_unsigned(seed), salt])
    keep = torch.from_numpy(np.sort(rng.permutation(len(y))[:cap]))
    return x[keep], y[keep]


def _unsigned(seed: int) -> int:
    """numpy seeds must be non-negative; wrap a negative ``data_seed`` onto 64 bits."""
    return seed % 2**64


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinearly resize uint8 ``[N, C, H, W]`` to ``[N, C, size, size]``.

    Anti-aliased when shrinking so downsampled STL-10 or photos do not alias; done in chunks so
    a 50k-image set never needs a full float copy in memory.
    """
    if images.shape[-2:] == (size, size):
        return images
    shrinking = min(images.shape[-2:]) > size
    out = []
    for part in images.split(chunk):
        scaled = F.interpolate(
            part.float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=shrinking,
        )
        out.append(scaled.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``images / 255`` from 256-bin histograms.

    Histograms avoid a float copy of the whole set. The std is floored at 1/255 so a set of
    flat images cannot make normalisation divide by zero.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * levels).sum())
        var = float((p * (levels - mean) ** 2).sum())
        means.append(mean)
        stds.append(max(math.sqrt(var), 1 / 255))
    return tuple(means), tuple(stds)


def _seeded_split(n: int, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """Deterministic train / test index split for sets that ship without one."""
    order = np.random.default_rng(_unsigned(seed)).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


# --------------------------------------------------------------------------------------------
# glyphs: procedurally generated, no files

#: Strokes of each class as line segments ``(x0, y0, x1, y1)`` in a [-1, 1] box (y up). The
#: shapes stay distinct under any rotation and mirror image, because both are nuisances here.
GLYPH_STROKES: tuple[tuple[tuple[float, float, float, float], ...], ...] = (
    ((-0.5, 1, -0.5, -1), (-0.5, -1, 0.6, -1)),  # L
    ((-0.8, 1, 0.8, 1), (0, 1, 0, -1)),  # T
    ((-0.5, -1, -0.5, 1), (-0.5, 1, 0.7, 1), (-0.5, 0.1, 0.4, 0.1)),  # F
    ((-0.5, -1, -0.5, 1), (-0.5, 1, 0.7, 1), (-0.5, 0, 0.4, 0), (-0.5, -1, 0.7, -1)),  # E
    ((-0.6, -1, -0.6, 1), (0.6, -1, 0.6, 1), (-0.6, 0, 0.6, 0)),  # H
    ((-0.8, -1, 0.8, 1), (-0.8, 1, 0.8, -1)),  # X
    ((-0.7, 1, 0.7, 1), (0.7, 1, -0.7, -1), (-0.7, -1, 0.7, -1)),  # Z
    ((-0.9, -0.7, 0.9, -0.7), (0.9, -0.7, 0, 0.9), (0, 0.9, -0.9, -0.7)),  # triangle
    ((0, -1, 0, 1), (0, 1, -0.55, 0.4), (0, 1, 0.55, 0.4)),  # arrow
    ((0.3, -1, 0.3, 1), (0.3, 1, -0.7, -0.2), (-0.7, -0.2, 0.8, -0.2)),  # 4-like
)
GLYPH_CLASSES = len(GLYPH_STROKES)
#: Size of a glyphs split when num_train / num_test is 0 ("all"): the set is unbounded.
GLYPHS_ALL = (10000, 2000)
#: Images generated per random stream; fixes memory use and makes a split prefix-stable.
_GLYPH_CHUNK = 1024


def _glyph_segments() -> np.ndarray:
    """All classes' strokes padded to one count, ``[classes, segments, 2 ends, 2 coords]``.

    Padding repeats a class's first stroke: a duplicate segment leaves the distance field
    (a minimum over segments) unchanged, so no masking is needed.
    """
    most = max(len(strokes) for strokes in GLYPH_STROKES)
    padded = [list(s) + [s[0]] * (most - len(s)) for s in GLYPH_STROKES]
    return np.asarray(padded, dtype=np.float32).reshape(GLYPH_CLASSES, most, 2, 2)


def generate_glyphs(n: int, size: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` glyph images (uint8 ``[n, 1, size, size]``) and labels, a pure function of its args.

    Images are made in whole chunks, each from its own stream keyed by (seed, split, chunk),
    so the first k images are the same whatever n is, and train (split 0) and test (split 1) are
    independent draws.
    """
    images, labels = [], []
    for chunk in range(math.ceil(n / _GLYPH_CHUNK)):
        rng = np.random.default_rng([_unsigned(seed), split, chunk])
        chunk_images, chunk_labels = _render_glyph_chunk(rng, _GLYPH_CHUNK, size)
        images.append(chunk_images)
        labels.append(chunk_labels)
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def _render_glyph_chunk(
    rng: np.random.Generator, n: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Place, rasterise and add noise to ``n`` random glyphs, vectorised over all of them."""
    labels = rng.integers(0, GLYPH_CLASSES, n)
    ends = _glyph_segments()[labels]  # [n, S, 2, 2] in glyph units
    ends = _place(ends, rng, size)
    # Stroke width, ink and background levels are the same for every image on purpose: a
    # nuisance that no augmentation changes becomes a shortcut for instance discrimination
    # (tell images apart by their stroke width) and contrastive learning then learns nothing.
    width = 0.08 * size
    distance = _distance_to_strokes(ends, size)  # [n, size, size] in pixels
    # A one-pixel linear ramp across the stroke edge: anti-aliasing without supersampling.
    ink = np.clip(width / 2 - distance + 0.5, 0, 1)
    pixels = 0.05 + 0.85 * ink
    pixels += rng.normal(0, 0.04, pixels.shape).astype(np.float32)
    images = np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)
    return images[:, None], labels.astype(np.int64)


def _place(ends: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Map glyph-unit stroke ends to pixel coordinates under a random placement.

    Full-circle rotation, mirror, scale, stretch and a shift that grows as the glyph shrinks
    put the same class on very different pixels: that is what defeats raw-pixel neighbours
    (about 30% 1-NN accuracy) while leaving the shape plain to a CNN (about 95%). A large
    glyph may touch the border and lose a sliver, never a whole stroke.
    """
    n = len(ends)
    angle = rng.uniform(0, 2 * np.pi, n)
    mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    half = rng.uniform(0.18, 0.36, n)  # glyph half-size as a fraction of the side
    stretch = np.exp(rng.uniform(-np.log(1.3), np.log(1.3), n))
    room = np.maximum(0.58 - 1.2 * half, 0)  # how far the centre may move and stay inside
    centre = (rng.uniform(-1, 1, (n, 2)) * room[:, None] + 0.5) * size
    sx = half * np.sqrt(stretch) * size * mirror
    sy = half / np.sqrt(stretch) * size
    cos, sin = np.cos(angle), np.sin(angle)
    # Rotation times diag(sx, sy), with the image's y axis pointing down.
    matrix = np.stack(
        [np.stack([cos * sx, -sin * sy], -1), np.stack([-sin * sx, -cos * sy], -1)], -2
    )
    placed = np.einsum("nij,nsej->nsei", matrix, ends) + centre[:, None, None, :]
    return placed.astype(np.float32)


def _distance_to_strokes(ends: np.ndarray, size: int) -> np.ndarray:
    """Distance from every pixel centre to the nearest segment, ``[n, size, size]``.

    Worked out in blocks of images holding about 4M (pixel, segment) pairs, so large image
    sizes cost time but not gigabytes of temporaries.
    """
    block = max(1, 2**22 // (size * size * ends.shape[1]))
    parts = [_distance_block(ends[i : i + block], size) for i in range(0, len(ends), block)]
    return np.concatenate(parts)


def _distance_block(ends: np.ndarray, size: int) -> np.ndarray:
    """Vectorised over images, pixels and segments: project, clamp to the segment, measure."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    px = centres[None, None, :, None]  # x along width
    py = centres[None, :, None, None]  # y along height
    a, b = ends[:, :, 0], ends[:, :, 1]  # [n, S, 2]
    ax, ay = a[..., 0][:, None, None, :], a[..., 1][:, None, None, :]  # [n, 1, 1, S]
    dx, dy = (b - a)[..., 0][:, None, None, :], (b - a)[..., 1][:, None, None, :]
    length2 = np.maximum(dx * dx + dy * dy, 1e-6)
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0, 1)  # [n, H, W, S]
    ex, ey = px - ax - t * dx, py - ay - t * dy
    return np.sqrt((ex * ex + ey * ey).min(axis=-1))


def _load_glyphs(cfg: DataConfig) -> _Splits:
    """Generate exactly the images asked for; "all" (0) means :data:`GLYPHS_ALL`."""
    n_train = cfg.num_train or GLYPHS_ALL[0]
    n_test = cfg.num_test or GLYPHS_ALL[1]
    train_x, train_y = generate_glyphs(n_train, cfg.image_size, cfg.data_seed, split=0)
    test_x, test_y = generate_glyphs(n_test, cfg.image_size, cfg.data_seed, split=1)
    return _Splits(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        GLYPH_CLASSES,
    )


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits


def _load_digits(cfg: DataConfig) -> _Splits:
    """The 1797 digits, 0..16 scaled to 0..255, split 80/20 by ``data_seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = _seeded_split(len(labels), cfg.data_seed)
    return _Splits(
        torch.from_numpy(images[train]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]),
        torch.from_numpy(labels[test]),
        10,
    )


# --------------------------------------------------------------------------------------------
# torchvision sets: CIFAR-10, CIFAR-100, STL-10

#: Seconds a download may wait on the network before it counts as "no network".
DOWNLOAD_TIMEOUT_S = 20


def _load_torchvision(cfg: DataConfig) -> _Splits:
    """Both labelled splits of a torchvision set, turned into uint8 ``[N, C, H, W]`` tensors."""
    train = _open_torchvision(cfg, train=True)
    test = _open_torchvision(cfg, train=False)
    num_classes = 100 if cfg.dataset == "cifar100" else 10
    return _Splits(*_as_tensors(train), *_as_tensors(test), num_classes)


def _open_torchvision(cfg: DataConfig, train: bool) -> Dataset:
    """Construct the torchvision data set, turning every way it can fail into one line.

    A failed download leaves nothing behind: torchvision creates ``data.root`` (and a partial
    archive) before it finds there is no network, and an empty ``data/`` folder in the user's
    working directory would only suggest the data were there.
    """
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}[
        cfg.dataset
    ]
    kwargs = {"root": cfg.root, "download": cfg.download}
    with _removing_what_fails_leaves(Path(cfg.root)):
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                if cfg.dataset == "stl10":
                    return cls(split="train" if train else "test", **kwargs)
                return cls(train=train, **kwargs)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise InputError(_missing_message(cfg, cls, err)) from None


@contextmanager
def _removing_what_fails_leaves(root: Path) -> Iterator[None]:
    """On an exception, remove what appeared under ``root`` meanwhile: the folders created for
    it (up to the first one that existed) or the new entries of an existing one."""
    created = root
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    existed = root.exists()
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(created, ignore_errors=True)
        elif root.is_dir():
            for entry in set(root.iterdir()) - before:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


def _missing_message(cfg: DataConfig, cls: type, err: Exception) -> str:
    """One line: which set, where it was looked for, what went wrong, and the fix: which
    archive to fetch from where, and the folder to put it (or its unpacked folder) in."""
    folder = cfg.root.rstrip("/") + "/"
    where = f"{cfg.dataset}: not found under {folder}"
    archive = f"{cls.filename} (from {cls.url})"
    if not cfg.download:
        return (
            f"{where} and data.download = false: unpack {archive} into {folder} so that "
            f"{folder}{cls.base_folder}/ exists, set data.download = true, or set data.root to "
            "where it is"
        )
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"{where} and the download failed (no network? {reason}): on a machine with network "
        f"get {archive} and put it in {folder} (a run unpacks it into {folder}"
        f"{cls.base_folder}/), or set data.root to where it is"
    )


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket wait so an offline download fails in seconds instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR keeps ``[N, H, W, C]`` and ``targets``; STL-10 ``[N, C, H, W]`` and ``labels``."""
    data = torch.from_numpy(np.ascontiguousarray(dataset.data))
    if hasattr(dataset, "targets"):
        return data.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(dataset.targets).long()
    return data, torch.as_tensor(dataset.labels).long()


# --------------------------------------------------------------------------------------------
# imagefolder: root/<class>/<image>, optionally root/train/<class>/... and root/test/<class>/...

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _load_imagefolder(cfg: DataConfig) -> _Splits:
    """Every image under ``cfg.root`` as RGB, with labels from the sorted class folder names."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise InputError(
            f"imagefolder: {root}/ is not a folder: set data.root to a folder of class folders"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _class_names(root / "train")
        train_x, train_y = _read_images(root / "train", classes, cfg.image_size)
        test_x, test_y = _read_images(root / "test", classes, cfg.image_size)
        return _Splits(train_x, train_y, test_x, test_y, len(classes))
    classes = _class_names(root)
    images, labels = _read_images(root, classes, cfg.image_size)
    train, test = _seeded_split(len(labels), cfg.data_seed)
    return _Splits(images[train], labels[train], images[test], labels[test], len(classes))


def _class_names(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise InputError(
            f"imagefolder: {folder}/ has no class folders: put each class's images in "
            f"{folder}/<class name>/"
        )
    return classes


def _read_images(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, ...]:
    """Read and resize every image under ``folder/<class>/``; a class it lacks has none."""
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(path, size))
                labels.append(label)
    if not images:
        raise InputError(
            f"imagefolder: no images under {folder}/ (looked for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} in its class folders)"
        )
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 ``[3, size, size]``; PIL resizes at once so big photos stay cheap."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"imagefolder: cannot read {path}: {err}") from None
    return np.asarray(rgb).transpose(2, 0, 1).copy()
