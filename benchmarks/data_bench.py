"""Two-view augmentation throughput: this project's batched ``TwoViewAugment`` against
torchvision's per-image ``transforms.v2`` pipeline with the same MoCo v2 settings, and the
share of the training step that augmentation takes.

Both sides start from what an in-memory data set holds (a uint8 batch ``[B, 3, S, S]``) and
end with two normalised float views. The settings are the project's defaults, which are MoCo
v2's: random resized crop (scale 0.2-1), colour jitter 0.4/0.4/0.4 with p 0.8 (no hue: the
project has none), grayscale p 0.2, Gaussian blur sigma 0.1-2 with p 0.5, horizontal flip.
The step is ``Trainer.train_step`` of ``recipes/moco.toml`` moved to the chosen backbone and
size (see ``step_bench.py``), timed in the same interleaved rounds.

    .venv/bin/python benchmarks/data_bench.py                     # batch 128 and 256, 32x32
    .venv/bin/python benchmarks/data_bench.py --batch 128 --backbone small_cnn --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import step_bench
import torch
from torchvision.transforms import v2

from cltool.augment import TwoViewAugment
from cltool.recipe import AugmentConfig, load_recipe

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def torchvision_pipeline(cfg: AugmentConfig, size: int, blur_kernel: int) -> v2.Compose:
    """torchvision's per-image MoCo v2 transform with the project's settings."""
    jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation)
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale=(cfg.crop_min_scale, cfg.crop_max_scale), antialias=True
            ),
            v2.RandomApply([jitter], p=cfg.jitter_p),
            v2.RandomGrayscale(p=cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=cfg.blur_p),
            v2.RandomHorizontalFlip(p=cfg.flip_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def per_image_two_views(pipeline: v2.Compose, images: torch.Tensor) -> Callable[[], object]:
    """Two views of every image, one image at a time, stacked: what a DataLoader worker and
    its collate function do for a batch."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.stack([pipeline(image) for image in images])
        second = torch.stack([pipeline(image) for image in images])
        return first, second

    return run


def batched_two_views(augment: TwoViewAugment, images: torch.Tensor) -> Callable[[], object]:
    """The project's augmentation of the whole batch, with a fresh generator per call."""
    counter = iter(range(1 << 62))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return augment(images, torch.Generator().manual_seed(next(counter)))

    return run


def steps_for_batch(batch: int, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The three things timed at one batch size: both augmentations and the project's step."""
    cfg = AugmentConfig()
    augment = TwoViewAugment(cfg, args.image_size, MEAN, STD)
    g = torch.Generator().manual_seed(batch)
    images = torch.randint(
        0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g
    )
    steps = {
        f"{batch}/project": batched_two_views(augment, images),
        f"{batch}/torchvision": per_image_two_views(
            torchvision_pipeline(cfg, args.image_size, augment.blur_kernel), images
        ),
    }
    if not args.no_step:
        setting = step_bench.Setting(
            backbone=args.backbone,
            batch=batch,
            image_size=args.image_size,
            num_train=max(4 * batch, 1024),
        )
        recipe = load_recipe(step_bench.ROOT / "recipes" / "moco.toml", setting.overrides())
        data = step_bench.synthetic_data(setting)
        trainer = step_bench.build_trainer(recipe, data)
        steps[f"{batch}/step"] = step_bench.project_step(trainer, step_bench.Batches(data, batch))
    return steps


def table(batches: list[int], med: dict[str, float], with_step: bool) -> str:
    lines = [
        "| batch | project ms | torchvision ms | torchvision / project | project img/s | "
        "step s | project share of step | torchvision share of step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in batches:
        ours, theirs = med[f"{b}/project"], med[f"{b}/torchvision"]
        step = med.get(f"{b}/step") if with_step else None
        shares = (
            (f"{100 * ours / step:.1f}%", f"{100 * theirs / step:.1f}%") if step else ("-", "-")
        )
        lines.append(
            f"| {b} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {theirs / ours:.2f}x | "
            f"{b / ours:,.0f} | {f'{step:.3f}' if step else '-'} | {shares[0]} | {shares[1]} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--backbone", default="resnet18", choices=("small_cnn", "resnet18", "resnet50")
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-step", action="store_true", help="time the augmentations only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    steps: dict[str, Callable[[], object]] = {}
    for batch in args.batch:
        steps.update(steps_for_batch(batch, args))
    times = step_bench.interleaved(steps, args.repeats, lambda: None)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"## data: two-view augmentation, {args.image_size}x{args.image_size}, step of "
        f"moco.toml on {args.backbone}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {args.repeats} rounds, load {load:.1f}"
    )
    print()
    print(table(args.batch, med, not args.no_step))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        blob = {"args": vars(args) | {"json": str(args.json)}, "median_s": med, "times_s": times}
        args.json.write_text(json.dumps(blob, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
