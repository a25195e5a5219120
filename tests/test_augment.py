"""Batched two-view augmentation: determinism, exact identity, flips and per-sample draws."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from cltool.augment import TwoViewAugment, normalize
from cltool.recipe import AugmentConfig

SIZE = 24
MEAN3, STD3 = (0.4, 0.45, 0.5), (0.25, 0.2, 0.3)
IDENTITY = AugmentConfig(
    crop_min_scale=1.0,
    crop_max_scale=1.0,
    flip_p=0.0,
    rotate_degrees=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    noise_std=0.0,
)
STRONG = AugmentConfig(rotate_degrees=30.0, noise_std=0.05)


def _images(batch: int = 16, channels: int = 3, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    shape = (batch, channels, size, size)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def _views(cfg: AugmentConfig, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    augment = TwoViewAugment(cfg, SIZE, MEAN3[: images.shape[1]], STD3[: images.shape[1]])
    return augment(images, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_and_dtype(channels: int) -> None:
    first, second = _views(STRONG, _images(channels=channels, size=32), seed=0)
    assert first.shape == second.shape == (16, channels, SIZE, SIZE)
    assert first.dtype == second.dtype == torch.float32
    assert not torch.equal(first, second)


def test_same_seed_same_views_other_seed_other_views() -> None:
    images = _images()
    first = _views(STRONG, images, seed=7)
    again = _views(STRONG, images, seed=7)
    other = _views(STRONG, images, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_settings_reproduce_normalize(channels: int) -> None:
    images = _images(channels=channels)
    view = _views(IDENTITY, images, seed=0)[0]
    expected = normalize(images, MEAN3[:channels], STD3[:channels])
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_certain_flip_is_a_mirror() -> None:
    images = _images()
    view = _views(replace(IDENTITY, flip_p=1.0), images, seed=0)[0]
    expected = torch.flip(normalize(images, MEAN3, STD3), dims=[-1])
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_parameters_differ_within_a_batch() -> None:
    """One image repeated across the batch must come out as many different views."""
    images = _images(batch=1).expand(8, -1, -1, -1).contiguous()
    for cfg in (
        replace(IDENTITY, crop_min_scale=0.3),
        replace(IDENTITY, rotate_degrees=45.0),
        replace(IDENTITY, jitter_p=1.0),
        replace(IDENTITY, blur_p=1.0),
    ):
        view = _views(cfg, images, seed=0)[0]
        distinct = {tuple(v.flatten()[:64].tolist()) for v in view}
        assert len(distinct) == 8, cfg


def test_probabilities_apply_per_sample() -> None:
    images = _images(batch=64)
    view = _views(replace(IDENTITY, grayscale_p=0.5), images, seed=0)[0]
    raw = view * torch.tensor(STD3).view(1, 3, 1, 1) + torch.tensor(MEAN3).view(1, 3, 1, 1)
    gray = (raw.amax(dim=1) - raw.amin(dim=1)).amax(dim=(1, 2)) < 1e-5
    assert 10 < int(gray.sum()) < 54


def test_views_stay_in_range_before_normalisation() -> None:
    view = _views(replace(STRONG, noise_std=0.0), _images(), seed=3)[0]
    raw = view * torch.tensor(STD3).view(1, 3, 1, 1) + torch.tensor(MEAN3).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_timing_batch_256() -> None:
    """Printed, not asserted: best of five, so other load on the machine does not count."""
    augment = TwoViewAugment(AugmentConfig(rotate_degrees=30.0), SIZE, MEAN3, STD3)
    images = _images(batch=256)
    generator = torch.Generator().manual_seed(0)
    augment(images, generator)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        augment(images, generator)
        times.append(time.perf_counter() - start)
    print(f"two views of 256 x 3 x {SIZE} x {SIZE}: {min(times) * 1000:.1f} ms (best of 5)")
