"""Batched two-view augmentation on tensors, with per-sample random parameters.

Contrastive methods need two random views of every image at every step, so augmentation is on
the hot path. torchvision's per-image transforms loop in Python and are several times slower
than this module, which draws all of a batch's parameters at once and applies each stage to the
whole batch: one affine warp (crop + flip + rotation), colour jitter, grayscale, a grouped-conv
Gaussian blur, normalisation and noise.

Every random number comes from the caller's CPU ``torch.Generator`` (parameters are drawn on
the CPU, then moved to the images' device), so the same generator state gives bit-identical
views on a given device: the trainer seeds it per step and a resumed run sees the same views.
On a GPU they travel through pinned memory without blocking: a plain copy from pageable memory
waits for every kernel queued before it, and a view makes several.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cltool.recipe import AugmentConfig

#: ITU-R 601 luma weights, the grayscale torchvision uses.
LUMA = (0.299, 0.587, 0.114)
#: Gaussian blur sigma range, in pixels of a 32-pixel image (the CIFAR convention), scaled
#: linearly with the image side.
BLUR_SIGMA = (0.1, 2.0)
BLUR_REFERENCE_SIDE = 32


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float, ``(x / 255 - mean) / std``: the evaluation input."""
    return _standardize(images.float() / 255, mean, std)


def _standardize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


class TwoViewAugment:
    """Two independently augmented, normalised views of a uint8 batch."""

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        # ~10% of the side, odd so the kernel has a centre, at least 3 to blur at all.
        self.blur_kernel = max(3, 2 * round(0.05 * image_size) + 1)
        self.blur_sigma = tuple(s * image_size / BLUR_REFERENCE_SIDE for s in BLUR_SIGMA)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images uint8 [B, C, H, W] on any device -> two float views [B, C, S, S], normalised."""
        return self.view(images, generator), self.view(images, generator)

    def view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented view; the stages draw from ``generator`` in a fixed order."""
        x = self._warp(images.float() / 255, generator)
        x = self._jitter(x, generator)
        x = self._grayscale(x, generator)
        x = self._blur(x, generator)
        x = _standardize(x.clamp(0, 1), self.mean, self.std)
        if self.cfg.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator) * self.cfg.noise_std
            x = x + _to_device(noise, x.device)
        return x

    # ----------------------------------------------------------------------------------------

    def _warp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random resized crop, horizontal flip and rotation as one affine resampling.

        Composing them into a single matrix means one bilinear interpolation per view, so the
        stages do not blur each other, and the whole batch warps in one ``grid_sample``.
        """
        theta = _to_device(self._affine(x.shape[0], generator), x.device)
        size = (x.shape[0], x.shape[1], self.image_size, self.image_size)
        grid = F.affine_grid(theta, list(size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _affine(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample ``[B, 2, 3]`` maps from output to input coordinates (both in [-1, 1]).

        The aspect ratio's log is drawn from [log 3/4, log 4/3] and then clipped to
        [log scale, -log scale], the widest range whose crop still fits in the image: no
        rejection loop, and a crop of scale 1 is exactly the whole image.
        """
        cfg = self.cfg
        rand = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
        scale = cfg.crop_min_scale + (cfg.crop_max_scale - cfg.crop_min_scale) * rand[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand[:, 1]
        log_ratio = torch.maximum(torch.minimum(log_ratio, -scale.log()), scale.log())
        width = (scale * log_ratio.exp()).sqrt().clamp(max=1)
        height = (scale / log_ratio.exp()).sqrt().clamp(max=1)
        shift_x = (2 * rand[:, 2] - 1) * (1 - width)
        shift_y = (2 * rand[:, 3] - 1) * (1 - height)
        flip = torch.where(torch.rand(batch, generator=generator) < cfg.flip_p, -1.0, 1.0)
        angle = (2 * rand[:, 4] - 1) * math.radians(cfg.rotate_degrees)
        cos, sin = angle.cos(), angle.sin()
        # input = diag(width, height) @ rotation @ diag(flip, 1) @ output + shift
        theta = torch.stack(
            [
                torch.stack([width * cos * flip, -width * sin, shift_x], -1),
                torch.stack([height * sin * flip, height * cos, shift_y], -1),
            ],
            -2,
        )
        return theta.float()

    def _jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and (3 channels) saturation, with probability ``jitter_p``.

        Samples left alone get factors of exactly 1. Each step clamps to [0, 1] as torchvision
        does, so a bright image saturates instead of drifting out of range.
        """
        cfg = self.cfg
        batch = x.shape[0]
        apply = torch.rand(batch, generator=generator) < cfg.jitter_p
        factors = 1 + (2 * torch.rand(batch, 3, generator=generator) - 1) * torch.tensor(
            [cfg.brightness, cfg.contrast, cfg.saturation]
        )
        if not apply.any():
            return x
        factors = _to_device(torch.where(apply[:, None], factors, 1.0), x.device)
        brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in factors.unbind(1))
        x = (x * brightness).clamp(0, 1)
        mean_gray = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean_gray) * contrast + mean_gray).clamp(0, 1)
        if x.shape[1] == 3:
            gray = _gray(x)
            x = ((x - gray) * saturation + gray).clamp(0, 1)
        return x

    def _grayscale(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace a ``grayscale_p`` share of 3-channel images by their luma."""
        apply = torch.rand(x.shape[0], generator=generator) < self.cfg.grayscale_p
        if x.shape[1] != 3 or not apply.any():
            return x
        return torch.where(_to_device(apply, x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Separable Gaussian blur with a per-sample sigma, as two grouped convolutions.

        Each (sample, channel) plane gets its own 1-D kernel as one group of a depthwise
        convolution, so differently blurred images still take a single conv call per axis.
        Samples not blurred get a delta kernel; reflect padding keeps borders unshaded.
        """
        batch, channels, height, width = x.shape
        apply = torch.rand(batch, generator=generator) < self.cfg.blur_p
        low, high = self.blur_sigma
        sigma = low + (high - low) * torch.rand(batch, generator=generator)
        if not apply.any():
            return x
        radius = self.blur_kernel // 2
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        delta = (offsets == 0).float().expand_as(kernel)
        kernel = _to_device(torch.where(apply[:, None], kernel, delta).to(x.dtype), x.device)
        kernel = kernel.repeat_interleave(channels, 0)  # [B * C, k], one per plane
        planes = x.reshape(1, batch * channels, height, width)
        planes = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
        planes = F.conv2d(planes, kernel[:, None, :, None], groups=batch * channels)
        planes = F.conv2d(planes, kernel[:, None, None, :], groups=batch * channels)
        return planes.view(batch, channels, height, width)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``[B, C, H, W]`` as ``[B, 1, H, W]``; a 1-channel image is its own luma."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (x * _luma_weights(x.device, x.dtype)).sum(dim=1, keepdim=True)


@functools.cache
def _luma_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:data:`LUMA` as ``[1, 3, 1, 1]``, made once per device and dtype."""
    return torch.tensor(LUMA, dtype=dtype).view(1, 3, 1, 1).to(device)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor of parameters on ``device``; on a GPU through pinned memory, asynchronously
    (the caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
