"""Training images per second of ``Trainer.train_step`` under each speed option, in one run.

The step is the project's own (uint8 batch gathered where the trainer keeps the training set,
two-view augmentation, forward, loss, backward, optimiser, momentum and memory updates), on a
synthetic data set in the issue's setting (MLP head 512-2048-128, SGD) moved to a backbone and
image size. Each variant adds options on top of the plain fp32 step:

- ``fp32``: as a recipe runs by default;
- ``bf16``: ``train.precision = "bf16"`` (autocast);
- ``bf16_cl``: and ``train.channels_last = true``;
- ``bf16_cl_compile``: and ``train.compile = true`` (``torch.compile`` of the encoders).

Every (recipe, variant) trainer is built first and warmed up (compiling happens there, and its
seconds are reported); then rounds time ``--steps`` consecutive steps of each in turn, so load
changes fall on all alike. Reported: median images/s, its ratio to ``fp32`` of the same recipe
in the same run, the warm-up seconds and the peak device memory of the warm-up steps.

    python benchmarks/throughput.py --device cuda                 # ResNet-18, 32 px
    python benchmarks/throughput.py --device cuda --backbone resnet50 --image-size 224 --batch 128
    .venv/bin/python benchmarks/throughput.py --device cpu --backbone small_cnn --batch 16 \\
        --variants fp32 bf16 --steps 2 --repeats 1                                # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from step_bench import (
    Batches,
    add_setting_arguments,
    build_trainer,
    environment,
    project_step,
    setting_from,
    synchronizer,
    synthetic_data,
)

from cltool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "bf16_cl": ["train.precision=bf16", "train.channels_last=true"],
    "bf16_cl_compile": [
        "train.precision=bf16",
        "train.channels_last=true",
        "train.compile=true",
    ],
}


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_steps(step: Callable[[], None], count: int, sync: Callable[[], None]) -> float:
    """Seconds for ``count`` consecutive steps, the device drained before and after."""
    sync()
    start = time.perf_counter()
    for _ in range(count):
        step()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_arguments(parser, batch=256, num_train=4096)
    parser.add_argument("--recipes", nargs="+", default=["moco", "simclr"], help="recipe stems")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per trainer")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    setting = setting_from(args)
    device = torch.device(args.device)
    sync = synchronizer(device)
    data = synthetic_data(setting)
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    warmup: dict[tuple[str, str], dict[str, Any]] = {}
    for stem in args.recipes:
        for variant in args.variants:
            overrides = [*setting.overrides(), *VARIANTS[variant]]
            recipe = load_recipe(ROOT / "recipes" / f"{stem}.toml", overrides)
            trainer = build_trainer(recipe, data)
            step = project_step(trainer, Batches(data, setting.batch))
            reset_peak_memory(device)
            seconds = run_steps(step, args.warmup, sync)
            warmup[stem, variant] = {"seconds": seconds, "peak_mib": peak_memory_mib(device)}
            steps[stem, variant] = step
            print(f"  {stem}/{variant}: warm-up {seconds:.1f} s", file=sys.stderr, flush=True)

    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_ in range(args.repeats):
        for key, step in steps.items():
            times[key].append(run_steps(step, args.steps, sync))
        print(f"  round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    images = args.steps * args.batch
    rate = {key: images / statistics.median(ts) for key, ts in times.items()}
    env = environment(args, setting)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    print(
        f"## images/s: {args.backbone}, {args.image_size}px, batch {args.batch}, "
        f"{env.get('gpu', env['machine'])}, torch {env['torch']}, median of {args.repeats} "
        f"rounds of {args.steps} steps"
    )
    print()
    print("| recipe | variant | images/s | vs fp32 | warm-up s | peak MiB |")
    print("|---|---|---|---|---|---|")
    for (stem, variant), value in rate.items():
        base = rate.get((stem, "fp32"))
        ratio = f"{value / base:.2f}x" if base else "-"
        peak = warmup[stem, variant]["peak_mib"]
        print(
            f"| {stem} | {variant} | {value:,.0f} | {ratio} | "
            f"{warmup[stem, variant]['seconds']:.1f} | {'-' if peak is None else f'{peak:,.0f}'} |"
        )
    if args.json:
        rows = [
            {
                "recipe": stem,
                "variant": variant,
                "images_per_s": rate[stem, variant],
                "block_seconds": times[stem, variant],
                **{f"warmup_{k}": v for k, v in warmup[stem, variant].items()},
            }
            for stem, variant in steps
        ]
        blob = {"environment": env, "args": vars(args), "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(blob, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
